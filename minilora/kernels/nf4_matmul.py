"""4-bit matmuls with an NF4 weight W (N, K): y = x @ W^T (forward) and g @ W (input gradient).

Reference (plain torch, below): `matmul_nf4_reference` = F.linear(x, dequantize_nf4(W)).
Three paths, picked by the number of rows M of x (decoding has M = batch size):
  - M <= SMALL_M: `_gemv_nf4_kernel`, fp32 FMAs: y[m, n] = sum_groups absmax[n, g] * sum_k code[q[n, k]] x[m, k].
  - SMALL_M < M <= FEW_ROWS and x in fp16/bf16: `_matmul_nf4_few_rows_kernel` decodes a (BLOCK_N, 64 GROUPS) tile of W in
    registers to x's dtype, as `dequantize_nf4` rounds it, and multiplies it on the tensor cores by x's
    rows padded to M_PAD (>= 16, tl.dot's minimum): each weight byte is read and decoded once for all rows.
    (With a double-quantized absmax these kernels, compiled with fp fusion on, turn the absmax's multiply and add
    into one FMA: one fp32 rounding fewer than `dequantize_nf4`, so a weight can differ from it by one ulp of x's
    dtype where that rounding tips it; the dequant kernels compile without fusion and are exact.)
  - otherwise: dequantize W into a buffer reused across calls (`nf4_dequant.py`), then cuBLAS. The buffer
    is per (shape, dtype, device) and only read by the matmul that follows on the same stream, so reuse is safe;
    it is never returned or saved for backward. g @ W (backward, large M in training) always takes this path.
Both decoding kernels read W as int32 words: word w of a row holds columns 8w..8w+7, byte b of it columns 8w+2b
(high nibble) and 8w+2b+1 (low nibble), the 8 words of a 64-column group share one absmax. A tile is (BLOCK_N
rows, GROUPS groups, 8 words), one 16-byte load per 4 words, so each thread's words share their absmax.
Decoding a nibble is the cost (benchmarks/RESULTS.md: table loads and byte loads made the earlier GEMV ~10
instructions per weight); here it is one shift and one warp shuffle: lane l holds code[l % 16] and
`shfl.sync.idx` returns the value of the lane the nibble names (shfl reads 5 bits of the lane number, so the
bits above the nibble need no mask: lanes 16-31 repeat the table). Triton's CPU interpreter has no inline
PTX, so there (SHUFFLE=False) the kernels look the code up in memory instead: same values. The GEMV loads the next
step's 16-bit x with its words where registers allow (`X_AHEAD`, `_x_ahead`): x's load latency was half of its
wait on memory (ncu); the same values go into the same sums either way.
K is split over SPLIT_K programs per row block (a decode matmul has too few row blocks to keep every SM's
memory pipe full): each writes an fp32 partial sum to a reused workspace, and the last to arrive (an atomic
counter per row block) adds the partials in split order and writes the output, in the same launch, so the
result does not depend on which program finishes last. Workspace reuse assumes one stream, as the buffer does.
Needs K % 64 == 0 (every Llama/Qwen/Gemma/Phi width is) and a 16-byte aligned `packed`, else dequant + cuBLAS.
Gate/up + GLU (`matmul_nf4_glu`, a decode step's MLP): for a joined weight W (2F, K), gate rows 0..F-1 over up rows
F..2F-1, the GEMV in GLU mode gives each thread gate rows f and their up rows F + f, so after the (split-K) sum one
program holds both of feature f and its epilogue stores y[f] = act(gate) * up (glu.py's `_gated`), F values
instead of 2F and no GLU launch: rounded as the GEMV's stores and `_glu_forward_kernel` round, bit for bit.
Tests: tests/test_nf4_kernels.py, tests/test_nf4_glu.py. Benchmarks: benchmarks/gemv.py (as a decode step streams
them; `--glu` for the gate/up + GLU pair), benchmarks/kernels.py.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from minilora.kernels.glu import _gated, geglu_triton, swiglu_triton
from minilora.kernels.nf4_dequant import _absmax, check_state, dequantize_nf4, nested_args
from minilora.kernels.pdl import let_dependents_start, pdl_enabled, wait_for_inputs
from minilora.nf4 import NF4State
from minilora.nf4 import dequantize_nf4 as dequantize_nf4_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SMALL_M = 1  # rows for the GEMV (at 2 rows the few-rows kernel is faster: benchmarks/RESULTS.md)
# rows for the tensor-core kernel; above, dequant + cuBLAS. 128: a 128-token prefill (Llama-3.2-3B shape, batch 1,
# graph replay, H100) took 5.34 ms with it, 6.73 ms with dequant + cuBLAS (benchmarks/RESULTS.md)
FEW_ROWS = 128

# The GEMV's launch is planned, not autotuned (`gemv_plan`): one tiling, and the K split that puts every program
# in a single wave. Autotuning times each config alone, one weight over and over; a decode step runs the GEMV
# between other kernels, with PDL, on weights that are not in L2; there its picks made a decode step up to 7%
# slower than the plan, and changed from process to process (benchmarks/RESULTS.md, "GEMV launch plan").
# GEMV_TILE: BLOCK_N rows a program in a (BLOCK_N / ROWS, GROUPS, 2) grid of threads, ROWS rows per thread (so
# 2 * BLOCK_N / ROWS * GROUPS = 32 * GEMV_WARPS); the best tiling for all four Llama-3.2-3B decode shapes in a
# sweep of 280 (H100, benchmarks/RESULTS.md). GEMV_PROGRAMS_PER_SM: resident programs of that tiling per SM,
# from its registers a thread (sm_90, Triton 3.6: 128 with AHEAD = 1, 167 with AHEAD = 2; 64K a SM). ROWS is
# even: in GLU mode a thread's rows are ROWS / 2 (gate, up) pairs (BLOCK_N / 2 features a program).
if INTERPRET:  # small tiles, and (INTERPRET_PLAN) K split with AHEAD = 2, so CPU tests run both
    GEMV_TILE, GEMV_WARPS, GEMV_PROGRAMS_PER_SM = {"BLOCK_N": 8, "GROUPS": 2, "ROWS": 2}, 1, {1: 1, 2: 1}
    _FEW_ROWS_CONFIGS = [triton.Config({"BLOCK_N": 16, "GROUPS": 1, "SPLIT_K": 2})]
else:
    GEMV_TILE, GEMV_WARPS, GEMV_PROGRAMS_PER_SM = {"BLOCK_N": 32, "GROUPS": 8, "ROWS": 4}, 4, {1: 4, 2: 3}
    _FEW_ROWS_CONFIGS = [triton.Config({"BLOCK_N": n, "GROUPS": g, "SPLIT_K": k}, num_warps=w, num_stages=s)
                         for n, g, k, w, s in [(32, 2, 1, 4, 3), (32, 2, 2, 4, 3), (32, 2, 4, 4, 3), (32, 2, 4, 4, 1),
                                               (64, 2, 2, 4, 3), (64, 2, 4, 4, 3), (64, 1, 4, 4, 3), (128, 1, 4, 4, 3),
                                               (128, 2, 4, 4, 3), (16, 4, 4, 4, 3), (64, 2, 8, 4, 3)]]
MAX_SPLIT_K, MIN_BLOCK_N = 8, 8
INTERPRET_PLAN = (2, 2)  # the GEMV's (SPLIT_K, AHEAD) under the interpreter
X_AHEAD = True  # 16-bit x loaded a step ahead where registers allow (`_x_ahead`); tests turn it off to compare
GLU_ACTIVATIONS = ("silu", "gelu_tanh")  # SwiGLU, GeGLU (tanh approximation) as minilora/kernels/glu.py computes them


def matmul_nf4_reference(x: torch.Tensor, state: NF4State) -> torch.Tensor:
    """x @ W^T with W dequantized to x's dtype (plain torch)."""
    return F.linear(x, dequantize_nf4_reference(state, x.dtype))


