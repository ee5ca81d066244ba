"""The LoRA weight gradients of y = x W^T + s (x A^T) B^T in two Triton launches, fp32 out.

Formula (minilora/kernels/lora.py derives it), x (M, K), g = dL/dy (M, N), A (r, K), B (N, r), fp32 A and B:

    launch 1 (`_lora_grad_inputs_kernel`):   xa_s = s x A^T   (M, r),   dxa = s g B   (M, r)
    launch 2 (`_lora_grad_weights_kernel`):  dB = g^T xa_s    (N, r),   dA = dxa^T x  (r, K)

Why: built from torch ops this is four skinny cuBLAS GEMMs (most with a split-K reduction kernel), two casts of A
and B to the compute dtype and two scalings: ~12 small kernels a layer, whose launch gaps cost as much as their
work inside a CUDA-graph training step. Here each launch reads x and g once, A and B are read as fp32 and rounded
to x's dtype in registers, and the gradients are written in fp32 straight from the fp32 accumulators.

Layout: x and g contiguous (rows of M), any float dtype (both the same); the matmuls run on the tensor cores in
that dtype (fp32 x: IEEE fp32) with fp32 accumulation; xa_s and dxa are kept in fp32 and rounded to x's dtype
when they enter launch 2, as the torch path rounds them. Launch 1: one program per BLOCK_M rows and product;
launch 2: one program per BLOCK tile of N (dB) or of K (dA) and quarter of the rows, the four partial sums
added in a fixed order after it: no atomics, so the result does not depend on scheduling. r is padded to a
power of two >= 16 with zeros.
Reference: `lora_grads_reference` (float64). Test: tests/test_lora_backward.py. Used by minilora/kernels/lora.py.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

SPLITS = 4  # row splits of launch 2 (an H200 has 132 SMs; ~100 column tiles at 3072 wide)

if os.environ.get("TRITON_INTERPRET") == "1":
    _CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK": 32})]
else:  # H200, Llama-3.2-3B shapes (8 x 512 tokens)
    _CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK": b}, num_warps=w, num_stages=s)
                for m, b, w, s in [(32, 128, 4, 3), (64, 128, 4, 3), (32, 256, 4, 3), (64, 64, 4, 4), (128, 64, 4, 3)]]


def lora_grads_reference(x, g, lora_A, lora_B, scaling):
    """(dA, dB) in float64: dA = s (g B)^T x, dB = s g^T (x A^T)."""
    x, g, a, b = x.double(), g.double(), lora_A.double(), lora_B.double()
    return scaling * (g @ b).t() @ x, scaling * g.t() @ (x @ a.t())


@triton.autotune(configs=_CONFIGS, key=["M", "K", "N", "R"])
@triton.jit
def _lora_grad_inputs_kernel(x_ptr, g_ptr, a_ptr, b_ptr, xa_ptr, dxa_ptr, M, K, N, R, scaling,
                             BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    inner = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if tl.program_id(1) == 0:  # xa_s = s x A^T: the inner dimension is K, A read as (BLOCK, R) = A^T's tile
        for k0 in tl.range(0, K, BLOCK):
            k_cols = k0 + inner
            x = tl.load(x_ptr + rows[:, None] * K + k_cols[None, :],
                        mask=(rows < M)[:, None] & (k_cols < K)[None, :], other=0.0)
            a_t = tl.load(a_ptr + ranks[None, :] * K + k_cols[:, None],
                          mask=(k_cols < K)[:, None] & (ranks < R)[None, :], other=0.0)
            acc = tl.dot(x, a_t.to(x.dtype), acc, input_precision=PRECISION)
        out_ptr = xa_ptr
    else:  # dxa = s g B: the inner dimension is N
        for n0 in tl.range(0, N, BLOCK):
            n_cols = n0 + inner
            g = tl.load(g_ptr + rows[:, None] * N + n_cols[None, :],
                        mask=(rows < M)[:, None] & (n_cols < N)[None, :], other=0.0)
            b = tl.load(b_ptr + n_cols[:, None] * R + ranks[None, :],
                        mask=(n_cols < N)[:, None] & (ranks < R)[None, :], other=0.0)
            acc = tl.dot(g, b.to(g.dtype), acc, input_precision=PRECISION)
        out_ptr = dxa_ptr
    mask = (rows < M)[:, None] & (ranks < R)[None, :]
    tl.store(out_ptr + rows[:, None] * R + ranks[None, :], acc * scaling, mask=mask)


@triton.autotune(configs=_CONFIGS, key=["M", "K", "N", "R"])
@triton.jit
def _lora_grad_weights_kernel(x_ptr, g_ptr, xa_ptr, dxa_ptr, da_ptr, db_ptr, M, K, N, R,
                              BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK)
    ranks = tl.arange(0, BLOCK_R)
    steps = tl.arange(0, BLOCK_M)
    # this program's share of the rows (split across grid axis 1; the caller sums the partial results)
    chunk = tl.cdiv(tl.cdiv(M, tl.num_programs(1)), BLOCK_M) * BLOCK_M
    m_start = tl.program_id(1) * chunk
    m_end = tl.minimum(m_start + chunk, M)
    da_ptr += tl.program_id(1) * R * K
    db_ptr += tl.program_id(1) * N * R
    # (each branch names its own variables: the compiler unifies same-named ones across the branches)
    if pid < n_tiles:  # dB[n_cols] = g[:, n_cols]^T xa_s, reduced over all M rows
        n_cols = pid * BLOCK + tl.arange(0, BLOCK)
        acc_b = tl.zeros((BLOCK, BLOCK_R), dtype=tl.float32)
        for m0 in tl.range(m_start, m_end, BLOCK_M):
            g_rows = m0 + steps
            g = tl.load(g_ptr + g_rows[:, None] * N + n_cols[None, :],
                        mask=(g_rows < m_end)[:, None] & (n_cols < N)[None, :], other=0.0)
            xa = tl.load(xa_ptr + g_rows[:, None] * R + ranks[None, :],
                         mask=(g_rows < m_end)[:, None] & (ranks < R)[None, :], other=0.0)
            acc_b = tl.dot(tl.trans(g), xa.to(g.dtype), acc_b, input_precision=PRECISION)
        tl.store(db_ptr + n_cols[:, None] * R + ranks[None, :], acc_b,
                 mask=(n_cols < N)[:, None] & (ranks < R)[None, :])
    else:  # dA[:, k_cols] = dxa^T x[:, k_cols]
        k_cols = (pid - n_tiles) * BLOCK + tl.arange(0, BLOCK)
        acc_a = tl.zeros((BLOCK_R, BLOCK), dtype=tl.float32)
        for m0 in tl.range(m_start, m_end, BLOCK_M):
            x_rows = m0 + steps
            x = tl.load(x_ptr + x_rows[:, None] * K + k_cols[None, :],
                        mask=(x_rows < m_end)[:, None] & (k_cols < K)[None, :], other=0.0)
            dxa = tl.load(dxa_ptr + x_rows[:, None] * R + ranks[None, :],
                          mask=(x_rows < m_end)[:, None] & (ranks < R)[None, :], other=0.0)
            acc_a = tl.dot(tl.trans(dxa.to(x.dtype)), x, acc_a, input_precision=PRECISION)
        tl.store(da_ptr + ranks[:, None] * K + k_cols[None, :], acc_a,
                 mask=(ranks < R)[:, None] & (k_cols < K)[None, :])


def _check(x, g, lora_A, lora_B):
    if x.dim() != 2 or g.dim() != 2 or x.shape[0] != g.shape[0]:
        raise ValueError(f"lora_grads: x {tuple(x.shape)} and g {tuple(g.shape)} must be (M, K) and (M, N)")
    (m, k), n, r = x.shape, g.shape[1], lora_A.shape[0]
    for name, t, shape, dtype in (("x", x, (m, k), x.dtype), ("g", g, (m, n), x.dtype),
                                  ("lora_A", lora_A, (r, k), torch.float32), ("lora_B", lora_B, (n, r), torch.float32)):
        if tuple(t.shape) != shape or t.dtype != dtype or t.device != x.device or not t.is_contiguous():
            raise ValueError(f"lora_grads: {name} is {t.dtype} {list(t.shape)} on {t.device} (contiguous="
                             f"{t.is_contiguous()}); expected contiguous {dtype} {list(shape)} on {x.device}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"lora_grads: x dtype {x.dtype}; expected float16, bfloat16 or float32")
    if max(m * max(k, n), r * max(k, n)) >= 2**31:
        raise ValueError(f"lora_grads: {m} rows x {max(k, n)} columns; the kernels index with int32")


def lora_grads(x: torch.Tensor, g: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
               scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dA (r, K), dB (N, r)), fp32, of y = x W^T + s (x A^T) B^T given g = dL/dy; same formula as
    `lora_grads_reference`. x (M, K) and g (M, N) contiguous in one float dtype; A (r, K), B (N, r) fp32."""
    _check(x, g, lora_A, lora_B)
    (m, k), n, r = x.shape, g.shape[1], lora_A.shape[0]
    block_r = max(16, triton.next_power_of_2(r))
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # (tf32 is unused for 16-bit inputs)
    xa = torch.empty(m, r, dtype=torch.float32, device=x.device)
    dxa = torch.empty(m, r, dtype=torch.float32, device=x.device)
    _lora_grad_inputs_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), 2)](
        x, g, lora_A, lora_B, xa, dxa, m, k, n, r, float(scaling), BLOCK_R=block_r, PRECISION=precision)
    # dA and dB reduce over all M rows: with ~50-100 column tiles at these widths that is too few programs to
    # fill the card, so the rows are split SPLITS ways and the partial sums added (deterministically) after
    grad_A = torch.empty(SPLITS, r, k, dtype=torch.float32, device=x.device)
    grad_B = torch.empty(SPLITS, n, r, dtype=torch.float32, device=x.device)
    _lora_grad_weights_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]) + triton.cdiv(k, meta["BLOCK"]), SPLITS)](
        x, g, xa, dxa, grad_A, grad_B, m, k, n, r, BLOCK_R=block_r, PRECISION=precision)
    return grad_A.sum(0), grad_B.sum(0)
