"""Decode matmul kernels (x with 1 or 8 rows, NF4 weight) as decoding streams them: from HBM, layer after layer.

Each case holds 28 different weights of one Llama-3.2-3B shape (28 x 12.6 MB > the card's L2) and a CUDA
graph that multiplies x by each of them in turn, as a decode step goes through the layers; time = graph replay
time / 28. Compared: bf16 F.linear (cuBLAS), the looping fused GEMV (kernels/nf4_matmul.py, autotuned), the
split-K GEMV at several tiles, and for 8 rows dequant + cuBLAS. Every output is checked against float64 first.

    python benchmarks/gemv.py [--results FILE] [--best FILE]   # --best: write the fastest split-K tile there
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
TILES = [(bn, bk, w) for bn in (4, 8, 16, 32) for bk in (256, 512, 1024) for w in (2, 4)]
LAYERS = 28


def graph_time(fn, xs):
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
    parser.add_argument("--best")
    args = parser.parse_args()
    rows, tile_total = [], {t: 0.0 for t in TILES}
    for N, K in SHAPES:
        torch.manual_seed(0)
        states = [quantize_nf4(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02, True) for _ in range(LAYERS)]
        dense = [dequantize_nf4(s, torch.bfloat16) for s in states]
        nbytes = states[0].packed.numel() + states[0].absmax.numel()
        for M in (1, 8):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.double(), dequantize_nf4(states[0], torch.float64))
            tol = 2e-2 * ref.abs().max().item()
            cases = {"bf16 F.linear": lambda i: F.linear(x, dense[i])}
            if M == 1:
                cases["loop GEMV"] = lambda i: mm.matmul_nf4(x, states[i])
            else:
                cases["dequant + cuBLAS"] = lambda i: F.linear(x, mm._dequantize_into_buffer(states[i], x.dtype))
            for t in TILES:
                cases[t] = lambda i, t=t: mm._gemv_splitk(x, states[i], t)
            times = {}
            for name, fn in cases.items():
                try:
                    err = (fn(0).double() - ref).abs().max().item()
                    assert err <= tol, (name, err, tol)
                    times[name] = graph_time(fn, x)
                except Exception as e:  # a tile that does not compile or fit: skip it, say so
                    print("skip", N, K, M, name, repr(e)[:200], flush=True)
            split = {k: v for k, v in times.items() if isinstance(k, tuple)}
            best = min(split, key=split.get)
            for t, v in split.items():
                tile_total[t] += v / times["bf16 F.linear"] * (4 if M == 1 else 1)  # decode is mostly M = 1
            other = "loop GEMV" if M == 1 else "dequant + cuBLAS"
            rows.append((N, K, M, times["bf16 F.linear"], times[other], other, split[best], best,
                         nbytes / (split[best] * 1e-6) / 1e9))
            print(rows[-1], flush=True)
    best_tile = min(tile_total, key=tile_total.get)
    lines = [f"## Decode GEMV as a decode step streams it (28 weights per shape; {datetime.date.today().isoformat()})", "",
             f"Card: {torch.cuda.get_device_name()}, torch {torch.__version__}. Command: `python benchmarks/gemv.py`. "
             "µs per matmul inside one CUDA graph over 28 distinct weights (more than L2 holds). Split-K: the best "
             f"tile per row; tile used by default after this run: {best_tile} (BLOCK_N, BLOCK_K, warps).", "",
             "| N × K | M | bf16 F.linear | previous NF4 path | split-K NF4 (best tile) | NF4 GB/s | split-K vs bf16 | split-K vs previous |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for N, K, M, bf, prev, prev_name, sk, tile, gbs in rows:
        lines.append(f"| {N} × {K} | {M} | {bf:.1f} | {prev:.1f} ({prev_name}) | {sk:.1f} {tile} | {gbs:,.0f} | "
                     f"{bf / sk:.2f}× | {prev / sk:.2f}× |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + table)
    if args.best:  # the tile, and the largest M the split-K path should take (8 if it beat dequant + cuBLAS)
        wins_at_8 = sum(sk < prev for _, _, M, _, prev, _, sk, _, _ in rows if M == 8)
        with open(args.best, "w") as f:
            f.write(",".join(map(str, best_tile)) + (" 8" if wins_at_8 >= 3 else " 2"))


if __name__ == "__main__":
    main()
