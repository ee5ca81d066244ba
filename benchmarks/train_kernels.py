"""Micro-benchmark: each Triton training kernel against its plain-torch reference, on one GPU.

Shapes are Llama-3.2-3B's at batch 8 x 512 tokens (D=3072, H=24, Hkv=8, Dh=128, intermediate 8192,
V=128256) in bf16, plus Gemma-2-2B's lm_head (D=2304, V=256000, soft-cap 30) for the fused
cross-entropy. QLoRA's case: norm weights and lm_head frozen, activations need gradients.

For each kernel the script first checks that the outputs and gradients agree with the reference, then
times forward and forward + backward with `triton.testing.do_bench` (median ms, 20th-80th percentile), in
the same process. The elementwise kernels report the bytes they must move (each input read once, each
output written once, in bf16) against the copy rate measured on the card (2.96 TB/s, H100
HBM3); the fused cross-entropy reports the TFLOP/s of its two matmuls (logits and grad_hidden, 4 N D V)
and its peak memory next to the full-logits reference.

Run on the GPU, from the repository root:  python -m benchmarks.train_kernels [--out FILE]
"""
import argparse
import datetime

import torch
import triton
import triton.testing

from minilora.kernels.cross_entropy import linear_cross_entropy_torch, linear_cross_entropy_triton
from minilora.kernels.glu import geglu_torch, geglu_triton, swiglu_torch, swiglu_triton
from minilora.kernels.rmsnorm import rms_norm_torch, rms_norm_triton
from minilora.kernels.rope import rope_torch, rope_triton

COPY_TB_S = 2.96  # H100 80GB HBM3 device-to-device copy, read + write (benchmarks/RESULTS.md)
B, T, D, H, HKV, DH, INTER, V = 8, 512, 3072, 24, 8, 128, 8192, 128256


def _time(fn):
    median, low, high = triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])
    return median, low, high


