"""Regenerate tests/expected_loss.json, the pinned loss curves of tests/test_train.py (docs/reliability.md C8).

    python scripts/regenerate_expected_loss.py            # prints old vs new, writes the file
    python scripts/regenerate_expected_loss.py --check    # prints old vs new, writes nothing

Run it ONLY when a change is meant to alter the numerics (a new init, a fixed bug in the loss), and say
why in the commit message; never to make a failing test pass without knowing why it failed. The recipe
below is what the test runs: a 2-layer tiny Llama (tests/tiny.py, seed 0), 16 synthetic CodeAlpaca rows,
4 optimizer steps on CPU in fp32, seed 0; one curve with a float base ("float") and one with the
NF4 base through the plain-torch backend ("nf4", written only when the Linear4bit forward exists).
"""
import argparse
import importlib.util
import json
import os
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
EXPECTED = os.path.join(ROOT, "tests", "expected_loss.json")
STEPS = 4


def synthetic_records(n=16):
    """CodeAlpaca-shaped rows with answers of different lengths (so token weighting matters)."""
    rows = []
    for i in range(n):
        body = "\n".join(f"    y = y + {j} * x" for j in range(i % 4 + 1))
        rows.append({"instruction": f"Write a Python function number {i} that transforms x.",
                     "input": "" if i % 3 else f"x = [{i}, {i + 1}]",
                     "output": f"def f{i}(x):\n    y = 0\n{body}\n    return y\n"})
    return rows


def write_inputs(directory):
    """(base model dir, data file) of the recipe, written into `directory`."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tiny import make_checkpoint

    base = os.path.join(directory, "base")
    make_checkpoint("llama", base, seed=0, num_hidden_layers=2)
    data = os.path.join(directory, "data.json")
    with open(data, "w") as f:
        json.dump(synthetic_records(), f)
    return base, data


def recipe_config(base, data, out, quantize="none", **overrides):
    from minilora.config import TrainConfig

    settings = dict(model=base, data=data, out=out, quantize=quantize, backend="torch", device="cpu", dtype="float32",
                    lora_r=8, lora_alpha=16.0, lora_dropout=0.1, learning_rate=1e-3, micro_batch_size=2,
                    grad_accum_steps=2, max_steps=STEPS, max_seq_len=256, test_fraction=0.125, eval_every=0,
                    save_every=0, progress=False, seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def nf4_available():
    return importlib.util.find_spec("minilora.kernels.backend") is not None


def run_recipe(quantize, directory):
    """The per-step training losses of the recipe with a float ('none') or 'nf4' base."""
    from minilora.trainer import read_metrics, train

    base, data = write_inputs(directory)
    out = os.path.join(directory, f"run_{quantize}")
    train(recipe_config(base, data, out, quantize))
    return [r["loss"] for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "loss" in r]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="print old and new curves, write nothing")
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    import torch

    torch.set_num_threads(1)  # as tests/test_train.py runs it (summation order can depend on threads)

    new = {"recipe": "scripts/regenerate_expected_loss.py", "torch": torch.__version__, "steps": STEPS}
    with tempfile.TemporaryDirectory() as d:
        new["float"] = run_recipe("none", d)
    with tempfile.TemporaryDirectory() as d:
        new["nf4"] = run_recipe("nf4", d) if nf4_available() else None
    old = json.load(open(EXPECTED)) if os.path.exists(EXPECTED) else {}
    for key in ("float", "nf4"):
        print(f"{key}:\n  old {old.get(key)}\n  new {new[key]}")
    if not args.check:
        with open(EXPECTED, "w") as f:
            json.dump(new, f, indent=1)
            f.write("\n")
        print(f"wrote {EXPECTED}")


if __name__ == "__main__":
    main()
