"""The study in one command: for each model, untuned ROUGE-L, QLoRA fine-tuning, tuned ROUGE-L, relative gain.

The published study's table, on whatever checkpoints one has: `python evaluate.py --study` runs, for each
model of `--models` (default `STUDY_MODELS`), three cells, each as its own command would:

  untuned   evaluation.evaluate_rouge on the test split               -> OUT/<model>/untuned/
  train     trainer.train (TrainConfig defaults, `--train-config` YAML, the study's data and split)
                                                                       -> OUT/<model>/train/ (adapter/ inside)
  tuned     evaluate_rouge with that adapter                           -> OUT/<model>/tuned/

and `--reference-models` (default phi3-mini) untuned only. Relative improvement = tuned / untuned - 1.
OUT/study.json records every finished cell, written atomically after each one; a rerun skips finished cells
(and resumes an interrupted training run from its last checkpoint). A rerun with settings that change the
numbers (data, split, generation, training) is refused, since its cells would not be comparable. A model that
fails (no network, gated repo, bad files) is recorded with its error and the others go on; rerun to retry.
"""
import dataclasses
import gc
import json
import logging
import os
import re
import time

import torch

from .errors import MiniloraError, ResumeError
from .evaluation import evaluate_rouge, write_atomic

log = logging.getLogger(__name__)

STUDY_MODELS = ("llama3-1b", "llama3-3b", "qwen2.5-1.5b", "qwen2.5-3b", "gemma-2b", "gemma2-2b")
# Settings that change the study's numbers: a resumed study must use the same.
COMPARABLE = ("data", "split", "test_fraction", "split_seed", "skip_bad_rows", "limit", "quantize", "dtype",
              "max_new_tokens", "temperature", "top_p", "seed", "stop", "max_steps")
SCORES = ("rouge_l", "rouge_l_code", "n", "tokens_per_s", "seconds")


def model_list(text, default):
    return [m.strip() for m in text.split(",") if m.strip()] if text.strip() else list(default)


def slug(name):
    """A directory name for a short name, hub id or local path."""
    name = os.path.basename(os.path.normpath(name)) if os.path.isdir(name) else name
    return re.sub(r"[^A-Za-z0-9._-]+", "__", name)


def study_settings(config):
    settings = {k: getattr(config, k) for k in COMPARABLE}
    settings["stop"] = list(settings["stop"])
    settings["train_config"] = _read_text(config.train_config) if config.train_config else None
    return settings


def _read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def train_config_for(config, model, out):
    """The TrainConfig of one tuning run: defaults <- the --train-config YAML <- the study's data/split/model."""
    from .checkpoint import latest_checkpoint
    from .config import TrainConfig, config_from_values, load_yaml_config

    values = load_yaml_config(config.train_config, TrainConfig) if config.train_config else {}
    values.update(model=model, data=config.data, out=out, test_fraction=config.test_fraction,
                  split_seed=config.split_seed, skip_bad_rows=config.skip_bad_rows, quantize=config.quantize,
                  backend=config.backend, device=config.device, progress=config.progress)
    if config.max_steps:
        values["max_steps"] = config.max_steps
    values["resume"] = latest_checkpoint(os.path.join(out, "checkpoints")) is not None
    values["overwrite"] = not values["resume"]  # a cell's earlier attempt that left no checkpoint is redone
    return config_from_values(values, TrainConfig, source=config.train_config or "study")


def _free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _relative(cell):
    untuned, tuned = cell.get("untuned"), cell.get("tuned")
    if not untuned or not tuned or not untuned["rouge_l"]:
        return None
    return tuned["rouge_l"] / untuned["rouge_l"] - 1


def run_study(config):
    """Run (or finish) the study in `config.out`; returns study.json's content plus the markdown `table`."""
    from .trainer import train

    out = config.out
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "study.json")
    settings = study_settings(config)
    study = {"settings": settings, "models": {}}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            study = json.load(f)
        changed = {k: (study["settings"].get(k), v) for k, v in settings.items() if study["settings"].get(k) != v}
        if changed:
            listed = "; ".join(f"{k}: recorded {old!r}, now {new!r}" for k, (old, new) in changed.items())
            raise ResumeError(f"{path}: this study was run with other settings ({listed}). Use another --out, or "
                              "the recorded settings to finish it.")
    tuned = model_list(config.models, STUDY_MODELS)
    references = [m for m in model_list(config.reference_models, ()) if m not in tuned]

    def save():
        study["table"] = study_table(study, tuned, references)
        write_atomic(path, json.dumps({k: v for k, v in study.items() if k != "table"}, indent=1) + "\n")
        write_atomic(os.path.join(out, "study.md"), study["table"])

    for name in tuned + references:
        cell = study["models"].setdefault(name, {})
        cell["role"] = "tuned" if name in tuned else "reference"
        cell.pop("error", None)
        here = os.path.join(out, slug(name))
        try:
            if "untuned" not in cell:
                log.info("study: %s untuned", name)
                summary = evaluate_rouge(dataclasses.replace(config, model=name, adapter="", resume=False, overwrite=True,
                                                             out=os.path.join(here, "untuned")))
                cell["untuned"] = {k: summary[k] for k in SCORES}
                save()
            if cell["role"] == "reference":
                continue
            if "train" not in cell:
                log.info("study: %s QLoRA fine-tuning", name)
                start = time.perf_counter()
                result = train(train_config_for(config, name, os.path.join(here, "train")))
                cell["train"] = {**{k: result[k] for k in ("steps", "train_loss", "eval_loss", "adapter")},
                                 "seconds": round(time.perf_counter() - start, 1)}
                save()
            if "tuned" not in cell:
                log.info("study: %s tuned", name)
                summary = evaluate_rouge(dataclasses.replace(config, model=name, adapter=cell["train"]["adapter"],
                                                             resume=False, overwrite=True, out=os.path.join(here, "tuned")))
                cell["tuned"] = {k: summary[k] for k in SCORES}
            cell["relative_improvement"] = _relative(cell)
            save()
        except MiniloraError as e:
            log.error("study: %s failed: %s", name, e)
            cell["error"] = f"{type(e).__name__}: {e}"
            save()
        finally:
            _free_memory()
    save()
    return study


def _pct(value):
    return "—" if value is None else f"{100 * value:.2f}"


def study_table(study, tuned, references):
    """The study's markdown table: ROUGE-L F1 in percent, relative improvement in percent."""
    lines = ["| model | untuned ROUGE-L | QLoRA ROUGE-L | relative improvement | untuned code ROUGE-L | "
             "QLoRA code ROUGE-L | n |", "|---|---|---|---|---|---|---|"]
    for name in tuned + references:
        cell = study["models"].get(name, {})
        if "error" in cell:
            lines.append(f"| {name} | error: {cell['error'].splitlines()[0][:200]} |  |  |  |  |  |")
            continue
        before, after = cell.get("untuned") or {}, cell.get("tuned") or {}
        relative = cell.get("relative_improvement")
        label = name if name in tuned else f"{name} (reference, untuned)"
        lines.append(f"| {label} | {_pct(before.get('rouge_l'))} | {_pct(after.get('rouge_l'))} | "
                     f"{'—' if relative is None else f'{100 * relative:+.1f}%'} | {_pct(before.get('rouge_l_code'))} | "
                     f"{_pct(after.get('rouge_l_code'))} | {before.get('n', '—')} |")
    return "\n".join(lines) + "\n"
