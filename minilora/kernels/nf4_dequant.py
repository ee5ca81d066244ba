"""Triton NF4 dequantization: packed 4-bit weight (+ double-quantized absmax) -> fp16/bf16/fp32.

Formula (identical to the torch reference `minilora.nf4.dequantize_nf4`, bit for bit):
    absmax[b] = nested_code[qabsmax[b]] * nested_absmax[b // 256] + offset   (double quant), or absmax[b]
    w[i]      = (code[q[i]] * absmax[i // 64]).to(dtype)                      all in fp32, one cast
Layout: `packed` holds element 2j in the high nibble and 2j+1 in the low nibble of byte j, over the
row-major flattened weight; 64 elements (32 bytes) share one absmax.
Each program takes BLOCKS absmax blocks as a (BLOCKS, 32)-byte tile, so one scale is loaded per block,
and writes (BLOCKS, 64) outputs, the two nibbles interleaved back into element order (`tl.interleave`)
so the store is contiguous.
No fused multiply-add (`enable_fp_fusion=False`): bitsandbytes rounds the multiply and the add
separately, and so does the reference, so the results are equal, not just close.
Test: tests/test_nf4_kernels.py. Benchmark: benchmarks/kernels.py.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from minilora.nf4 import MAX_NUMEL, NF4State

# An H100 80GB needs ~16 KB in flight per SM; 32 blocks = 1 KB of packed bytes per program, 4 warps.
BLOCKS_PER_PROGRAM = 32
NUM_WARPS = 4


@triton.jit
def _dequantize_nf4_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
                           out_ptr, numel, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                           BLOCKS: tl.constexpr):
    block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)  # absmax blocks of 64 elements = 32 bytes
    byte = block[:, None] * 32 + tl.arange(0, 32)[None, :]  # (BLOCKS, 32)
    n_bytes = (numel + 1) // 2
    q = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0).to(tl.int32)
    scale = _absmax(block, block * 32 < n_bytes, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                    NESTED, NESTED_BLOCKSIZE)[:, None]
    high = tl.load(code_ptr + (q >> 4)) * scale  # elements 2j
    low = tl.load(code_ptr + (q & 15)) * scale  # elements 2j + 1
    values = tl.interleave(high, low)  # (BLOCKS, 64) in element order
    index = block[:, None] * 64 + tl.arange(0, 64)[None, :]
    tl.store(out_ptr + index, values.to(out_ptr.dtype.element_ty), mask=index < numel)


@triton.jit
def _absmax(block, mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
            NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 absmax of the 64-element blocks `block` (undoing the double quantization). Shared with nf4_matmul."""
    if NESTED:
        qabs = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        absmax = tl.load(nested_code_ptr + qabs) * nested + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return absmax


