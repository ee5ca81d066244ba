"""Decode matmul kernels (x with 1 to 64 rows, NF4 weight) as decoding streams them: from HBM, layer after layer.

Each case holds 28 different weights of one Llama-3.2-3B shape (28 x 4.7 MB or more > the card's L2) and a CUDA
graph that multiplies x by each of them in turn, as a decode step goes through the layers; time = graph replay
time / 28. Compared: bf16 F.linear (cuBLAS), minilora's NF4 path (`matmul_nf4`) and each of its three kernels
forced: the GEMV (M <= 2), the few-rows tensor-core kernel, dequant + cuBLAS. Every output is checked against
float64 first (the bound of tests/test_nf4_kernels.py). Earlier kernels (split-K GEMV, per-byte GEMV, multi-row
GEMV) were compared the same way and removed (benchmarks/RESULTS.md).
`--glu`: a decode step's MLP front at batch 1 instead: the joined gate/up GEMV then the SwiGLU kernel (two launches,
as `MLP.forward` ran them) vs `matmul_nf4_glu` (one launch, the GLU in the GEMV's epilogue), checked bit-identical.

    python benchmarks/gemv.py [--results FILE] [--rows 1,2,8] [--shapes 5120x3072,3072x8192]
    python benchmarks/gemv.py --glu [--shapes 16384x3072]
"""
import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# (N, K) of a decode step's four 4-bit matmuls per block (Llama-3.2-3B): joined q/k/v, o, joined gate/up, down
SHAPES = [(5120, 3072), (3072, 3072), (16384, 3072), (3072, 8192)]
LAYERS = 28


