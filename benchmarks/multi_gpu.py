"""Several GPUs under torchrun: train.py on 1 GPU vs 2 GPUs (data parallel) vs 2 GPUs with FSDP2, same run.

Llama-3.2-3B shape (benchmarks/configs/llama3.2-3b.json), random weights written once in bf16, NF4 base, LoRA
r=16 / alpha=16 on all seven block linears, no dropout, the same global batch in every job: 2 micro-batches of
8 packed rows x 512 tokens a step (one micro-batch per GPU on 2 GPUs), gradient checkpointing on, CUDA graphs
as train.py's default (off under FSDP). Text: the CodeAlpaca sample tokenized with a real BPE tokenizer
(--tokenizer: SmolLM2's, 49,152 ids, all inside Llama's 128,256), so the rows have CodeAlpaca's lengths.

tokens/s = the median of metrics.jsonl's `tokens_per_s` (the whole job's input tokens over the wall time of
one optimizer step, on rank 0) after the first 3 steps; peak = rank 0's `memory_gb`. The loss curves of the
jobs are compared step by step (relative difference; bf16 autocast, so only the order of additions differs).

    python benchmarks/multi_gpu.py --data code_alpaca_2k.json --tokenizer DIR   # needs 2 GPUs
"""
import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def prepare_checkpoint(directory, tokenizer_dir):
    """Random Llama-3.2-3B weights with the tokenizer files of `tokenizer_dir` (ids must fit the vocabulary)."""
    from train_step import write_random_checkpoint

    write_random_checkpoint("llama3.2-3b", directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if os.path.exists(os.path.join(tokenizer_dir, name)):
            shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(directory, name))


def train_args(model, data, out, steps, extra=()):
    return ["train.py", "--model", model, "--data", data, "--out", out, "--pack", "--max-seq-len", "512",
            "--micro-batch-size", "8", "--grad-accum-steps", "2", "--max-steps", str(steps), "--lora-r", "16",
            "--lora-alpha", "16", "--lora-dropout", "0", "--learning-rate", "2e-4", "--eval-every", "0",
            "--save-every", "0", "--test-fraction", "0.05", "--eval-examples", "16", "--no-progress", *extra]


def run_job(name, gpus, args, workdir, extra=()):
    out = os.path.join(workdir, name)
    shutil.rmtree(out, ignore_errors=True)
    launcher = [sys.executable] if gpus == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   "--nproc-per-node", str(gpus)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus)))}
    result = subprocess.run(launcher + train_args(args.model_dir, args.data, out, args.steps, extra), cwd=ROOT,
                            env=env, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"{name} failed:\n{result.stderr[-3000:]}", flush=True)
        return {"name": name, "gpus": gpus, "error": result.stderr[-600:]}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if "loss" in r]
    timed = records[3:]
    summary = {"name": name, "gpus": gpus, "steps": len(records), "losses": [r["loss"] for r in records],
               "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
               "peak_gib": max(r["memory_gb"] for r in records)}
    summary["notes"] = [line.split("INFO minilora.trainer: ")[-1] for line in result.stderr.splitlines()
                        if "FSDP2: rank" in line or "preflight" in line and "measured" in line]
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"}), flush=True)
    return summary


def compare(a, b):
    """Largest relative difference between two loss curves, step by step."""
    return max(abs(x - y) / abs(y) for x, y in zip(a["losses"], b["losses"]))


def render(jobs, args):
    one = jobs[0]
    lines = [f"## Several GPUs: train.py on 1 GPU vs torchrun on 2 ({datetime.date.today().isoformat()})", "",
             f"Card: {torch.cuda.device_count()} × {torch.cuda.get_device_name()}, torch {torch.__version__}. Command: "
             "`python benchmarks/multi_gpu.py --data code_alpaca_2k.json --tokenizer <SmolLM2 dir>`. Llama-3.2-3B "
             f"shape, random weights, NF4 base, LoRA r=16 on all seven linears, no dropout, {args.steps} steps of the "
             "same global batch (2 micro-batches × 8 packed rows × 512 tokens), gradient checkpointing, bf16 "
             "autocast. tokens/s: median over steps 4+ of the whole job; peak: rank 0.", "",
             "| job | GPUs | tokens/s | vs 1 GPU | peak GiB (rank 0) | loss curve vs 1 GPU (max rel. diff) |",
             "|---|---:|---:|---:|---:|---|"]
    for job in jobs:
        if "error" in job:
            lines.append(f"| {job['name']} | {job['gpus']} | failed | | | `{job['error'][-200:].strip()}` |")
            continue
        ratio = job["tokens_per_s"] / one["tokens_per_s"] if "error" not in one else float("nan")
        agree = "(baseline)" if job is one else f"{compare(job, one):.2e} over {len(job['losses'])} steps"
        lines.append(f"| {job['name']} | {job['gpus']} | {job['tokens_per_s']:,.0f} | {ratio:.2f}× | "
                     f"{job['peak_gib']:.2f} | {agree} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="CodeAlpaca JSON file")
    parser.add_argument("--tokenizer", required=True, help="directory with tokenizer.json (+ tokenizer_config.json)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workdir", default="/tmp/minilora-multi")
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        sys.exit(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    args.model_dir = os.path.join(args.workdir, "llama3.2-3b")
    prepare_checkpoint(args.model_dir, args.tokenizer)
    jobs = [run_job("1 GPU", 1, args, args.workdir), run_job("2 GPUs, data parallel", 2, args, args.workdir),
            run_job("2 GPUs, FSDP2 base", 2, args, args.workdir, ["--fsdp"])]
    table = render(jobs, args)
    print(table)
    with open(args.results, "a") as f:
        f.write("\n" + table)
    with open(os.path.join(args.workdir, "jobs.json"), "w") as f:
        json.dump(jobs, f)


if __name__ == "__main__":
    main()
