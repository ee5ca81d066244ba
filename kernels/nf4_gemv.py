"""Fused NF4 dequant + GEMV/GEMM for decoding: y = x @ W^T for a few rows of x (M <= MAX_M), W (N, K) in NF4.

Reference: `kernels.nf4_matmul.matmul_nf4_reference` (dequantize, then F.linear).
Why a second small-M kernel (nf4_matmul.py's first one is kept as the "gather" variant): decoding is bound by
reading the packed weight, so each byte must be read once per step, whatever the batch, and turned into two
weights with as few instructions as possible.
  - one program reads a (BLOCK_N rows x BLOCK_K columns) tile of W ONCE and multiplies it with all M rows of
    x (M padded to BLOCK_M), so a batch of 8 decoding rows costs one pass over the weight, not eight;
  - LUT="pair": a byte is decoded with one 8-byte load from a 256-entry table whose entry b holds the fp32
    codes of both its nibbles (code[b >> 4] in the high word, code[b & 15] in the low word), split by two
    bitcasts, instead of two 4-byte gathers from the 16-entry code. LUT="gather" is the two-gather decoding.
    Both give exactly the reference's fp32 code values; the scale is applied once per 64-group, after its sum.
Layout as nf4_matmul.py: byte j of row n holds W[n, 2j] (high nibble) and W[n, 2j+1] (low); needs K % 64 == 0.
Test: tests/test_nf4_kernels.py. Benchmark: benchmarks/kernels.py.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.nf4_dequant import _absmax, nested_args

MAX_M = 16  # rows of x one program multiplies with its weight tile; beyond, dequant + cuBLAS wins

if os.environ.get("TRITON_INTERPRET") == "1":
    _CONFIGS = [triton.Config({"BLOCK_N": 8, "BLOCK_K": 128})]
else:
    _CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                for n, k, w, s in [(2, 512, 4, 3), (4, 256, 4, 3), (4, 512, 4, 3), (8, 256, 4, 3), (8, 512, 8, 3),
                                   (16, 128, 4, 3), (16, 256, 8, 3), (32, 128, 8, 3), (8, 128, 4, 4), (4, 1024, 8, 2)]]


def _prune(configs, named_args, **kwargs):
    """Keep tiles whose (BLOCK_M x BLOCK_N x BLOCK_K) product fits the registers of the chosen warps."""
    bm = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 1))
    kept = [c for c in configs if bm * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] // 2 <= 64 * 32 * c.num_warps]
    return kept or configs[:1]


@triton.autotune(configs=_CONFIGS, key=["N", "K", "BLOCK_M", "LUT"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _gemv_kernel(x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, pair_ptr,
                 out_ptr, M, N, K, stride_xm, stride_om,
                 NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, LUT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    GROUPS: tl.constexpr = BLOCK_K // 64
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    g = tl.arange(0, GROUPS)
    i = tl.arange(0, 32)
    n_mask, m_mask = n < N, m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        group = k0 // 64 + g
        g_mask = group < K // 64
        byte = n[:, None, None] * (K // 2) + group[None, :, None] * 32 + i[None, None, :]
        q = tl.load(packed_ptr + byte, mask=n_mask[:, None, None] & g_mask[None, :, None], other=0).to(tl.int32)
        if LUT == "pair":
            both = tl.load(pair_ptr + q)  # int64: code[q >> 4] bits << 32 | code[q & 15] bits
            high = (both >> 32).to(tl.int32).to(tl.float32, bitcast=True)
            low = both.to(tl.int32).to(tl.float32, bitcast=True)
        else:
            high = tl.load(code_ptr + (q >> 4))
            low = tl.load(code_ptr + (q & 15))
        scale = _absmax(n[:, None] * (K // 64) + group[None, :], n_mask[:, None] & g_mask[None, :],
                        absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, NESTED, NESTED_BLOCKSIZE)
        column = group[:, None] * 64 + tl.arange(0, 64)[None, :]  # (GROUPS, 64)
        x_tile = tl.load(x_ptr + m[:, None, None] * stride_xm + column[None, :, :],
                         mask=m_mask[:, None, None] & g_mask[None, :, None], other=0.0).to(tl.float32)
        x_even, x_odd = tl.split(tl.reshape(x_tile, (BLOCK_M, GROUPS, 32, 2)))  # each (BLOCK_M, GROUPS, 32)
        prod = high[None, :, :, :] * x_even[:, None, :, :] + low[None, :, :, :] * x_odd[:, None, :, :]
        per_group = tl.sum(prod, axis=3)  # (BLOCK_M, BLOCK_N, GROUPS)
        acc += tl.sum(per_group * scale[None, :, :], axis=2)
    out = out_ptr + m[:, None] * stride_om + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


_pair_tables: dict[tuple, torch.Tensor] = {}


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """(256,) int64: entry b = fp32 bits of code[b >> 4] in the high word, of code[b & 15] in the low word."""
    key = (code.device, code.data_ptr(), code._version)
    if key not in _pair_tables:
        bits = code.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        b = torch.arange(256, device=code.device)
        _pair_tables[key] = (bits[b >> 4] << 32) | bits[b & 15]
    return _pair_tables[key]


def gemv_nf4(x2: torch.Tensor, state, lut: str = "pair") -> torch.Tensor:
    """x2 (M, K), M <= MAX_M, contiguous; W (N, K) NF4 with K % 64 == 0 -> (M, N) in x2's dtype.
    Callers check shapes and devices (kernels.nf4_matmul.matmul_nf4)."""
    M, K = x2.shape
    N = state.shape[0]
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    block_m = max(1, triton.next_power_of_2(M))
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _gemv_kernel[grid](x2, state.packed, *nested_args(state), state.code, pair_table(state.code), out, M, N, K,
                       x2.stride(0), out.stride(0), NESTED=state.nested, NESTED_BLOCKSIZE=state.nested_blocksize,
                       LUT=lut, BLOCK_M=block_m)
    return out