def graph_time(fn):
    """Microseconds per call of fn(i) over i in range(LAYERS), captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(LAYERS):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(LAYERS):
            fn(i)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * LAYERS)


def check_close(out, x, w, what):
    """|out - x @ w^T| <= 4 eps(bf16) sum |x w| per element, against float64 (tests/test_nf4_kernels.py's bound)."""
    ref = x.double() @ w.double().T
    bound = 4 * torch.finfo(out.dtype).eps * (x.double().abs() @ w.double().abs().T)
    err = (out.double() - ref).abs()
    if (err > bound).any():
        raise AssertionError(f"{what}: {int((err > bound).sum())} outputs outside the bound, max diff {err.max().item():.3g}")


def glu_table(shapes):
    """Rows of the --glu table: per joined gate/up shape (2F, K), x one bf16 row, µs per MLP front in the graph."""
    import minilora.kernels.nf4_matmul as mm
    from minilora.kernels.glu import swiglu_triton
    from minilora.nf4 import dequantize_nf4, quantize_nf4

    lines = [f"## Gate/up GEMV + SwiGLU vs the fused kernel, batch 1 (28 weights per shape; "
             f"{datetime.date.today().isoformat()})", "",
             f"Card: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}. "
             "Command: `python benchmarks/gemv.py --glu`. µs per block inside one CUDA graph over 28 distinct "
             "joined gate/up weights; outputs checked first (GEMV against float64, fused equal to unfused).", "",
             "| 2F × K | GEMV alone | GEMV + SwiGLU (2 launches) | fused (1 launch) | saved | plan (SPLIT_K, AHEAD) |",
             "|---|---:|---:|---:|---:|---|"]
    for N, K in shapes:
        torch.manual_seed(0)
        states = [quantize_nf4(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02, True) for _ in range(LAYERS)]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        width = N // 2  # F, the MLP's intermediate size
        gemv = lambda i: mm.matmul_nf4(x, states[i])  # noqa: E731
        unfused = lambda i: swiglu_triton(*(part.contiguous() for part in gemv(i).split(width, dim=-1)))  # noqa: E731
        fused = lambda i: mm.matmul_nf4_glu(x, states[i], "silu")  # noqa: E731
        check_close(gemv(0), x, dequantize_nf4(states[0], torch.bfloat16), f"GEMV {N}x{K}")
        ours, theirs = fused(0), unfused(0)
        if not torch.equal(ours, theirs):
            diff = (ours.float() - theirs.float()).abs()
            raise AssertionError(f"fused {N}x{K}: {int((diff > 0).sum())} of {width} differ from GEMV + SwiGLU, "
                                 f"max diff {diff.max().item():.3g}")
        t = {name: graph_time(fn) for name, fn in (("gemv", gemv), ("unfused", unfused), ("fused", fused))}
        plan = mm.gemv_plan(1, N, K // 64, mm._sm_count(x.device))
        lines.append(f"| {N} × {K} | {t['gemv']:.2f} | {t['unfused']:.2f} | {t['fused']:.2f} | "
                     f"{t['unfused'] - t['fused']:.2f} | {plan} |")
        print(lines[-1], flush=True)
    return lines


def matmul_table(shapes, rows):
    """Rows of the default table: every path of `matmul_nf4` per shape and number of rows M of x."""
    import minilora.kernels.nf4_matmul as mm
    from minilora.nf4 import dequantize_nf4, quantize_nf4

    lines = [f"## Decode matmuls as a decode step streams them (28 weights per shape; {datetime.date.today().isoformat()})",
             "", f"Card: {torch.cuda.get_device_name()}, torch {torch.__version__}. Command: `python benchmarks/gemv.py`. "
             "µs per matmul inside one CUDA graph over 28 distinct weights (more than L2 holds); NF4 GB/s = packed "
             "bytes + absmax / time of the default path.", "",
             "| N × K | M | bf16 F.linear | NF4 `matmul_nf4` | NF4 GB/s | vs bf16 | GEMV | few-rows kernel | dequant + cuBLAS |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for N, K in shapes:
        torch.manual_seed(0)
        states = [quantize_nf4(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02, True) for _ in range(LAYERS)]
        dense = [dequantize_nf4(s, torch.bfloat16) for s in states]
        words = [mm._words(s) for s in states]
        nbytes = states[0].packed.numel() + states[0].absmax.numel()
        for M in rows:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            paths = {"default": lambda i: mm.matmul_nf4(x, states[i]),
                     "few": lambda i: mm._matmul_few_rows(x, states[i], words[i]),
                     "dequant": lambda i: torch.nn.functional.linear(x, mm._dequantize_into_buffer(states[i], x.dtype))}
            if M <= 2:
                paths["gemv"] = lambda i: mm._gemv(x, states[i], words[i])
            for name, fn in paths.items():
                check_close(fn(0), x, dense[0], f"{name} {N}x{K} M={M}")
            bf = graph_time(lambda i: F.linear(x, dense[i]))
            t = {name: graph_time(fn) for name, fn in paths.items()}
            gemv = f"{t['gemv']:.1f}" if "gemv" in t else "—"
            lines.append(f"| {N} × {K} | {M} | {bf:.1f} | {t['default']:.1f} | {nbytes / (t['default'] * 1e-6) / 1e9:,.0f} | "
                         f"{bf / t['default']:.2f}× | {gemv} | {t['few']:.1f} | {t['dequant']:.1f} |")
            print(lines[-1], flush=True)
        split_k, ahead = mm.gemv_plan(1, N, K // 64, mm._sm_count(torch.device("cuda")))
        print(N, K, f"GEMV plan: {mm.GEMV_TILE}, warps {mm.GEMV_WARPS}, SPLIT_K {split_k}, AHEAD {ahead}; few-rows tuned:",
              {str(k): str(v) for k, v in mm._matmul_nf4_few_rows_kernel.cache.items()}, flush=True)
    return lines


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--results")
    parser.add_argument("--rows", default="1,2,4,8,16,32,64")
    parser.add_argument("--shapes", help="N x K, comma-separated (default: the four of SHAPES; with --glu 16384x3072)")
    parser.add_argument("--glu", action="store_true", help="gate/up GEMV + SwiGLU vs the fused kernel, batch 1")
    args = parser.parse_args()
    default = "16384x3072" if args.glu else ",".join(f"{n}x{k}" for n, k in SHAPES)
    shapes = [tuple(map(int, shape.split("x"))) for shape in (args.shapes or default).split(",")]
    lines = glu_table(shapes) if args.glu else matmul_table(shapes, list(map(int, args.rows.split(","))))
    table = "\n".join(lines) + "\n"
    print(table)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
