"""4-bit matmuls with an NF4 weight W (N, K): y = x @ W^T (forward) and g @ W (input gradient).

Reference (plain torch, below): `matmul_nf4_reference` = F.linear(x, dequantize_nf4(W)).
Two paths, picked by the number of rows M of x:
  - M <= SMALL_M (decoding): one fused GEMV kernel reads each packed byte once and dequantizes it in
    registers. A byte holds W[n, 2j] (high nibble) and W[n, 2j+1] (low), so x is read as its even and
    odd columns: y[m, n] = sum_groups s[n, group] * sum_j (code[hi] x[m, 2j] + code[lo] x[m, 2j+1]).
    The weight streams as (BLOCK_N rows) x (BLOCK_K // 64 absmax groups) x 32 bytes; the scale is
    applied once per 64-group, after its sum. One program per (BLOCK_N rows, row of x): for M > 1 the
    weight is re-read from L2. Needs K % 64 == 0 (every Llama/Qwen/Gemma/Phi width is), else large-M.
  - larger M: dequantize W into a buffer reused across calls (`kernels/nf4_dequant.py`), then cuBLAS.
    The buffer is per (shape, dtype, device) and only read by the matmul that follows on the same
    stream, so reuse is safe; it is never returned or saved for backward.
  A tl.dot variant of the fused kernel for 2..16 rows was 3-8x slower than dequant + cuBLAS on an
  H100 (benchmarks/RESULTS.md) and was removed.
g @ W (backward) always takes the dequant + cuBLAS path: training has large M.
Test: tests/test_nf4_kernels.py. Benchmark: benchmarks/kernels.py (numbers in benchmarks/RESULTS.md).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.nf4_dequant import _absmax, check_state, dequantize_nf4, nested_args
from minilora.nf4 import NF4State
from minilora.nf4 import dequantize_nf4 as dequantize_nf4_reference

# Up to this many rows use the fused GEMV. H100 (benchmarks/RESULTS.md): its time grows ~linearly with M
# (13 us at M=1, 99 us at M=16 for 3072x3072), crossing dequant + cuBLAS (25 us) near M=3.
SMALL_M = 2

# Autotune space for an H100 80GB at Llama-3.2-3B shapes; the CPU interpreter gets one small config.
if os.environ.get("TRITON_INTERPRET") == "1":
    _CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_K": 128})]
else:
    _CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                for n, k, w, s in [(2, 1024, 4, 3), (4, 512, 4, 3), (4, 1024, 4, 2), (8, 512, 4, 3),
                                   (8, 1024, 8, 2), (8, 1024, 8, 3), (16, 256, 4, 3), (16, 512, 4, 3),
                                   (16, 512, 8, 3), (32, 256, 4, 3), (32, 512, 8, 2), (64, 256, 8, 2)]]


def matmul_nf4_reference(x: torch.Tensor, state: NF4State) -> torch.Tensor:
    """x @ W^T with W dequantized to x's dtype (plain torch)."""
    return F.linear(x, dequantize_nf4_reference(state, x.dtype))


def matmul_nf4_t_reference(g: torch.Tensor, state: NF4State) -> torch.Tensor:
    """g @ W with W dequantized to g's dtype (plain torch): the input gradient of x @ W^T."""
    return g @ dequantize_nf4_reference(state, g.dtype)


@triton.autotune(configs=_CONFIGS, key=["N", "K"])
@triton.jit
def _matmul_nf4_small_m_kernel(x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                               code_ptr, out_ptr, N, K, stride_xm, stride_om,
                               NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    GROUPS: tl.constexpr = BLOCK_K // 64  # absmax groups of 64 columns (32 bytes) per step
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_row = x_ptr + tl.program_id(1) * stride_xm
    g = tl.arange(0, GROUPS)
    i = tl.arange(0, 32)
    n_mask = n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        group = k0 // 64 + g  # (GROUPS,) absmax group within the row
        g_mask = group < K // 64
        byte = n[:, None, None] * (K // 2) + group[None, :, None] * 32 + i[None, None, :]
        q = tl.load(packed_ptr + byte, mask=n_mask[:, None, None] & g_mask[None, :, None], other=0).to(tl.int32)
        scale = _absmax(n[:, None] * (K // 64) + group[None, :], n_mask[:, None] & g_mask[None, :],
                        absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, NESTED, NESTED_BLOCKSIZE)
        # this step's 64-column groups of x, read contiguously, split into the even columns (paired with
        # the high nibbles) and the odd ones; faster on an H100 than two stride-2 loads
        column = group[:, None] * 64 + tl.arange(0, 64)[None, :]  # (GROUPS, 64)
        x_tile = tl.load(x_row + column, mask=g_mask[:, None], other=0.0).to(tl.float32)
        x_even, x_odd = tl.split(tl.reshape(x_tile, (GROUPS, 32, 2)))  # each (GROUPS, 32)
        high = tl.load(code_ptr + (q >> 4))  # (BLOCK_N, GROUPS, 32): W[n, 2j] / scale
        low = tl.load(code_ptr + (q & 15))  # W[n, 2j + 1] / scale
        per_group = tl.sum(high * x_even[None, :, :] + low * x_odd[None, :, :], axis=2)  # (BLOCK_N, GROUPS)
        acc += tl.sum(per_group * scale, axis=1)
    tl.store(out_ptr + tl.program_id(1) * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


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


def matmul_nf4(x: torch.Tensor, state: NF4State) -> torch.Tensor:
    """x (..., K) @ W^T -> (..., N), W an NF4 weight (N, K) dequantized to x's dtype."""
    N, K = state.shape
    _check_input(x, state, K, "matmul_nf4")
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M > SMALL_M or K % 64 != 0 or M == 0:
        return F.linear(x, _dequantize_into_buffer(state, x.dtype))
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M)  # noqa: E731
    _matmul_nf4_small_m_kernel[grid](x2, state.packed, *nested_args(state), state.code, out, N, K,
                                     x2.stride(0), out.stride(0), NESTED=state.nested,
                                     NESTED_BLOCKSIZE=state.nested_blocksize)
    return out.reshape(*x.shape[:-1], N)


def matmul_nf4_t(g: torch.Tensor, state: NF4State) -> torch.Tensor:
    """g (..., N) @ W -> (..., K): the gradient of x @ W^T with respect to x."""
    N, K = state.shape
    _check_input(g, state, N, "matmul_nf4_t")
    return g @ _dequantize_into_buffer(state, g.dtype)
