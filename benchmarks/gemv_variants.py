"""Experiments on the 4-bit decode GEMV, timed as a decode step streams them (benchmarks/gemv.py's CUDA graph
over 28 distinct weights). None of these kernels is used by minilora; they are kept so the measurements in
benchmarks/RESULTS.md ("Decode GEMV experiments") can be rerun.

    python benchmarks/gemv_variants.py --table variants     # 3-D accumulator, strided x, all-rows kernel, M = 1..8
    python benchmarks/gemv_variants.py --table diagnostics  # what bounds the GEMV: table, no table, bytes only
    python benchmarks/gemv_variants.py --table dot          # a tl.dot kernel for M = 1..32
    python benchmarks/gemv_variants.py --table dot2         # two tl.dot per step (even/odd columns), M = 1..64

Variants: `acc3d` accumulates per element and reduces once at the end (instead of per step); `strided x`
loads x's even and odd columns with two stride-2 loads; `rows` reads each weight byte once for all M rows;
`pair` looks a whole byte up in a 256-entry table of two fp32 bit patterns (one 8-byte gather instead of two
4-byte ones); diagnostic modes `no-table` (nibbles converted to float, wrong values) and `bytes-only` (sums
the bytes) bound what decoding the nibbles costs.
"""
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minilora.kernels.nf4_dequant import _absmax, nested_args  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET") == "1"


def _configs():
    if INTERP:
        return [triton.Config({"BLOCK_N": 4, "BLOCK_K": 128})]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for n, k, w, s in [(2, 1024, 4, 3), (4, 512, 4, 3), (4, 1024, 4, 3), (8, 512, 4, 3), (8, 256, 4, 4),
                               (8, 1024, 8, 3), (16, 256, 4, 3), (16, 512, 8, 3), (4, 256, 2, 4), (2, 512, 2, 4),
                               (32, 128, 4, 4), (16, 128, 4, 4), (1, 1024, 4, 4), (2, 2048, 8, 3)]]


def _configs_m():
    if INTERP:
        return [triton.Config({"BLOCK_N": 4, "BLOCK_K": 128})]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for n, k, w, s in [(2, 256, 4, 3), (4, 256, 4, 3), (4, 512, 4, 3), (8, 256, 4, 3), (8, 128, 4, 4),
                               (2, 512, 4, 3), (16, 128, 4, 3), (4, 128, 2, 4), (1, 512, 4, 3), (8, 256, 8, 3)]]