def check_state(state: NF4State, device: torch.device, who: str) -> None:
    """Raise ValueError (with the numbers) unless `state` is a well-formed NF4 weight on `device`."""
    numel = state.numel
    blocks = -(-numel // state.blocksize)
    tensors = {"packed": state.packed, "absmax": state.absmax, "code": state.code}
    if state.nested:
        tensors.update(nested_absmax=state.nested_absmax, nested_code=state.nested_code, offset=state.offset)
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{who}: {name} is on {t.device}, expected {device}")
        if not t.is_contiguous():
            raise ValueError(f"{who}: {name} is not contiguous (strides {t.stride()})")
    if numel > MAX_NUMEL:
        raise ValueError(f"{who}: weight has {numel} elements; the kernels index with int32 (max {MAX_NUMEL})")
    if state.blocksize != 64:
        raise ValueError(f"{who}: blocksize {state.blocksize}; the kernels support 64")
    if state.packed.dtype != torch.uint8 or state.packed.numel() != (numel + 1) // 2:
        raise ValueError(f"{who}: packed is {state.packed.dtype} with {state.packed.numel()} bytes; expected uint8 "
                         f"with {(numel + 1) // 2} bytes for shape {list(state.shape)}")
    if state.absmax.numel() != blocks:
        raise ValueError(f"{who}: absmax has {state.absmax.numel()} values; expected ceil({numel} / 64) = {blocks}")
    if state.code.numel() != 16 or state.code.dtype != torch.float32:
        raise ValueError(f"{who}: code is {state.code.dtype} with {state.code.numel()} values; expected 16 float32")
    expected_absmax_dtype = torch.uint8 if state.nested else torch.float32
    if state.absmax.dtype != expected_absmax_dtype:
        raise ValueError(f"{who}: absmax dtype {state.absmax.dtype}; expected {expected_absmax_dtype}")
    if state.nested:
        groups = -(-blocks // state.nested_blocksize)
        if state.nested_absmax.numel() != groups or state.nested_code.numel() != 256:
            raise ValueError(f"{who}: nested_absmax has {state.nested_absmax.numel()} values (expected {groups}), "
                             f"nested_code {state.nested_code.numel()} (expected 256)")


def nested_args(state: NF4State):
    """Kernel pointer arguments for the absmax; unused ones point at `absmax` (never read)."""
    if state.nested:
        return state.absmax, state.nested_absmax, state.nested_code, state.offset.reshape(1)
    return state.absmax, state.absmax, state.absmax, state.absmax


def dequantize_nf4(state: NF4State, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of `minilora.nf4.dequantize_nf4`: the weight as a `dtype` tensor of `state.shape`.

    out: optional preallocated contiguous tensor of that shape and dtype, overwritten (used as a
    reusable buffer by the large-M matmul).
    """
    dtype = dtype or state.dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dequantize_nf4: dtype {dtype}; expected float16, bfloat16 or float32")
    device = state.packed.device
    check_state(state, device, "dequantize_nf4")
    if out is None:
        out = torch.empty(state.shape, dtype=dtype, device=device)
    elif out.shape != state.shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"dequantize_nf4: out is {out.dtype} {list(out.shape)} on {out.device} "
                         f"(contiguous={out.is_contiguous()}); expected contiguous {dtype} {list(state.shape)} "
                         f"on {device}")
    grid = (triton.cdiv(state.numel, 64 * BLOCKS_PER_PROGRAM),)
    _dequantize_nf4_kernel[grid](state.packed, *nested_args(state), state.code, out, state.numel,
                                 NESTED=state.nested, NESTED_BLOCKSIZE=state.nested_blocksize,
                                 BLOCKS=BLOCKS_PER_PROGRAM, num_warps=NUM_WARPS, enable_fp_fusion=False)
    return out


# ---- dequantization with a LoRA update folded in: W + s * B @ A, for the fused LoRA linear ----

if os.environ.get("TRITON_INTERPRET") == "1":
    _LORA_CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_K": 128})]
else:  # H200, Llama-3.2-3B shapes
    _LORA_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
                     for n, k, w in [(32, 128, 4), (32, 256, 4), (64, 64, 4)]]


def dequantize_nf4_lora_reference(state: NF4State, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                                  dtype: torch.dtype) -> torch.Tensor:
    """W + scaling * B @ A in `dtype` (plain torch): the NF4 weight dequantized in fp32, the update in float64,
    added in fp32 and rounded once."""
    from minilora.nf4 import dequantize_nf4 as dequantize_torch

    delta = (lora_B.double() @ lora_A.double()) * scaling
    return (dequantize_torch(state, torch.float32) + delta.float()).to(dtype)


@triton.jit
def _decode_tile(rows, tile, N, K, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
                 NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[rows, tile * BLOCK_K : (tile + 1) * BLOCK_K] in fp32 (K % 64 == 0: rows are whole absmax blocks), read as
    (BLOCK_N, BLOCK_K // 64, 32) bytes so each block's scale is loaded once. Also used by benchmarks/dequant_lora.py."""
    GROUPS: tl.constexpr = BLOCK_K // 64
    groups = tile * GROUPS + tl.arange(0, GROUPS)  # absmax blocks along the row
    block = rows[:, None] * (K // 64) + groups[None, :]  # (BLOCK_N, GROUPS)
    block_mask = (rows < N)[:, None] & (groups < K // 64)[None, :]
    byte = block[:, :, None] * 32 + tl.arange(0, 32)[None, None, :]  # (BLOCK_N, GROUPS, 32)
    q = tl.load(packed_ptr + byte, mask=block_mask[:, :, None], other=0).to(tl.int32)
    scale = _absmax(block, block_mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                    NESTED, NESTED_BLOCKSIZE)[:, :, None]
    high = tl.load(code_ptr + (q >> 4)) * scale
    low = tl.load(code_ptr + (q & 15)) * scale
    return tl.reshape(tl.interleave(high, low), (BLOCK_N, BLOCK_K))  # element order along the row


@triton.autotune(configs=_LORA_CONFIGS, key=["N", "K", "R"])
@triton.jit
def _dequantize_nf4_lora_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
                                a_ptr, b_ptr, out_ptr, N, K, R, scaling,
                                NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, BLOCK_R: tl.constexpr,
                                PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = _decode_tile(rows, tl.program_id(1), N, K, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                     offset_ptr, code_ptr, NESTED, NESTED_BLOCKSIZE, BLOCK_N, BLOCK_K)
    # the rank-R update of this tile on the tensor cores: (BLOCK_N, R) @ (R, BLOCK_K), R padded with zeros
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, BLOCK_R)
    b = tl.load(b_ptr + rows[:, None] * R + ranks[None, :], mask=(rows < N)[:, None] & (ranks < R)[None, :], other=0.0)
    a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :], mask=(ranks < R)[:, None] & (cols < K)[None, :], other=0.0)
    if PRECISION == "ieee":  # fp32 output: the update summed alone, then added once (see below)
        w += tl.dot(b, a * scaling, input_precision=PRECISION)
    else:  # the decoded tile as the dot's accumulator: one layout change instead of converting the dot's result
        # (35 vs 38 us at 3072 x 8192 on an H200, benchmarks/dequant_lora.py; the decode alone takes 23). The
        # running sum then rounds r times at W's magnitude in fp32: far below the 16-bit output's rounding.
        w = tl.dot(b, a * scaling, acc=w, input_precision=PRECISION)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_nf4_lora(state: NF4State, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                        dtype: torch.dtype) -> torch.Tensor:
    """W + scaling * lora_B @ lora_A as a new `dtype` tensor (N, K), W the NF4 weight: the merged weight the fused
    LoRA linear multiplies by, so the LoRA branch costs no pass over the (tokens, N) output.

    lora_A (R, K) and lora_B (N, R) fp32, contiguous, on W's device. Needs K % 64 == 0 (rows made of whole absmax
    blocks). The update runs as tf32 on the tensor cores for fp16/bf16 output (operands truncated to 10 bits: up
    to 2^-9 of |B| |A|, below the output's rounding unless B A is as large as W) and in full fp32 for fp32
    output. B = 0 gives exactly `dequantize_nf4`.
    """
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dequantize_nf4_lora: dtype {dtype}; expected float16, bfloat16 or float32")
    device = state.packed.device
    check_state(state, device, "dequantize_nf4_lora")
    if len(state.shape) != 2 or state.shape[1] % 64:
        raise ValueError(f"dequantize_nf4_lora: weight shape {list(state.shape)}; needs 2-D with K % 64 == 0")
    n, k = state.shape
    r = lora_A.shape[0]
    for name, t, shape in (("lora_A", lora_A, (r, k)), ("lora_B", lora_B, (n, r))):
        if tuple(t.shape) != shape or t.dtype != torch.float32 or t.device != device or not t.is_contiguous():
            raise ValueError(f"dequantize_nf4_lora: {name} is {t.dtype} {list(t.shape)} on {t.device} "
                             f"(contiguous={t.is_contiguous()}); expected contiguous float32 {list(shape)} on {device}")
    out = torch.empty((n, k), dtype=dtype, device=device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))  # noqa: E731
    _dequantize_nf4_lora_kernel[grid](state.packed, *nested_args(state), state.code, lora_A, lora_B, out, n, k, r,
                                      float(scaling), NESTED=state.nested, NESTED_BLOCKSIZE=state.nested_blocksize,
                                      BLOCK_R=max(16, triton.next_power_of_2(r)),
                                      PRECISION="ieee" if dtype == torch.float32 else "tf32", enable_fp_fusion=False)
    return out
