"""Where the time goes in one minilora QLoRA training step (torch.profiler), for docs/performance.md.

    python benchmarks/profile_step.py --model llama3.2-3b --ckpt on

Random weights at the real shapes (written by train_step.py's helper), LoRA r=16 on all seven linears,
batch 8 x 512. Prints the ops sorted by GPU time and the step's CPU vs GPU totals.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import batch_of, minilora_stack, write_random_checkpoint  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama3.2-3b")
    parser.add_argument("--ckpt", choices=["on", "off"], default="on")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--shapes", action="store_true", help="group by input shapes, one compact line per op")
    parser.add_argument("--graphed", action="store_true", help="profile the trainer's CUDA-graph step instead")
    parser.add_argument("--workdir", default="/tmp/minilora-bench")
    args = parser.parse_args()
    directory = os.path.join(args.workdir, args.model)
    write_random_checkpoint(args.model, directory)
    model, loss_fn, _ = minilora_stack(directory, args.ckpt == "on")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=True)
    ids, labels = batch_of(model.config.vocab_size, args.batch, args.seq, seed=1)

    graphed = None
    if args.graphed:  # the trainer's own step, as benchmarks/train_step.py times it: CUDA-graph micro-steps
        from minilora.config import TrainConfig
        from minilora.trainer import GraphedMicroSteps, optimizer_step

        config = TrainConfig(max_grad_norm=0.3, pack=False)
        graphed = GraphedMicroSteps(model, params, False, torch.bfloat16, 0)
        batch = {"input_ids": ids, "labels": labels}

    def step():
        if graphed is not None:
            optimizer_step(model, optimizer, params, [batch], 2e-4, config, torch.device("cuda"), torch.bfloat16,
                           graphed)
            return
        loss_fn(ids, labels).backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                                record_shapes=args.shapes) as prof:
        step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    events = prof.key_averages(group_by_input_shape=args.shapes)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
    span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / 1e3
    print(f"step wall {wall * 1e3:.1f} ms (profiled); {len(kernels)} kernels, {busy:.1f} ms busy over a {span:.1f} ms "
          "span from the first kernel to the last")
    if args.shapes:  # compact: GPU ms, calls, name, input shapes and dtypes of the ops that launch kernels
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:args.rows]:
            print(f"{e.self_device_time_total / 1e3:8.2f} ms {e.count:5d}  {e.key[:60]:60s} {e.input_shapes}")
        return
    print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
