"""The merged-weight dequantization (W + s B A, minilora/kernels/nf4_dequant.py `dequantize_nf4_lora`) against the plain
NF4 dequantization and a write-only floor, at Llama-3.2-3B shapes, streamed as a training pass streams the layers.

Each case holds 28 different NF4 weights of one shape (more than the card's L2) and times one CUDA graph over all
of them (benchmarks/gemv.py `graph_time`), per weight. Every config of the merged kernel's autotune space is timed
on its own too, then the autotuned launcher. Outputs are checked against `dequantize_nf4_lora_reference` first.

    python benchmarks/dequant_lora.py
"""
import os
import sys

import torch
import triton
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from gemv import LAYERS, SHAPES, graph_time  # noqa: E402
from minilora.kernels import nf4_dequant  # noqa: E402
from minilora.nf4 import quantize_nf4  # noqa: E402

R, SCALING = 16, 1.0


def forced(state, a, b, out, config):
    """One launch of the merged kernel with a given (BLOCK_N, BLOCK_K, num_warps, precision of the update)."""
    n, k = state.shape
    bn, bk, warps, precision = config
    grid = (-(-n // bn), -(-k // bk))
    nf4_dequant._dequantize_nf4_lora_kernel.fn[grid](
        state.packed, *nf4_dequant.nested_args(state), state.code, a, b, out, n, k, R, SCALING, NESTED=True,
        NESTED_BLOCKSIZE=256, BLOCK_R=16, PRECISION=precision, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
        enable_fp_fusion=False)


@triton.jit
def _variant_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, a_ptr, b_ptr,
                    out_ptr, N, K, R, scaling, MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Experiments on the merged kernel: MODE 1 = no update at all (what the 3-D decode alone costs),
    2 = the decoded tile handed to tl.dot as its accumulator, 3 = the update added by 16 CUDA-core FMAs."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = nf4_dequant._decode_tile(rows, tl.program_id(1), N, K, packed_ptr, absmax_ptr, nested_absmax_ptr,
                                 nested_code_ptr, offset_ptr, code_ptr, True, 256, BLOCK_N, BLOCK_K)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, 16)
    if MODE == 2:
        b = tl.load(b_ptr + rows[:, None] * R + ranks[None, :], mask=(rows < N)[:, None], other=0.0)
        a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :], mask=(cols < K)[None, :], other=0.0)
        w = tl.dot(b, a * scaling, acc=w)
    if MODE == 3:
        for r in range(16):
            b = tl.load(b_ptr + rows * R + r, mask=rows < N, other=0.0) * scaling
            a = tl.load(a_ptr + r * K + cols, mask=cols < K, other=0.0)
            w += b[:, None] * a[None, :]
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def variant(state, a, b, out, config):
    n, k = state.shape
    bn, bk, warps, mode = config
    _variant_kernel[(-(-n // bn), -(-k // bk))](state.packed, *nf4_dequant.nested_args(state), state.code, a, b, out,
                                               n, k, R, SCALING, MODE=mode, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)


@triton.jit
def _looped_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, a_ptr, b_ptr,
                   out_ptr, N, K, R, scaling, TILES: tl.constexpr, STAGES: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """Experiment: one program walks TILES tiles along the row (loads of the next tile pipelined under the dot of
    this one), the decoded tile as tl.dot's accumulator."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, 16)
    b = tl.load(b_ptr + rows[:, None] * R + ranks[None, :], mask=(rows < N)[:, None], other=0.0)
    for t in tl.range(0, TILES, num_stages=STAGES):
        tile = tl.program_id(1) * TILES + t
        w = nf4_dequant._decode_tile(rows, tile, N, K, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                                     offset_ptr, code_ptr, True, 256, BLOCK_N, BLOCK_K)
        cols = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :], mask=(cols < K)[None, :], other=0.0)
        w = tl.dot(b, a * scaling, acc=w)
        mask = (rows < N)[:, None] & (cols < K)[None, :]
        tl.store(out_ptr + rows[:, None] * K + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def looped(state, a, b, out, config):
    n, k = state.shape
    bn, bk, warps, tiles, stages = config
    _looped_kernel[(-(-n // bn), -(-k // (bk * tiles)))](
        state.packed, *nf4_dequant.nested_args(state), state.code, a, b, out, n, k, R, SCALING, TILES=tiles,
        STAGES=stages, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)


def main():
    configs = [(32, 256, 4, "tf32"), (32, 128, 4, "tf32")]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; us per weight, streamed over {LAYERS}")
    for n, k in SHAPES:
        states = [quantize_nf4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 30) for _ in range(LAYERS)]
        a = [torch.randn(R, k, device="cuda") / k ** 0.5 for _ in range(LAYERS)]
        b = [torch.randn(n, R, device="cuda") / 50 for _ in range(LAYERS)]
        out = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
        ref = nf4_dequant.dequantize_nf4_lora_reference(states[0], a[0], b[0], SCALING, torch.bfloat16)
        got = nf4_dequant.dequantize_nf4_lora(states[0], a[0], b[0], SCALING, torch.bfloat16)
        assert (got.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max(), "merged kernel wrong"
        bytes_moved = n * k // 2 + n * k * 2  # packed in, bf16 out (statistics and A, B are < 2% more)
        rows = {"write-only floor (out.fill_)": graph_time(lambda i: out.fill_(1.0)),
                "dequantize_nf4 (no LoRA)": graph_time(lambda i: nf4_dequant.dequantize_nf4(states[i], torch.bfloat16, out=out)),
                "dequantize_nf4_lora (autotuned)": graph_time(
                    lambda i: nf4_dequant.dequantize_nf4_lora(states[i], a[i], b[i], SCALING, torch.bfloat16))}
        for config in configs:
            try:
                forced(states[0], a[0], b[0], out, config)
                torch.testing.assert_close(out.float(), got.float(), atol=2e-2, rtol=2 ** -7)
                rows[f"lora BLOCK_N={config[0]} BLOCK_K={config[1]} warps={config[2]} {config[3]}"] = graph_time(
                    lambda i, c=config: forced(states[i], a[i], b[i], out, c))
            except Exception as e:  # a config that does not compile (shared memory) is reported, not fatal
                rows[f"lora {config}"] = f"failed: {type(e).__name__}"
        for config in [(32, 256, 4, 1), (32, 128, 4, 2), (32, 256, 4, 2)]:
            try:
                variant(states[0], a[0], b[0], out, config)
                if config[3] > 1:
                    torch.testing.assert_close(out.float(), got.float(), atol=2e-2, rtol=2 ** -7)
                rows[f"variant {config}"] = graph_time(lambda i, c=config: variant(states[i], a[i], b[i], out, c))
            except Exception as e:
                rows[f"variant {config}"] = f"failed: {type(e).__name__} {str(e)[:200]}"
        for config in [(32, 128, 4, 4, 2), (32, 128, 4, 4, 3), (32, 256, 4, 4, 2), (64, 128, 8, 4, 2),
                       (32, 128, 4, 8, 3), (16, 256, 4, 4, 2), (32, 64, 4, 8, 3), (64, 64, 4, 4, 3)]:
            try:
                looped(states[0], a[0], b[0], out, config)
                torch.testing.assert_close(out.float(), got.float(), atol=2e-2, rtol=2 ** -7)
                rows[f"looped {config}"] = graph_time(lambda i, c=config: looped(states[i], a[i], b[i], out, c))
            except Exception as e:
                rows[f"looped {config}"] = f"failed: {type(e).__name__} {str(e)[:200]}"
        print(f"\n{n} x {k}:")
        for name, t in rows.items():
            print(f"  {name:44s} " + (f"{t:7.1f} us  {bytes_moved / t / 1e3:6.0f} GB/s" if isinstance(t, float) else t))


if __name__ == "__main__":
    main()