def _check(name, ours, ref, rel=0.05):
    """bf16 outputs may differ by a few roundings; a wrong kernel differs by O(1)."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        diff = (a.float() - b.float()).abs().max().item()
        scale = b.float().abs().max().item()
        if not diff <= rel * scale:
            raise SystemExit(f"{name} output {i}: max diff {diff:.3g} > {rel} * max |ref| {scale:.3g}")


def _forward_backward(fn, inputs, grad_outputs):
    def step():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return torch.autograd.grad(outs, [x for x in inputs if torch.is_tensor(x) and x.requires_grad],
                                   grad_outputs)
    return step


def _backward(fn, inputs, grad_outputs):
    """The backward alone, through one graph kept alive (retain_graph)."""
    outs = _as_tuple(fn(*inputs))
    needs_grad = [x for x in inputs if torch.is_tensor(x) and x.requires_grad]
    return lambda: torch.autograd.grad(outs, needs_grad, grad_outputs, retain_graph=True)


def bench_elementwise(name, triton_fn, torch_fn, inputs, bytes_forward, bytes_backward):
    """Rows (kernel, pass, torch ms, triton ms, speedup, triton GB/s, % of copy rate)."""
    outs_t = triton_fn(*inputs)
    outs_t = outs_t if isinstance(outs_t, tuple) else (outs_t,)
    grads = [torch.randn_like(o) for o in outs_t]
    _check(name + " forward", outs_t, _as_tuple(torch_fn(*inputs)))
    _check(name + " backward", _forward_backward(triton_fn, inputs, grads)(),
           _forward_backward(torch_fn, inputs, grads)())
    rows = []
    for label, nbytes, make in (("fwd", bytes_forward, lambda fn: (lambda: fn(*inputs))),
                                ("bwd", bytes_backward, lambda fn: _backward(fn, inputs, grads)),
                                ("fwd+bwd", bytes_forward + bytes_backward,
                                 lambda fn: _forward_backward(fn, inputs, grads))):
        ms_torch = _time(make(torch_fn))
        ms_triton = _time(make(triton_fn))
        gb_s = nbytes / ms_triton[0] / 1e6
        rows.append((name, label, ms_torch, ms_triton, ms_torch[0] / ms_triton[0], gb_s,
                     100 * gb_s / (COPY_TB_S * 1e3)))
    return rows


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def bench_cross_entropy(name, N, Dm, Vm, softcap):
    """Row (name, torch ms, triton ms, speedup, triton TFLOP/s, torch peak GiB, triton peak GiB)."""
    hidden = torch.randn(N, Dm, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(Vm, Dm, device="cuda") / Dm ** 0.5).to(torch.bfloat16)  # frozen lm_head
    labels = torch.randint(0, Vm, (N,), device="cuda")
    labels[::7] = -100

    def run(fn):
        return lambda: torch.autograd.grad(fn(hidden, weight, labels, softcap), [hidden])

    (g_t,), (g_r,) = run(linear_cross_entropy_triton)(), run(linear_cross_entropy_torch)()
    _check(name + " grad_hidden", (g_t,), (g_r,))
    loss_t = linear_cross_entropy_triton(hidden, weight, labels, softcap).item()
    loss_r = linear_cross_entropy_torch(hidden, weight, labels, softcap).item()
    if not abs(loss_t - loss_r) <= 1e-3 * abs(loss_r):
        raise SystemExit(f"{name} loss {loss_t} vs reference {loss_r}")
    peaks = []
    for fn in (linear_cross_entropy_torch, linear_cross_entropy_triton):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(fn)()
        torch.cuda.synchronize()
        peaks.append((torch.cuda.max_memory_allocated() - base) / 2**30)
    ms_torch, ms_triton = _time(run(linear_cross_entropy_torch)), _time(run(linear_cross_entropy_triton))
    tflops = 4 * N * Dm * Vm / ms_triton[0] / 1e9
    return (name, ms_torch, ms_triton, ms_torch[0] / ms_triton[0], tflops, peaks[0], peaks[1])


def _ms(t):
    return f"{t[0]:.3f} ({t[1]:.3f}-{t[2]:.3f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    bf16, dev = torch.bfloat16, "cuda"
    N = B * T

    x = torch.randn(B, T, D, device=dev, dtype=bf16, requires_grad=True)
    norm_weight = (1 + 0.1 * torch.randn(D, device=dev)).to(bf16)  # frozen, as in QLoRA
    rows = bench_elementwise("RMSNorm", lambda x, w: rms_norm_triton(x, w, 1e-5),
                             lambda x, w: rms_norm_torch(x, w, 1e-5), [x, norm_weight],
                             4 * N * D, 6 * N * D)
    trained_weight = norm_weight.clone().requires_grad_()
    rows += bench_elementwise("RMSNorm, weight trained", lambda x, w: rms_norm_triton(x, w, 1e-5),
                              lambda x, w: rms_norm_torch(x, w, 1e-5), [x, trained_weight],
                              4 * N * D, 6 * N * D)
    gemma_weight = (0.1 * torch.randn(D, device=dev)).to(bf16)
    rows += bench_elementwise("RMSNorm (1+w)", lambda x, w: rms_norm_triton(x, w, 1e-6, True),
                              lambda x, w: rms_norm_torch(x, w, 1e-6, True), [x, gemma_weight],
                              4 * N * D, 6 * N * D)

    q = torch.randn(B, T, H, DH, device=dev, dtype=bf16).transpose(1, 2).requires_grad_()  # (B, H, T, Dh)
    k = torch.randn(B, T, HKV, DH, device=dev, dtype=bf16).transpose(1, 2).requires_grad_()
    angles = torch.arange(T, device=dev)[:, None] * 500000.0 ** (-torch.arange(0, DH, 2, device=dev) / DH)
    angles = torch.cat((angles, angles), -1).expand(B, T, DH)
    cos, sin = angles.cos().to(bf16).contiguous(), angles.sin().to(bf16).contiguous()
    qk = N * (H + HKV) * DH
    rows += bench_elementwise("RoPE q+k", rope_triton, rope_torch, [q, k, cos, sin],
                              4 * qk + 4 * N * DH, 4 * qk + 4 * N * DH)

    gate = torch.randn(B, T, INTER, device=dev, dtype=bf16, requires_grad=True)
    up = torch.randn(B, T, INTER, device=dev, dtype=bf16, requires_grad=True)
    M = N * INTER
    rows += bench_elementwise("SwiGLU", swiglu_triton, swiglu_torch, [gate, up], 6 * M, 10 * M)
    rows += bench_elementwise("GeGLU", geglu_triton, geglu_torch, [gate, up], 6 * M, 10 * M)

    ce_rows = [bench_cross_entropy("Llama-3.2-3B lm_head", N, D, V, None),
               bench_cross_entropy("Gemma-2-2B lm_head, soft-cap 30", N, 2304, 256000, 30.0)]

    props = torch.cuda.get_device_properties(0)
    lines = [f"## Triton training kernels vs torch eager ({datetime.date.today()})", "",
             f"{props.name}, torch {torch.__version__}, triton {triton.__version__}; bf16, "
             f"{B} x {T} tokens, Llama-3.2-3B shapes; `python -m benchmarks.train_kernels`. "
             "Times: median ms (20th-80th percentile) of `triton.testing.do_bench`.", "",
             "| kernel | pass | torch ms | triton ms | speedup | triton GB/s | % of 2.96 TB/s |",
             "|---|---|---|---|---|---|---|"]
    for name, label, t_torch, t_triton, speedup, gb_s, pct in rows:
        lines.append(f"| {name} | {label} | {_ms(t_torch)} | {_ms(t_triton)} | {speedup:.2f}x | "
                     f"{gb_s:.0f} | {pct:.0f}% |")
    lines += ["", "Fused linear + cross-entropy, forward + backward (grad_hidden; lm_head frozen), "
              f"{N} tokens, 1 in 7 ignored:", "",
              "| case | torch ms | triton ms | speedup | triton TFLOP/s | torch peak GiB | triton peak GiB |",
              "|---|---|---|---|---|---|---|"]
    for name, t_torch, t_triton, speedup, tflops, peak_torch, peak_triton in ce_rows:
        lines.append(f"| {name} | {_ms(t_torch)} | {_ms(t_triton)} | {speedup:.2f}x | {tflops:.0f} | "
                     f"{peak_torch:.2f} | {peak_triton:.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
