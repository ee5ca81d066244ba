"""Score a model (and optionally a LoRA adapter): ROUGE-L on a held-out split, pass@k on code problems, or the study.

    python evaluate.py --model M [--adapter DIR] --data FILE --split test --out OUT       # ROUGE-L
    python evaluate.py --model M --data FILE --prompt-format chat --out OUT               # in M's chat template
    python evaluate.py --model M [--adapter DIR] --problems FILE.jsonl --pass-at 1 --out OUT
    python evaluate.py --study [--models a,b,c] [--seeds 3] --data FILE --out OUT        # the study table

Every flag and default comes from `minilora.evaluation.EvalConfig` (split settings shared with
`TrainConfig`); `--help` lists them. OUT gets predictions.jsonl, summary.json and summary.md (the table is
also printed); the study writes study.json and study.md. See docs/evaluation.md.
"""
import sys

from minilora.config import build_parser, config_from_values, load_yaml_config
from minilora.errors import MiniloraError
from minilora.cli import setup_logging


def parse(argv=None):
    """(EvalConfig, names of the flags typed on the command line): defaults <- --config YAML <- flags."""
    from minilora.evaluation import EvalConfig

    args = vars(build_parser(EvalConfig, __doc__.split("\n\n")[0]).parse_args(argv))
    path = args.pop("config", None)
    values = load_yaml_config(path, EvalConfig) if path else {}
    values.update(args)
    return config_from_values(values, EvalConfig, source=path or "command line"), set(values)


def main(argv=None):
    setup_logging()
    try:
        config, typed = parse(argv)
        from minilora import evaluation

        if config.study:
            from minilora.study import run_study

            study = run_study(config)
            print(study["table"], end="")
            failed = [name for name, cell in study["models"].items() if "error" in cell]
            if failed:
                print(f"error: {len(failed)} model(s) failed ({', '.join(failed)}); see study.json. Rerun the "
                      "same command to retry them (finished cells are kept).", file=sys.stderr)
            return 1 if failed else 0
        config = evaluation.with_run_split(config, typed)
        summary = evaluation.evaluate_problems(config) if config.problems else evaluation.evaluate_rouge(config)
        print(evaluation.summary_table(summary), end="")
    except MiniloraError as e:  # our explained errors: the message, no traceback
        print(f"error ({type(e).__name__}): {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