@triton.jit
def _tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, n, n_mask, group, g_mask, K,
          NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """The packed bytes (rows n, 64-column groups `group`, 32 bytes each) as int32, and each group's absmax."""
    i = tl.arange(0, 32)
    byte = n[:, None, None] * (K // 2) + group[None, :, None] * 32 + i[None, None, :]
    q = tl.load(packed_ptr + byte, mask=n_mask[:, None, None] & g_mask[None, :, None], other=0).to(tl.int32)
    scale = _absmax(n[:, None] * (K // 64) + group[None, :], n_mask[:, None] & g_mask[None, :],
                    absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, NESTED, NESTED_BLOCKSIZE)
    return q, scale


@triton.jit
def _gemv_acc3d(x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, out_ptr,
                N, K, stride_xm, stride_om, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STRIDED_X: tl.constexpr, MODE: tl.constexpr = 0):
    GROUPS: tl.constexpr = BLOCK_K // 64
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_row = x_ptr + tl.program_id(1) * stride_xm
    g = tl.arange(0, GROUPS)
    i = tl.arange(0, 32)
    n_mask = n < N
    acc = tl.zeros((BLOCK_N, GROUPS, 32), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        group = k0 // 64 + g
        g_mask = group < K // 64
        q, scale = _tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, n, n_mask, group,
                         g_mask, K, NESTED, NESTED_BLOCKSIZE)
        if STRIDED_X:
            col = group[:, None] * 64 + 2 * i[None, :]
            x_even = tl.load(x_row + col, mask=g_mask[:, None], other=0.0).to(tl.float32)
            x_odd = tl.load(x_row + col + 1, mask=g_mask[:, None], other=0.0).to(tl.float32)
        else:
            column = group[:, None] * 64 + tl.arange(0, 64)[None, :]
            x_tile = tl.load(x_row + column, mask=g_mask[:, None], other=0.0).to(tl.float32)
            x_even, x_odd = tl.split(tl.reshape(x_tile, (GROUPS, 32, 2)))
        if MODE == 0:
            high = tl.load(code_ptr + (q >> 4))
            low = tl.load(code_ptr + (q & 15))
        elif MODE == 1:  # diagnostic: no table (wrong values)
            high = (q >> 4).to(tl.float32)
            low = (q & 15).to(tl.float32)
        elif MODE == 3:  # pair table: one 8-byte gather per byte, two fp32 bit patterns
            v = tl.load(code_ptr + q)
            high = (v >> 32).to(tl.int32).to(tl.float32, bitcast=True)
            low = v.to(tl.int32).to(tl.float32, bitcast=True)
        else:  # diagnostic: bytes only
            high = q.to(tl.float32)
            low = high
        if MODE == 2:
            acc += high
        else:
            acc += (high * x_even[None, :, :] + low * x_odd[None, :, :]) * scale[:, :, None]
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(out_ptr + tl.program_id(1) * stride_om + n, out.to(out_ptr.dtype.element_ty), mask=n_mask)


gemv_acc3d = triton.autotune(configs=_configs(), key=["N", "K", "STRIDED_X", "MODE", "NESTED"])(_gemv_acc3d)


@triton.jit
def _gemv_rows(x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, out_ptr,
               M, N, K, stride_xm, stride_om, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
               M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """All M (<= M_PAD) rows of x per program: each weight byte is read and decoded once."""
    GROUPS: tl.constexpr = BLOCK_K // 64
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, M_PAD)
    g = tl.arange(0, GROUPS)
    i = tl.arange(0, 32)
    n_mask = n < N
    m_mask = m < M
    acc = tl.zeros((M_PAD, BLOCK_N, GROUPS, 32), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        group = k0 // 64 + g
        g_mask = group < K // 64
        q, scale = _tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, n, n_mask, group,
                         g_mask, K, NESTED, NESTED_BLOCKSIZE)
        high = tl.load(code_ptr + (q >> 4)) * scale[:, :, None]
        low = tl.load(code_ptr + (q & 15)) * scale[:, :, None]
        col = m[:, None, None] * stride_xm + group[None, :, None] * 64 + 2 * i[None, None, :]
        xm = m_mask[:, None, None] & g_mask[None, :, None]
        x_even = tl.load(x_ptr + col, mask=xm, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + col + 1, mask=xm, other=0.0).to(tl.float32)
        acc += high[None] * x_even[:, None] + low[None] * x_odd[:, None]
    out = tl.sum(tl.sum(acc, axis=3), axis=2)  # (M_PAD, BLOCK_N)
    tl.store(out_ptr + m[:, None] * stride_om + n[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


gemv_rows = triton.autotune(configs=_configs_m(), key=["N", "K", "M_PAD"])(_gemv_rows)


def pair_table(code):
    bits = code.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    b = torch.arange(256, device=code.device)
    return (bits[b >> 4] << 32) | bits[b & 15]


def _launch(kernel, x, state, one_row_per_program, code=None, **constexprs):
    """out = x @ W^T through one of the kernels above (grid: column blocks, and x's rows if one per program)."""
    N, K = state.shape
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),) + ((M,) if one_row_per_program else ())  # noqa: E731
    rows = () if one_row_per_program else (M,)
    kernel[grid](x2, state.packed, *nested_args(state), state.code if code is None else code, out, *rows, N, K,
                 x2.stride(0), out.stride(0), NESTED=state.nested, NESTED_BLOCKSIZE=state.nested_blocksize,
                 **constexprs)
    return out


def matmul_acc3d(x, state, strided=False, mode=0, table=None):
    return _launch(gemv_acc3d, x, state, True, table, STRIDED_X=strided, MODE=mode)


def _rows_padded(x, minimum):
    return max(minimum, triton.next_power_of_2(x.reshape(-1, x.shape[-1]).shape[0]))


def matmul_rows(x, state):
    return _launch(gemv_rows, x, state, False, M_PAD=_rows_padded(x, 1))


def _dot_configs():
    if INTERP:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 128})]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for n, k, w, s in [(16, 256, 4, 3), (32, 256, 4, 3), (64, 128, 4, 3), (32, 128, 4, 4), (64, 256, 8, 3),
                               (16, 512, 4, 3), (32, 512, 8, 3), (128, 128, 8, 3), (16, 128, 2, 4), (64, 64, 4, 4)]]


