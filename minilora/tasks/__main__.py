"""Write the embedded task set to disk: `python -m minilora.tasks --out DIR [--seed N]`.

DIR/train.json      the training tasks as a JSON list of Alpaca records (train.py --data DIR/train.json)
DIR/held_out.jsonl  the held-out tasks as HumanEval problems, one per line (evaluate.py --problems ...)
"""
import argparse
import sys

from ..cli import HelpFormatter
from . import held_out_problems, train_records, write_tasks


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minilora.tasks", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write train.json and held_out.jsonl into")
    parser.add_argument("--seed", type=int, default=0, help="generator seed: the same seed gives the same tasks")
    args = parser.parse_args(argv)
    paths = write_tasks(args.out, args.seed)
    print(f"{len(train_records(args.seed))} training records in {paths['train']}")
    print(f"{len(held_out_problems(args.seed))} held-out problems in {paths['held_out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
