"""Fine-tune a causal LM with QLoRA (or LoRA on a float base) on CodeAlpaca.

    python train.py --model llama3-3b                       # the QLoRA paper's recipe on CodeAlpaca-20k
    python train.py --model M --data FILE --out DIR --max-steps N
    python train.py --config run.yaml --learning-rate 1e-4  # YAML first, typed flags win
    python train.py --out DIR --resume                      # continue from DIR/checkpoints exactly

Every flag and default comes from `minilora.config.TrainConfig`; `--help` lists them. Output in --out:
adapter/ (PEFT files: `load_model(M, adapter=OUT/adapter)` or peft's `PeftModel.from_pretrained`),
checkpoints/, metrics.jsonl, loss.png, train_config.json, manifest.json. See docs/training.md.
"""
import sys

from minilora.config import parse_config
from minilora.errors import MiniloraError
from minilora.cli import setup_logging


def main(argv=None):
    setup_logging()
    try:
        config = parse_config(argv, description=__doc__.split("\n\n")[0])
        from minilora.trainer import train

        train(config)
    except MiniloraError as e:  # our explained errors: the message, no traceback
        print(f"error ({type(e).__name__}): {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