@triton.autotune(configs=_dot_configs(), key=["N", "K", "M_PAD"])
@triton.jit
def gemv_dot(x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, out_ptr,
             M, N, K, stride_xm, stride_om, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
             M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    GROUPS: tl.constexpr = BLOCK_K // 64
    HALF: tl.constexpr = BLOCK_K // 2
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, M_PAD)
    j = tl.arange(0, HALF)
    k = tl.arange(0, BLOCK_K)
    n_mask = n < N
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        q = tl.load(packed_ptr + n[:, None] * (K // 2) + k0 // 2 + j[None, :],
                    mask=n_mask[:, None] & (k0 // 2 + j[None, :] < K // 2), other=0).to(tl.int32)
        high = tl.load(code_ptr + (q >> 4))
        low = tl.load(code_ptr + (q & 15))
        w = tl.reshape(tl.join(high, low), (BLOCK_N, GROUPS, 64))
        group = k0 // 64 + tl.arange(0, GROUPS)
        scale = _absmax(n[:, None] * (K // 64) + group[None, :], n_mask[:, None] & (group[None, :] < K // 64),
                        absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, NESTED, NESTED_BLOCKSIZE)
        w = tl.reshape(w * scale[:, :, None], (BLOCK_N, BLOCK_K)).to(x_ptr.dtype.element_ty)
        x = tl.load(x_ptr + m[:, None] * stride_xm + k0 + k[None, :], mask=(m[:, None] < M) & (k0 + k[None, :] < K),
                    other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(out_ptr + m[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(m[:, None] < M) & n_mask[None, :])


def matmul_dot(x, state):
    return _launch(gemv_dot, x, state, False, M_PAD=_rows_padded(x, 16))


@triton.autotune(configs=_dot_configs(), key=["N", "K", "M_PAD", "RESHAPE"])
@triton.jit
def gemv_dot2(x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, out_ptr,
              M, N, K, stride_xm, stride_om, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
              M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, RESHAPE: tl.constexpr):
    """x's even and odd columns against the high and low nibbles, two tl.dot per step: no join of the nibbles.
    RESHAPE: scales applied to a (BLOCK_N, groups, 32) tile then reshaped; else gathered per element."""
    GROUPS: tl.constexpr = BLOCK_K // 64
    HALF: tl.constexpr = BLOCK_K // 2
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, M_PAD)
    j = tl.arange(0, HALF)
    n_mask = n < N
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        byte_col = k0 // 2 + j
        b_mask = byte_col < K // 2
        if RESHAPE:
            g = k0 // 64 + tl.arange(0, GROUPS)
            q3, s = _tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, n, n_mask, g,
                          g < K // 64, K, NESTED, NESTED_BLOCKSIZE)
            w_hi = tl.reshape(tl.load(code_ptr + (q3 >> 4)) * s[:, :, None], (BLOCK_N, HALF)).to(x_ptr.dtype.element_ty)
            w_lo = tl.reshape(tl.load(code_ptr + (q3 & 15)) * s[:, :, None], (BLOCK_N, HALF)).to(x_ptr.dtype.element_ty)
        else:
            q = tl.load(packed_ptr + n[:, None] * (K // 2) + byte_col[None, :], mask=n_mask[:, None] & b_mask[None, :],
                        other=0).to(tl.int32)
            s = _absmax(n[:, None] * (K // 64) + byte_col[None, :] // 32, n_mask[:, None] & b_mask[None, :],
                        absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, NESTED, NESTED_BLOCKSIZE)
            w_hi = (tl.load(code_ptr + (q >> 4)) * s).to(x_ptr.dtype.element_ty)
            w_lo = (tl.load(code_ptr + (q & 15)) * s).to(x_ptr.dtype.element_ty)
        col = k0 + 2 * j
        x_mask = (m[:, None] < M) & (col[None, :] < K)
        x_even = tl.load(x_ptr + m[:, None] * stride_xm + col[None, :], mask=x_mask, other=0.0)
        x_odd = tl.load(x_ptr + m[:, None] * stride_xm + col[None, :] + 1, mask=x_mask, other=0.0)
        acc = tl.dot(x_even, tl.trans(w_hi), acc)
        acc = tl.dot(x_odd, tl.trans(w_lo), acc)
    tl.store(out_ptr + m[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(m[:, None] < M) & n_mask[None, :])


def matmul_dot2(x, state, reshape=False):
    return _launch(gemv_dot2, x, state, False, M_PAD=_rows_padded(x, 16), RESHAPE=reshape)


def _stream_table(columns, ms, make, unchecked=()):
    """One markdown row per (shape, M): µs per call of each column as a decode step streams 28 weights.
    make(x, states, dense) -> {column: fn(i)} (a column left out prints "-"); outputs are checked against
    float64 first, except the `unchecked` diagnostics that compute something else on purpose."""
    from benchmarks.gemv import LAYERS, SHAPES, graph_time
    from minilora.nf4 import dequantize_nf4, quantize_nf4

    print("| N × K | M | " + " | ".join(columns) + " |")
    for N, K in SHAPES:
        torch.manual_seed(0)
        states = [quantize_nf4(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02, True)
                  for _ in range(LAYERS)]
        dense = [dequantize_nf4(s, torch.bfloat16) for s in states]
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.double(), dequantize_nf4(states[0], torch.float64))
            fns, cells = make(x, states, dense), []
            for name in columns:
                if name not in fns:
                    cells.append("-")
                    continue
                if name not in unchecked:
                    assert (fns[name](0).double() - ref).abs().max() < 2e-2 * ref.abs().max(), name
                cells.append(f"{graph_time(fns[name]):.1f}")
            print(f"| {N} × {K} | {M} | " + " | ".join(cells) + " |", flush=True)


def _baselines(x, states, dense):
    import minilora.kernels.nf4_matmul as mm

    return {"bf16": lambda i: F.linear(x, dense[i]), "current": lambda i: mm.matmul_nf4(x, states[i])}


def table_variants():
    def make(x, states, dense):
        fns = {**_baselines(x, states, dense), "rows": lambda i: matmul_rows(x, states[i])}
        if x.shape[0] <= 2:
            fns.update({"acc3d": lambda i: matmul_acc3d(x, states[i]),
                        "acc3d strided x": lambda i: matmul_acc3d(x, states[i], True)})
        return fns

    _stream_table(["bf16", "current", "acc3d", "acc3d strided x", "rows"], (1, 2, 4, 8), make)


def table_diagnostics():
    import dataclasses

    from minilora.nf4 import dequantize_absmax

    def make(x, states, dense):
        flat = [dataclasses.replace(s, absmax=dequantize_absmax(s), nested_absmax=None, nested_code=None, offset=None)
                for s in states]
        copies = [torch.empty_like(s.packed) for s in states]
        table = pair_table(states[0].code)
        return {"bf16": lambda i: F.linear(x, dense[i]), "acc3d": lambda i: matmul_acc3d(x, states[i]),
                "pair table": lambda i: matmul_acc3d(x, flat[i], mode=3, table=table),
                "pair table, strided x": lambda i: matmul_acc3d(x, flat[i], True, mode=3, table=table),
                "pair table, double-quant": lambda i: matmul_acc3d(x, states[i], mode=3, table=table),
                "flat absmax": lambda i: matmul_acc3d(x, flat[i]),
                "no table": lambda i: matmul_acc3d(x, flat[i], mode=1),
                "bytes only": lambda i: matmul_acc3d(x, flat[i], mode=2),
                "copy": lambda i: copies[i].copy_(states[i].packed)}

    _stream_table(["bf16", "acc3d", "pair table", "pair table, strided x", "pair table, double-quant", "flat absmax",
                   "no table", "bytes only", "copy"], (1,), make, unchecked=("no table", "bytes only", "copy"))


def table_dot():
    _stream_table(["bf16", "current", "dot"], (1, 4, 8, 16, 32),
                  lambda x, states, dense: {**_baselines(x, states, dense), "dot": lambda i: matmul_dot(x, states[i])})


def table_dot2():
    _stream_table(["bf16", "current", "dot2 gather", "dot2 reshape"], (1, 4, 8, 16, 64),
                  lambda x, states, dense: {**_baselines(x, states, dense),
                                            "dot2 gather": lambda i: matmul_dot2(x, states[i]),
                                            "dot2 reshape": lambda i: matmul_dot2(x, states[i], True)})


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--table", choices=["variants", "diagnostics", "dot", "dot2"], default="diagnostics")
    {"variants": table_variants, "diagnostics": table_diagnostics, "dot": table_dot,
     "dot2": table_dot2}[parser.parse_args().table]()
