"""Where the time goes in one decode step (batch 1 or 8, Llama-3.2-3B shape, NF4), for docs/performance.md.

    python benchmarks/profile_decode.py [--batch 1] [--compile]

Random weights at the real shape (benchmarks/generate.py's helper), a 128-token prompt prefilled, then the
step profiled eagerly with torch.profiler (kernels per step and their GPU time, by kernel name) and timed as
the generator runs it, replayed from a CUDA graph (ms per token).
"""
import argparse
import collections
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from generate import load_ours, write_random_checkpoint  # noqa: E402

STEPS = 10


def graph_ms_per_token(decoder, steps=50):
    tokens = torch.zeros(decoder.batch_size, dtype=torch.long, device=decoder.device)
    positions = torch.full_like(tokens, 128)
    for _ in range(3):
        decoder.step(tokens, positions)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        decoder.step(tokens, positions)
        positions += 1
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def profile_step(decoder):
    tokens = torch.zeros(decoder.batch_size, dtype=torch.long, device=decoder.device)
    positions = torch.full_like(tokens, 128)
    for _ in range(3):
        decoder.step(tokens, positions)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            decoder.step(tokens, positions)
        torch.cuda.synchronize()
    kernels = collections.defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name[:90]][0] += 1
            kernels[event.name[:90]][1] += event.device_time_total
    return kernels


def main():
    from minilora.generate import Decoder

    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--workdir", default="/tmp/minilora-bench/llama3.2-3b-gen")
    args = parser.parse_args()
    with open(os.path.join(HERE, "configs", "llama3.2-3b.json")) as f:
        raw = json.load(f)
    write_random_checkpoint(raw, args.workdir, "cuda")
    model = load_ours(args.workdir, torch.bfloat16, "cuda", "nf4").eval()
    with torch.no_grad():
        prompt = torch.randint(3, raw["vocab_size"], (args.batch, 128), device="cuda")
        positions = torch.arange(128, device="cuda").expand(args.batch, 128)
        segments = torch.ones_like(prompt)
        eager = Decoder(model, args.batch, 512, use_graph=False, compile=args.compile)
        eager.prefill(prompt, positions, segments)
        kernels = profile_step(eager)
        graphed = Decoder(model, args.batch, 512, use_graph=True, compile=args.compile)
        graphed.prefill(prompt, positions, segments)
        ms = graph_ms_per_token(graphed)
    total = sum(t for _, t in kernels.values()) / STEPS
    count = sum(n for n, _ in kernels.values()) / STEPS
    print(f"batch {args.batch}, compile={args.compile}: {count:.0f} kernels per step, GPU busy {total / 1e3:.3f} ms "
          f"per step (eager); CUDA-graph replay {ms:.3f} ms per token = {args.batch * 1e3 / ms:,.0f} tok/s")
    print("| kernel | per step | µs per step |\n|---|---:|---:|")
    for name, (n, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:args.rows]:
        print(f"| {name} | {n / STEPS:.0f} | {t / STEPS:.1f} |")


if __name__ == "__main__":
    main()
