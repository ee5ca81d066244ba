"""NF4 kernel benchmark on the GPU: our Triton kernels vs bitsandbytes vs bf16 `F.linear`.

Llama-3.2-3B linear shapes (out x in): q/o 3072x3072, k/v 1024x3072, gate/up 8192x3072, down 3072x8192;
rows M in {1, 16, 512, 4096}. Every variant's output is checked against the others before timing.
Times are `triton.testing.do_bench` medians (20th-80th percentile shown as spread) in microseconds.
Writes the table (card, versions, date) into the kernels section of benchmarks/RESULTS.md, or --results.

    python benchmarks/kernels.py [--results benchmarks/RESULTS.md]
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = [(3072, 3072), (1024, 3072), (8192, 3072), (3072, 8192)]
ROWS = [1, 16, 512, 4096]
BEGIN, END = "<!-- kernels:begin -->", "<!-- kernels:end -->"


def bench(fn):
    """(median, 20th percentile, 80th percentile) in microseconds."""
    from triton.testing import do_bench

    q20, q50, q80 = do_bench(fn, quantiles=[0.2, 0.5, 0.8], warmup=25, rep=100)
    return q50 * 1e3, q20 * 1e3, q80 * 1e3


def check_close(out, ref, what):
    """bf16 outputs: relative to the largest reference value, as bf16 rounding of an fp32 sum allows."""
    err = (out.float() - ref.float()).abs()
    limit = 2e-2 * ref.float().abs().max().item()  # bf16 eps 7.8e-3, x2.5 for different summation orders
    if err.max().item() > limit:
        raise AssertionError(f"{what}: max diff {err.max().item():.4g} mean {err.mean().item():.4g} > {limit:.4g}")


def write_section(path: str, text: str) -> None:
    """Replace (or append) the kernels section of a RESULTS.md, leaving other sections alone."""
    old = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    block = f"{BEGIN}\n{text.rstrip()}\n{END}\n"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END) + 1:]
    else:
        new = old.rstrip() + "\n\n" + block
    with open(path, "w") as f:
        f.write(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py needs a CUDA GPU")
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import triton

    from minilora.kernels import nf4_matmul
    from minilora.kernels.nf4_dequant import dequantize_nf4
    from minilora import nf4

    torch.manual_seed(0)
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name()
    src = torch.empty(2**28, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_us = bench(lambda: dst.copy_(src))[0]
    copy_bw = 2 * src.numel() / copy_us / 1e6  # TB/s, bytes read + written
    del src, dst
    lines, summary, configs = [], [], []
    dq_rows = []
    for n, k in SHAPES:
        w = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
        q, s = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
        state = nf4.quantize_nf4(w, True)
        assert torch.equal(state.packed, q) and torch.equal(state.absmax, s.absmax), "bytes differ from bnb"
        w_dq = dequantize_nf4(state, torch.bfloat16)
        assert torch.equal(w_dq, bnbf.dequantize_4bit(q, s, quant_type="nf4")), "dequant differs from bnb"
        ours = bench(lambda: dequantize_nf4(state, torch.bfloat16))
        theirs = bench(lambda: bnbf.dequantize_4bit(q, s, quant_type="nf4"))
        moved = state.packed.numel() + state.absmax.numel() + 4 * state.nested_absmax.numel() + 2 * w.numel()
        dq_rows.append((n, k, ours, theirs, moved))
        for m in ROWS:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = F.linear(x, w_dq)
            check_close(nf4_matmul.matmul_nf4(x, state), ref, f"ours {n}x{k} M={m}")
            check_close(bnb.matmul_4bit(x, q.t(), quant_state=s), ref, f"bnb {n}x{k} M={m}")
            t_bf16 = bench(lambda: F.linear(x, w_dq))
            t_ours = bench(lambda: nf4_matmul.matmul_nf4(x, state))
            t_bnb = bench(lambda: bnb.matmul_4bit(x, q.t(), quant_state=s))
            kernel = nf4_matmul._gemv_nf4_kernel if m <= nf4_matmul.SMALL_M else nf4_matmul._matmul_nf4_few_rows_kernel
            if m <= nf4_matmul.FEW_ROWS and getattr(kernel, "best_config", None) is not None:
                config = kernel.best_config
                configs.append(f"{n}x{k} M={m}: {config.kwargs} warps={config.num_warps} stages={config.num_stages}")
            # the other path, to check the switch: the decoding kernels vs dequant + cuBLAS
            t_alt = (None,)
            if m <= nf4_matmul.FEW_ROWS:
                t_alt = bench(lambda: F.linear(x, nf4_matmul._dequantize_into_buffer(state, torch.bfloat16)))
            alt = "-" if t_alt[0] is None else f"{t_alt[0]:.1f}"
            lines.append(f"| {n}x{k} | {m} | {t_bf16[0]:.1f} | {t_ours[0]:.1f} ({t_ours[1]:.1f}-{t_ours[2]:.1f}) "
                         f"| {t_bnb[0]:.1f} | {t_ours[0] / t_bf16[0]:.2f}x | {t_bnb[0] / t_ours[0]:.2f}x | {alt} |")
            summary.append((n, k, m, t_bf16[0], t_ours[0], t_bnb[0]))
        del w, q, s, state, w_dq
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"## NF4 kernels ({card}, {now})", "",
           f"torch {torch.__version__}, triton {triton.__version__}, bitsandbytes {bnb.__version__}, CUDA "
           f"{torch.version.cuda}. `python benchmarks/kernels.py`. Medians of `triton.testing.do_bench` in "
           f"microseconds (our 20th-80th percentile in brackets). Measured device-to-device copy bandwidth "
           f"{copy_bw:.2f} TB/s (bytes read + written).", "",
           "### Dequantize NF4 (double-quant) -> bf16", "",
           "| weight | ours us | bnb us | ours GB/s | bnb GB/s | speed-up | of copy bandwidth |",
           "|---|---|---|---|---|---|---|"]
    for n, k, ours, theirs, moved in dq_rows:
        out.append(f"| {n}x{k} | {ours[0]:.1f} | {theirs[0]:.1f} | {moved / ours[0] / 1e3:.0f} | "
                   f"{moved / theirs[0] / 1e3:.0f} | {theirs[0] / ours[0]:.2f}x | "
                   f"{moved / ours[0] / 1e6 / copy_bw:.0%} |")
    out += ["", "### y = x @ W^T, x bf16 (M, in), W NF4 (out, in)", "",
            f"`ours/bf16` < 1 is faster than bf16 `F.linear`; `bnb/ours` > 1 is faster than bitsandbytes. "
            f"Ours takes the GEMV for M <= {nf4_matmul.SMALL_M}, the few-rows kernel up to {nf4_matmul.FEW_ROWS}, else dequant + cuBLAS; `other path` "
            f"times the one not taken (the GEMV only up to M = 16).", "",
            "| weight | M | bf16 F.linear us | ours us | bnb us | ours/bf16 | bnb/ours | other path us |",
            "|---|---|---|---|---|---|---|---|"] + lines + ["", "Decoding kernels' autotune choice: " + "; ".join(configs) + "."]
    text = "\n".join(out) + "\n"
    print(text)
    write_section(args.results, text)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