def matmul_nf4_t_reference(g: torch.Tensor, state: NF4State) -> torch.Tensor:
    """g @ W with W dequantized to g's dtype (plain torch): the input gradient of x @ W^T."""
    return g @ dequantize_nf4_reference(state, g.dtype)


@triton.jit
def _code_table(code_ptr, SHUFFLE: tl.constexpr):
    """code[lane % 16] for this thread's lane: the shuffle's source, one register per thread.

    A scalar on purpose: Triton moves tensors between threads when it changes their layout, which would break
    "lane l holds code[l % 16]"; a scalar (splat where a tensor needs it) is never moved."""
    if SHUFFLE:
        lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [tl.program_id(0)], dtype=tl.int32,
                                         is_pure=True, pack=1)
        return tl.load(code_ptr + (lane & 15))
    else:
        return 0.0


@triton.jit
def _code(table, code_ptr, nibble, SHUFFLE: tl.constexpr):
    """code[nibble & 15] as fp32 (bits above the low 4 of `nibble` are ignored)."""
    if SHUFFLE:
        return tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;", "=r,r,r",
                                         [table, nibble], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.load(code_ptr + (nibble & 15))


@triton.jit
def _load_words(words_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, n, n_mask, group, g_mask,
                K_GROUPS, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """The words (rows n, groups `group`, 8 words each) as int32 (BLOCK_N, GROUPS, 8) and their absmax (BLOCK_N, GROUPS)."""
    word = n[:, None, None] * (K_GROUPS * 8) + group[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    words = tl.load(words_ptr + word, mask=n_mask[:, None, None] & g_mask[None, :, None], other=0)
    scale = _absmax(n[:, None] * K_GROUPS + group[None, :], n_mask[:, None] & g_mask[None, :],
                    absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, NESTED, NESTED_BLOCKSIZE)
    return words, scale


@triton.jit
def _x_pair(x_row, pair, mask, X_FORMAT: tl.constexpr):
    """x's columns 2 pair (paired with high nibbles) and 2 pair + 1 (low nibbles) as fp32.

    X_FORMAT 0: x_row points at fp32 columns. 1 (bf16) and 2 (fp16): at int32 column pairs, one load for both,
    column 2p in the low half (little-endian)."""
    if X_FORMAT == 0:
        even = tl.load(x_row + 2 * pair, mask=mask, other=0.0)
        odd = tl.load(x_row + 2 * pair + 1, mask=mask, other=0.0)
    else:
        even, odd = _widen_pair(tl.load(x_row + pair, mask=mask, other=0), X_FORMAT)
    return even, odd


@triton.jit
def _widen_pair(p, X_FORMAT: tl.constexpr):
    """An int32 pair of 16-bit x columns (X_FORMAT 1: bf16, 2: fp16) as fp32 (even column, odd column)."""
    if X_FORMAT == 1:  # a bf16 is the top half of the fp32 of the same value
        even = (p << 16).to(tl.float32, bitcast=True)
        odd = (p & -65536).to(tl.float32, bitcast=True)
    else:
        even = (p & 65535).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        odd = (p >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return even, odd


@triton.jit
def _x_step(x_row, group, end, pair_in_group):
    """The int32 column pairs of 16-bit x that step `group` reads, byte b of each word in the b-th tensor."""
    pair = group[None, :, None, None] * 32 + pair_in_group
    mask = pair < end * 32
    return (tl.load(x_row + pair, mask=mask, other=0), tl.load(x_row + pair + 1, mask=mask, other=0),
            tl.load(x_row + pair + 2, mask=mask, other=0), tl.load(x_row + pair + 3, mask=mask, other=0))


@triton.jit
def _split_range(split, K_GROUPS, GROUPS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Groups [start, end) of K split `split`: SPLIT_K slices, each a multiple of GROUPS long (the last may be empty)."""
    per_split = tl.cdiv(tl.cdiv(K_GROUPS, SPLIT_K), GROUPS) * GROUPS
    start = split * per_split
    return start, tl.minimum(start + per_split, K_GROUPS)


@triton.jit
def _arrives_last(count_ptr, SPLIT_K: tl.constexpr):
    """Count this program's partial sum as written; True in the program that completes the count, which resets it.

    The barrier orders every thread's partial store before the count (release); the last program's acquire then
    sees all SPLIT_K partials, read through L2 (.cg)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLIT_K - 1
    tl.atomic_xchg(count_ptr, 0, mask=last, sem="relaxed", scope="gpu")
    return last


@triton.jit
def _load_row_words(words_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, n, n_mask, group, g_mask,
                    K_GROUPS, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """`_load_words` for the GEMV's rows n of shape (CHUNK, ROWS): words (CHUNK, GROUPS, ROWS, 8), absmax
    (CHUNK, GROUPS, ROWS). The rows dimension comes after the groups so that Triton, which spreads threads over
    the dimensions in order, leaves it to each thread's registers: a thread holds ROWS rows of the same columns."""
    word = (n[:, None, :, None] * (K_GROUPS * 8) + group[None, :, None, None] * 8
            + tl.arange(0, 8)[None, None, None, :])
    mask = n_mask[:, None, :] & g_mask[None, :, None]
    words = tl.load(words_ptr + word, mask=mask[:, :, :, None], other=0)
    scale = _absmax(n[:, None, :] * K_GROUPS + group[None, :, None], mask, absmax_ptr, nested_absmax_ptr,
                    nested_code_ptr, offset_ptr, NESTED, NESTED_BLOCKSIZE)
    return words, scale


@triton.jit
def _gemv_rows(block, N, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, GLU: tl.constexpr):
    """Row block `block`'s rows of W as (BLOCK_N / ROWS, ROWS), ROWS held by each thread, and their mask.

    GLU: N = 2F rows, and block b holds features f = b BLOCK_N / 2 + ..., each thread ROWS / 2 of them, as pairs
    (gate row f, up row F + f) next to each other on the ROWS axis (axis index 2 r + 0 for gate, 2 r + 1 for up)."""
    CHUNK: tl.constexpr = BLOCK_N // ROWS
    if GLU:
        F = N // 2
        j = tl.arange(0, ROWS)[None, :]
        feature = block * (BLOCK_N // 2) + tl.arange(0, CHUNK)[:, None] + (j // 2) * CHUNK
        return feature + (j % 2) * F, feature < F
    else:
        n = block * BLOCK_N + tl.arange(0, CHUNK)[:, None] + tl.arange(0, ROWS)[None, :] * CHUNK
        return n, n < N


@triton.jit
def _store_rows(out_ptr, n, n_mask, total, GLU: tl.constexpr, GELU: tl.constexpr):
    """Store the fp32 sums `total` (CHUNK, ROWS) of rows n to out_ptr (the output row) in its dtype, or in GLU
    mode act(gate) * up of each (gate, up) pair at its feature: the pair rounded to the dtype first, as the GEMV
    stores them for minilora/kernels/glu.py to read, then `_gated`, the GLU kernel's own arithmetic."""
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    if GLU:
        CHUNK: tl.constexpr = total.shape[0]
        PAIRS: tl.constexpr = total.shape[1] // 2
        feature, _ = tl.split(n.reshape(CHUNK, PAIRS, 2))  # a gate row's index is its feature's
        mask, _ = tl.split(n_mask.reshape(CHUNK, PAIRS, 2))
        gate, up = tl.split(total.reshape(CHUNK, PAIRS, 2))
        tl.store(out_ptr + feature, _gated(gate.to(dtype).to(tl.float32), up.to(dtype).to(tl.float32), GELU, dtype),
                 mask=mask)
    else:
        tl.store(out_ptr + n, total.to(dtype), mask=n_mask)


@triton.jit
def _gemv_nf4_kernel(x_ptr, words_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, out_ptr,
                     partial_ptr, count_ptr, M, N, K_GROUPS, stride_xm, stride_om, X_FORMAT: tl.constexpr,
                     NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, SHUFFLE: tl.constexpr, PDL: tl.constexpr,
                     GLU: tl.constexpr, GELU: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                     ROWS: tl.constexpr, SPLIT_K: tl.constexpr, AHEAD: tl.constexpr, X_AHEAD: tl.constexpr):
    """One program per (BLOCK_N rows of W, row of x, K split); a second row of x (M = 2) re-reads W from L2.

    The BLOCK_N rows are a (BLOCK_N / ROWS, ROWS) grid, each thread holding ROWS rows of the same words, so the
    x pairs it loads and widens to fp32 serve ROWS rows (sm_90 code from Triton 3.6: 5.6 instructions per weight
    with one row per thread, 4.0 with 4).
    With SPLIT_K > 1 each program writes an fp32 partial sum and the last of a row block's SPLIT_K programs adds
    them in split order (deterministic) and stores the output: one launch, SPLIT_K times the programs in flight.
    GLU: W is a joined gate/up weight (N = 2F rows), out has F columns: y = act(gate) * up (GELU: GeGLU, else
    SwiGLU), each thread's rows being (gate, up) pairs (`_gemv_rows`); the weights are read as in the plain GEMV.
    With PDL (minilora/kernels/pdl.py) the first weights are requested before waiting for x."""
    let_dependents_start(PDL)
    block, row, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    CHUNK: tl.constexpr = BLOCK_N // ROWS
    n, n_mask = _gemv_rows(block, N, BLOCK_N, ROWS, GLU)  # (CHUNK, ROWS)
    x_row = x_ptr + row * stride_xm
    g = tl.arange(0, GROUPS)
    pair_in_group = tl.arange(0, 8)[None, None, None, :] * 4  # the first column pair of each word of a group
    table = _code_table(code_ptr, SHUFFLE)
    start, end = _split_range(split, K_GROUPS, GROUPS, SPLIT_K)
    acc = tl.zeros((CHUNK, GROUPS, ROWS, 8), dtype=tl.float32)  # reduced once, after the loop
    words, scale = _load_row_words(words_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, n, n_mask,
                                   start + g, start + g < end, K_GROUPS, NESTED, NESTED_BLOCKSIZE)
    if AHEAD == 2:  # a second step's words in flight too, also requested before the wait
        words2, scale2 = _load_row_words(words_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, n,
                                         n_mask, start + GROUPS + g, start + GROUPS + g < end, K_GROUPS, NESTED,
                                         NESTED_BLOCKSIZE)
    wait_for_inputs(PDL)  # x, the workspace and the output come after the previous kernel
    if X_AHEAD:  # 16-bit x only: this step's x pairs in registers, the next step's requested with its words
        x0, x1, x2, x3 = _x_step(x_row, start + g, end, pair_in_group)
    for g0 in range(start, end, GROUPS):
        group = g0 + g
        g_mask = group < end
        # the words of step +AHEAD are loaded before this step's decoding, so the memory latency overlaps it
        ahead = group + AHEAD * GROUPS
        next_words, next_scale = _load_row_words(words_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                                                 offset_ptr, n, n_mask, ahead, ahead < end, K_GROUPS, NESTED,
                                                 NESTED_BLOCKSIZE)
        if X_AHEAD:
            n0, n1, n2, n3 = _x_step(x_row, group + GROUPS, end, pair_in_group)
        part = tl.zeros((CHUNK, GROUPS, ROWS, 8), dtype=tl.float32)
        for b in tl.static_range(4):  # byte b of every word: columns 8w + 2b (high nibble) and 8w + 2b + 1 (low)
            if X_AHEAD:
                if b == 0:
                    x_even, x_odd = _widen_pair(x0, X_FORMAT)
                elif b == 1:
                    x_even, x_odd = _widen_pair(x1, X_FORMAT)
                elif b == 2:
                    x_even, x_odd = _widen_pair(x2, X_FORMAT)
                else:
                    x_even, x_odd = _widen_pair(x3, X_FORMAT)
            else:
                pair = group[None, :, None, None] * 32 + pair_in_group + b
                x_even, x_odd = _x_pair(x_row, pair, g_mask[None, :, None, None], X_FORMAT)
            part += _code(table, code_ptr, words >> (8 * b + 4), SHUFFLE) * x_even
            part += _code(table, code_ptr, words >> (8 * b), SHUFFLE) * x_odd
        acc += part * scale[:, :, :, None]
        if AHEAD == 2:
            words, scale, words2, scale2 = words2, scale2, next_words, next_scale
        else:
            words, scale = next_words, next_scale
        if X_AHEAD:
            x0, x1, x2, x3 = n0, n1, n2, n3
    out = tl.sum(tl.sum(acc, axis=3), axis=1)  # (CHUNK, ROWS)
    if SPLIT_K == 1:
        _store_rows(out_ptr + row * stride_om, n, n_mask, out, GLU, GELU)
    else:
        tl.store(partial_ptr + (split * M + row) * N + n, out, mask=n_mask)
        if _arrives_last(count_ptr + row * tl.num_programs(0) + block, SPLIT_K):
            total = tl.zeros((CHUNK, ROWS), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(partial_ptr + (s * M + row) * N + n, mask=n_mask, cache_modifier=".cg")
            _store_rows(out_ptr + row * stride_om, n, n_mask, total, GLU, GELU)


@triton.jit
def _decode_column(table, code_ptr, words, scale, e: tl.constexpr, SHUFFLE: tl.constexpr):
    """W[n, 8w + e] for every word w of the tile, fp32 (BLOCK_N, GROUPS, 8): byte e // 2, high nibble if e is even."""
    return _code(table, code_ptr, words >> (8 * (e // 2) + 4 * (1 - e % 2)), SHUFFLE) * scale[:, :, None]


@triton.autotune(configs=_FEW_ROWS_CONFIGS, key=["N", "K_GROUPS", "M_PAD"])
@triton.jit
def _matmul_nf4_few_rows_kernel(x_ptr, words_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                                code_ptr, out_ptr, partial_ptr, count_ptr, M, N, K_GROUPS, stride_xm, stride_om,
                                NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, SHUFFLE: tl.constexpr,
                                PDL: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                                SPLIT_K: tl.constexpr):
    """out^T (BLOCK_N, M_PAD) = W tile (BLOCK_N, 64 GROUPS) @ x^T over one K split: W is the MMA's wide side.

    Split K as in `_gemv_nf4_kernel`: fp32 partials, the last program of a row block adds them in split order."""
    let_dependents_start(PDL)
    block, split = tl.program_id(0), tl.program_id(1)
    n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    m = tl.arange(0, M_PAD)
    m_mask = m < M
    g = tl.arange(0, GROUPS)
    table = _code_table(code_ptr, SHUFFLE)
    start, end = _split_range(split, K_GROUPS, GROUPS, SPLIT_K)
    acc = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)
    words, scale = _load_words(words_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, n, n_mask,
                               start + g, start + g < end, K_GROUPS, NESTED, NESTED_BLOCKSIZE)
    wait_for_inputs(PDL)
    for g0 in range(start, end, GROUPS):
        group = g0 + g
        next_words, next_scale = _load_words(words_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                                             n, n_mask, group + GROUPS, group + GROUPS < end, K_GROUPS, NESTED,
                                             NESTED_BLOCKSIZE)
        # the 8 columns of each word back in column order: tl.join appends a dimension, so the first join is the
        # slowest one: (BLOCK_N, GROUPS, 8 words, e // 4, e // 2 % 2, e % 2) -> (BLOCK_N, 64 GROUPS)
        c0 = _decode_column(table, code_ptr, words, scale, 0, SHUFFLE)
        c1 = _decode_column(table, code_ptr, words, scale, 1, SHUFFLE)
        c2 = _decode_column(table, code_ptr, words, scale, 2, SHUFFLE)
        c3 = _decode_column(table, code_ptr, words, scale, 3, SHUFFLE)
        c4 = _decode_column(table, code_ptr, words, scale, 4, SHUFFLE)
        c5 = _decode_column(table, code_ptr, words, scale, 5, SHUFFLE)
        c6 = _decode_column(table, code_ptr, words, scale, 6, SHUFFLE)
        c7 = _decode_column(table, code_ptr, words, scale, 7, SHUFFLE)
        even = tl.join(tl.join(c0, c4), tl.join(c2, c6))
        odd = tl.join(tl.join(c1, c5), tl.join(c3, c7))
        w_tile = tl.join(even, odd).reshape(BLOCK_N, GROUPS * 64)
        column = g0 * 64 + tl.arange(0, GROUPS * 64)
        x_tile = tl.load(x_ptr + m[None, :] * stride_xm + column[:, None],
                         mask=m_mask[None, :] & (column[:, None] < end * 64), other=0.0)  # (64 GROUPS, M_PAD)
        acc = tl.dot(w_tile.to(x_ptr.dtype.element_ty), x_tile, acc)  # W rounded to x's dtype, as dequantized
        words, scale = next_words, next_scale
    out = out_ptr + m[None, :] * stride_om + n[:, None]
    mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        partial = partial_ptr + m[None, :] * N + n[:, None]  # this split's (M, N) slice, transposed like `out`
        tl.store(partial + split * M * N, acc, mask=mask)
        if _arrives_last(count_ptr + block, SPLIT_K):
            total = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(partial + s * M * N, mask=mask, cache_modifier=".cg")
            tl.store(out, total.to(out_ptr.dtype.element_ty), mask=mask)


_buffers: dict[tuple, torch.Tensor] = {}


def _dequantize_into_buffer(state: NF4State, dtype: torch.dtype) -> torch.Tensor:
    """W dequantized into a buffer reused by every call with the same shape/dtype/device."""
    key = (tuple(state.shape), dtype, state.packed.device)
    if key not in _buffers:
        _buffers[key] = torch.empty(state.shape, dtype=dtype, device=state.packed.device)
    return dequantize_nf4(state, dtype, out=_buffers[key])


def _check_input(x: torch.Tensor, state: NF4State, width: int, who: str) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{who}: input dtype {x.dtype}; expected float16, bfloat16 or float32")
    if x.device != state.packed.device:
        raise ValueError(f"{who}: input is on {x.device}, the weight on {state.packed.device}")
    if x.dim() < 1 or x.shape[-1] != width:
        raise ValueError(f"{who}: input shape {list(x.shape)}; expected (..., {width}) for weight {list(state.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{who}: input is not contiguous (strides {x.stride()}); call .contiguous() first")
    check_state(state, x.device, who)
    if len(state.shape) != 2:
        raise ValueError(f"{who}: weight shape {list(state.shape)}; expected 2-D (out_features, in_features)")


def _words(state: NF4State) -> torch.Tensor | None:
    """`packed` as int32 words, or None where the decoding kernels cannot read it (K % 64, alignment)."""
    N, K = state.shape
    if K % 64 != 0 or state.packed.data_ptr() % 16 != 0:
        return None
    return state.packed.reshape(-1).view(torch.int32)


def matmul_nf4(x: torch.Tensor, state: NF4State) -> torch.Tensor:
    """x (..., K) @ W^T -> (..., N), W an NF4 weight (N, K) dequantized to x's dtype."""
    N, K = state.shape
    _check_input(x, state, K, "matmul_nf4")
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    words = _words(state)
    if words is not None and 0 < M <= SMALL_M:
        out = _gemv(x2, state, words)
    # fp32 x would need an IEEE tl.dot (tf32 otherwise); only tests and CPU runs use fp32
    elif words is not None and SMALL_M < M <= FEW_ROWS and x.dtype in (torch.float16, torch.bfloat16):
        out = _matmul_few_rows(x2, state, words)
    else:
        out = F.linear(x2, _dequantize_into_buffer(state, x.dtype))
    return out.reshape(*x.shape[:-1], N)


def matmul_nf4_glu(x: torch.Tensor, state: NF4State, activation: str) -> torch.Tensor:
    """act(x @ W_gate^T) * (x @ W_up^T) -> (..., F) for W (2F, K) = gate rows over up rows (a joined gate/up weight).

    activation "silu" (SwiGLU) or "gelu_tanh" (GeGLU). At M <= SMALL_M one launch: the GEMV whose epilogue applies
    the GLU, bit-identical to `matmul_nf4` then glu.py; otherwise those two. For decoding: no autograd."""
    N, K = state.shape
    _check_input(x, state, K, "matmul_nf4_glu")
    if activation not in GLU_ACTIVATIONS:
        raise ValueError(f"matmul_nf4_glu: activation {activation!r}; expected one of {GLU_ACTIVATIONS}")
    if N % 2:
        raise ValueError(f"matmul_nf4_glu: weight shape {list(state.shape)}; expected an even number of rows "
                         "(F gate rows over F up rows)")
    x2 = x.reshape(-1, K)
    words = _words(state)
    if words is not None and 0 < x2.shape[0] <= SMALL_M:
        return _gemv(x2, state, words, activation).reshape(*x.shape[:-1], N // 2)
    gate, up = matmul_nf4(x, state).split(N // 2, dim=-1)
    glu = swiglu_triton if activation == "silu" else geglu_triton
    return glu(gate.contiguous(), up.contiguous())


_split_k_workspaces: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _split_k_workspace(M: int, N: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partial sums (MAX_SPLIT_K, M, N) and zeroed arrival counters (M, N / MIN_BLOCK_N), reused per shape.

    Reuse is safe on one stream (a call finishes before the next starts, and leaves the counters at zero)."""
    key = (M, N, device)
    if key not in _split_k_workspaces:
        _split_k_workspaces[key] = (torch.empty(MAX_SPLIT_K * M * N, dtype=torch.float32, device=device),
                                    torch.zeros(M * triton.cdiv(N, MIN_BLOCK_N), dtype=torch.int32, device=device))
    return _split_k_workspaces[key]


def gemv_plan(M: int, N: int, K_GROUPS: int, sms: int) -> tuple[int, int]:
    """(SPLIT_K, AHEAD) for the GEMV of an (N, 64 K_GROUPS) weight and M rows of x on a GPU of `sms` SMs.

    Splits that fit every program in one wave (programs <= sms * GEMV_PROGRAMS_PER_SM[AHEAD]), so none starts
    late without its weights requested before the wait; of those the fewest loop steps a program, then
    AHEAD = 2 (each program's first two steps of words in flight before it waits for x). If no split fits,
    the fewest waves times steps. E.g. on 132 SMs: q/k/v (5120, 48) -> (3, 1), o (3072, 48) -> (3, 2),
    gate/up (16384, 48) -> (1, 1), down (3072, 128) -> (4, 2)."""
    GROUPS = GEMV_TILE["GROUPS"]
    blocks = M * triton.cdiv(N, GEMV_TILE["BLOCK_N"])
    best = None
    for ahead in (2, 1):
        for split in range(1, MAX_SPLIT_K + 1):
            per_split = triton.cdiv(triton.cdiv(K_GROUPS, split), GROUPS) * GROUPS
            used = triton.cdiv(K_GROUPS, per_split)  # splits that get groups; a higher count adds only empty ones
            if used < split:
                continue
            waves = triton.cdiv(blocks * split, sms * GEMV_PROGRAMS_PER_SM[ahead])
            cost = (waves > 1, waves * per_split // GROUPS)
            if best is None or cost < best[0]:
                best = (cost, split, ahead)
    return best[1], best[2]


def _x_ahead(x_format: int, nested: bool, ahead: int) -> bool:
    """Whether the GEMV loads 16-bit x a step ahead: not for fp32 x, and not where it would cost occupancy (sm_90,
    Triton 3.6: 128 -> 168 registers with a double-quantized absmax at AHEAD = 1; 128 with an fp32 absmax, and
    AHEAD = 2 at 167-168 either way)."""
    return X_AHEAD and x_format != 0 and not (nested and ahead == 1)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _gemv(x2: torch.Tensor, state: NF4State, words: torch.Tensor, glu: str | None = None,
          plan: tuple[int, int] | None = None) -> torch.Tensor:
    """x2 @ W^T (M, N), or with `glu` (an activation of GLU_ACTIVATIONS) act(gate) * up (M, N / 2). `plan`
    (SPLIT_K, AHEAD) overrides `gemv_plan` (tests, benchmarks); both modes of a weight get the same plan, hence
    the same sum order, so the fused gate/up + GLU stays bit-identical to the GEMV then the GLU kernel."""
    (M, K), N = x2.shape, state.shape[0]
    out = torch.empty((M, N // 2 if glu else N), dtype=x2.dtype, device=x2.device)
    x_format = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[x2.dtype]
    if x_format and x2.data_ptr() % 4:  # a view starting mid-pair cannot be read as int32 pairs
        x2 = x2.clone()
    x_arg = x2 if x_format == 0 else x2.view(torch.int32)  # 16-bit x read as column pairs
    if plan is None:
        plan = INTERPRET_PLAN if INTERPRET else gemv_plan(M, N, K // 64, _sm_count(x2.device))
    split_k, ahead = plan
    pdl = pdl_enabled(x2.device)
    per_block = 2 if glu else 1  # in GLU mode a block of BLOCK_N rows of W makes BLOCK_N / 2 outputs
    _gemv_nf4_kernel[(triton.cdiv(out.shape[1], GEMV_TILE["BLOCK_N"] // per_block), M, split_k)](
        x_arg, words, *nested_args(state), state.code, out, *_split_k_workspace(M, N, x2.device), M, N, K // 64,
        x_arg.stride(0), out.stride(0), X_FORMAT=x_format, NESTED=state.nested, NESTED_BLOCKSIZE=state.nested_blocksize,
        SHUFFLE=not INTERPRET, PDL=pdl, GLU=glu is not None, GELU=glu == "gelu_tanh",
        SPLIT_K=split_k, AHEAD=ahead, X_AHEAD=_x_ahead(x_format, state.nested, ahead), **GEMV_TILE,
        num_warps=GEMV_WARPS, num_stages=1,
        launch_pdl=pdl)
    return out


def _matmul_few_rows(x2: torch.Tensor, state: NF4State, words: torch.Tensor) -> torch.Tensor:
    (M, K), N = x2.shape, state.shape[0]
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
    pdl = pdl_enabled(x2.device)
    _matmul_nf4_few_rows_kernel[grid](x2, words, *nested_args(state), state.code, out,
                                      *_split_k_workspace(M, N, x2.device), M, N, K // 64, x2.stride(0),
                                      out.stride(0), NESTED=state.nested, NESTED_BLOCKSIZE=state.nested_blocksize,
                                      SHUFFLE=not INTERPRET, PDL=pdl, M_PAD=max(16, triton.next_power_of_2(M)),
                                      launch_pdl=pdl)
    return out


def matmul_nf4_t(g: torch.Tensor, state: NF4State) -> torch.Tensor:
    """g (..., N) @ W -> (..., K): the gradient of x @ W^T with respect to x."""
    N, K = state.shape
    _check_input(g, state, N, "matmul_nf4_t")
    return g @ _dequantize_into_buffer(state, g.dtype)
