"""Do the fast path and the plain-PyTorch reference path train the same? 50 steps of train.py, twice, on a GPU.

fast:      --backend auto (Triton NF4 kernels, Triton RMSNorm/RoPE/GLU/fused linear+cross-entropy, the fused LoRA
           autograd node) with CUDA-graph micro-steps, as train.py runs by default on a GPU;
reference: --backend torch --no-cuda-graphs (minilora/nf4.py dequantize + F.linear, the torch norm/RoPE/GLU/loss,
           LoRA as plain autograd ops), eager.
Both: the same real checkpoint, data, split, seed, NF4 base, LoRA (no dropout, so no random masks differ),
bf16 autocast. They differ only in the kernels, so their loss curves differ only by bf16 rounding (per-op
results differ in the last bf16 bits, ~0.4% relative, and those differences compound through training).

    python benchmarks/loss_agreement.py --model DIR --data code_alpaca_2k.json --out OUT
"""
import argparse
import datetime
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PATHS = {"fast": ["--backend", "auto", "--cuda-graphs"], "reference": ["--backend", "torch", "--no-cuda-graphs"]}


def run(name, args):
    out = os.path.join(args.out, name)
    cmd = [sys.executable, "train.py", "--model", args.model, "--data", args.data, "--out", out,
           "--max-steps", str(args.steps), "--lora-r", "16", "--lora-alpha", "32", "--lora-dropout", "0",
           "--learning-rate", "2e-4", "--micro-batch-size", "4", "--grad-accum-steps", "4", "--max-seq-len", "512",
           "--test-fraction", "0.1", "--eval-every", "10", "--eval-examples", "64", "--save-every", "0",
           "--no-progress", *PATHS[name]]
    subprocess.run(cmd, cwd=ROOT, check=True)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    curves = {name: run(name, args) for name in PATHS}
    train = {n: [r["loss"] for r in c if "loss" in r] for n, c in curves.items()}
    evals = {n: {r["step"]: r["eval_loss"] for r in c if "eval_loss" in r} for n, c in curves.items()}
    fast, ref = train["fast"], train["reference"]
    rel = [abs(a - b) / b for a, b in zip(fast, ref)]
    eval_rel = {s: abs(evals["fast"][s] - evals["reference"][s]) / evals["reference"][s] for s in evals["reference"]}
    summary = {"steps": len(fast), "train_loss_first": [fast[0], ref[0]], "train_loss_last": [fast[-1], ref[-1]],
               "max_rel_diff": max(rel), "mean_rel_diff": sum(rel) / len(rel), "eval": evals,
               "eval_max_rel_diff": max(eval_rel.values()),
               "tokens_per_s_median": {n: sorted(r["tokens_per_s"] for r in c if "loss" in r)[len(fast) // 2]
                                       for n, c in curves.items()},
               "date": datetime.date.today().isoformat()}
    with open(os.path.join(args.out, "agreement.json"), "w") as f:
        json.dump({"summary": summary, "train": train}, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, losses in train.items():
            ax.plot(range(1, len(losses) + 1), losses, label=f"{name} (train)", lw=1)
            ax.plot(list(evals[name]), list(evals[name].values()), "o--", label=f"{name} (eval)", ms=4)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "agreement.png"), dpi=110)
    except ImportError:
        pass
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
