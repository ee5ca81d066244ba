"""Decode matmul kernels (x with 1 or 8 rows, NF4 weight) as decoding streams them: from HBM, layer after layer.

Each case holds 28 different weights of one Llama-3.2-3B shape (28 x 12.6 MB > the card's L2) and a CUDA
graph that multiplies x by each of them in turn, as a decode step goes through the layers; time = graph replay
time / 28. Compared: bf16 F.linear (cuBLAS) and minilora's NF4 path (`matmul_nf4`: the fused GEMV for 1 row,
dequant + cuBLAS for 8). Every output is checked against float64 first. A split-K GEMV was compared the same way
at commit 99f2d45 and removed (benchmarks/RESULTS.md).

    python benchmarks/gemv.py [--results FILE]
"""
import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SHAPES = [(3072, 3072), (1024, 3072), (8192, 3072), (3072, 8192)]  # (N, K)
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


def main():
    import kernels.nf4_matmul as mm
    from minilora.nf4 import dequantize_nf4, quantize_nf4

    parser = argparse.ArgumentParser()
    parser.add_argument("--results")
    args = parser.parse_args()
    lines = [f"## Decode matmuls as a decode step streams them (28 weights per shape; {datetime.date.today().isoformat()})",
             "", f"Card: {torch.cuda.get_device_name()}, torch {torch.__version__}. Command: `python benchmarks/gemv.py`. "
             "µs per matmul inside one CUDA graph over 28 distinct weights (more than L2 holds).", "",
             "| N × K | M | bf16 F.linear | NF4 (`matmul_nf4`) | NF4 GB/s | NF4 vs bf16 |", "|---|---:|---:|---:|---:|---:|"]
    for N, K in SHAPES:
        torch.manual_seed(0)
        states = [quantize_nf4(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02, True) for _ in range(LAYERS)]
        dense = [dequantize_nf4(s, torch.bfloat16) for s in states]
        nbytes = states[0].packed.numel() + states[0].absmax.numel()
        for M in (1, 8):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.double(), dequantize_nf4(states[0], torch.float64))
            assert (mm.matmul_nf4(x, states[0]).double() - ref).abs().max() <= 2e-2 * ref.abs().max()
            bf = graph_time(lambda i: F.linear(x, dense[i]))
            nf = graph_time(lambda i: mm.matmul_nf4(x, states[i]))
            lines.append(f"| {N} × {K} | {M} | {bf:.1f} | {nf:.1f} | {nbytes / (nf * 1e-6) / 1e9:,.0f} | {bf / nf:.2f}× |")
            print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    print(table)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
