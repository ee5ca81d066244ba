"""Decoding matmul (few rows x, NF4 weight) at Llama-3.2-3B shapes: the kernels side by side on one GPU.

bf16 F.linear (cuBLAS) vs the legacy per-row GEMV (M <= 2) / dequant + cuBLAS (M > 2) vs kernels/nf4_gemv.py
with its two decodings ("pair" table, "gather"), after checking every output against the float64 reference.
Times: triton.testing.do_bench (L2 flushed between runs), median, microseconds. GB/s = the NF4 bytes read
(packed + absmax statistics) over the time.

    python benchmarks/gemv.py [--results benchmarks/RESULTS.md]
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
ROWS = [1, 2, 4, 8, 16]


def main():
    import triton.testing

    import kernels.nf4_matmul as mm
    from kernels.nf4_gemv import gemv_nf4
    from minilora.nf4 import dequantize_nf4, quantize_nf4

    parser = argparse.ArgumentParser()
    parser.add_argument("--results")
    args = parser.parse_args()
    lines = [f"## Decoding GEMV: NF4 kernels vs bf16 cuBLAS ({datetime.date.today().isoformat()})", "",
             f"Card: {torch.cuda.get_device_name()}, torch {torch.__version__}. Command: `python benchmarks/gemv.py`. "
             "Median µs (triton do_bench, L2 flushed); NF4 GB/s in brackets; legacy = the per-row kernel for M ≤ 2, "
             "dequant + cuBLAS above.", "",
             "| N × K | M | bf16 F.linear | legacy NF4 | multirow pair | multirow gather | pair vs bf16 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for N, K in SHAPES:
        torch.manual_seed(0)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        state = quantize_nf4(w, True)
        w_deq = dequantize_nf4(state, torch.bfloat16)
        nbytes = state.packed.numel() + state.absmax.numel() * state.absmax.element_size()
        for M in ROWS:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.double(), dequantize_nf4(state, torch.float64))
            tol = 2e-2 * ref.abs().max().item()
            runs = {"bf16": lambda: F.linear(x, w_deq)}
            mm.GEMV = "legacy"
            runs["legacy"] = lambda: mm.matmul_nf4(x, state)
            runs["pair"] = lambda: gemv_nf4(x, state, "pair")
            runs["gather"] = lambda: gemv_nf4(x, state, "gather")
            times = {}
            for name, fn in runs.items():
                err = (fn().double() - ref).abs().max().item()
                assert err <= tol, (name, N, K, M, err, tol)
                times[name] = triton.testing.do_bench(fn, warmup=25, rep=100) * 1e3
            gbs = {k: nbytes / (t * 1e-6) / 1e9 for k, t in times.items()}
            lines.append(f"| {N} × {K} | {M} | {times['bf16']:.1f} | {times['legacy']:.1f} ({gbs['legacy']:,.0f}) | "
                         f"{times['pair']:.1f} ({gbs['pair']:,.0f}) | {times['gather']:.1f} ({gbs['gather']:,.0f}) | "
                         f"{times['bf16'] / times['pair']:.2f}× |")
            print(lines[-1], flush=True)
    mm.GEMV = "multirow"
    table = "\n".join(lines) + "\n"
    print(table)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
