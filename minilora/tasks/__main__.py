"""Write the embedded task set to disk: `python -m minilora.tasks --out DIR [--seed N]`.

DIR/train.json      the training tasks as a JSON list of Alpaca records (train.py --data DIR/train.json)
DIR/held_out.jsonl  the held-out tasks as HumanEval problems, one per line (evaluate.py --problems ...)
"""
import argparse
import json
import os
import sys

from . import held_out_problems, train_records


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minilora.tasks", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write train.json and held_out.jsonl into")
    parser.add_argument("--seed", type=int, default=0, help="generator seed: the same seed gives the same tasks")
    args = parser.parse_args(argv)
    paths = write_tasks(args.out, args.seed)
    for what, path in paths.items():
        print(f"{what}: {path}")
    return 0


def write_tasks(out, seed=0):
    """Write both files into `out` (created if needed); {"train": path, "held_out": path}."""
    os.makedirs(out, exist_ok=True)
    records, problems = train_records(seed), held_out_problems(seed)
    paths = {"train": os.path.join(out, "train.json"), "held_out": os.path.join(out, "held_out.jsonl")}
    with open(paths["train"], "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    with open(paths["held_out"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p) + "\n" for p in problems)
    print(f"{len(records)} training records, {len(problems)} held-out problems", file=sys.stderr)
    return paths


if __name__ == "__main__":
    sys.exit(main())
