"""The study in one command: untuned baselines in both prompt formats, QLoRA tuning over several seeds, the
tuned model, execution pass@1 for every cell, and untuned larger reference models on the same rows.

`python evaluate.py --study` runs, for each model of `--models` (default `STUDY_MODELS`):

  untuned-alpaca        the untuned model prompted with the Alpaca template           -> OUT/<model>/untuned-alpaca/
  untuned-chat          the untuned model in its own chat template (when it has one)  -> OUT/<model>/untuned-chat/
  train-seed<s>         trainer.train with training seed `seed + s`, s < --seeds      -> OUT/<model>/train-seed<s>/
  tuned-seed<s>         that adapter, scored in the format it was trained in          -> OUT/<model>/tuned-seed<s>/

and, for each of `--reference-models`, the untuned model in its chat format (Alpaca without a template). A
cell is ROUGE-L on the held-out split (evaluation.evaluate_rouge) and, when held-out programming problems are
there (`--problems FILE`, else the package's embedded task set when installed), execution pass@1 of greedy
answers run in the sandbox (evaluation.evaluate_problems, into the cell's `pass1/`). `--limit N` caps every
cell alike, so all rows of the table score the same items: the first N held-out rows, and N problems spread
evenly over the problem list (problem files are often grouped by kind).

Tuning uses `--prompt-format` (auto: the chat template when the model has one, else Alpaca). The headline
gain is tuned / (the better untuned baseline) - 1, so a gain that is only the prompt format does not count;
tuned / untuned-alpaca - 1 is the published study's comparison. With several seeds the tuned scores and
gains are reported as mean ± sample standard deviation (untuned cells are greedy and do not vary).

OUT/study.json records every finished cell, written atomically after each one; a rerun skips finished cells
(and resumes an interrupted training run from its last checkpoint), so a larger --seeds adds runs. A rerun
with settings that change the numbers is refused, since its cells would not be comparable. A model that
fails (no network, gated repo, bad files) is recorded with its error and the others go on; rerun to retry.
"""
import dataclasses
import gc
import json
import logging
import math
import os
import re
import time

import torch

from .errors import MiniloraError, ResumeError
from .evaluation import evaluate_problems, evaluate_rouge, load_for_eval, model_tokenizer, write_atomic

log = logging.getLogger(__name__)

STUDY_MODELS = ("llama3-1b", "llama3-3b", "qwen2.5-1.5b", "qwen2.5-3b", "gemma-2b", "gemma2-2b")
# Settings that change the study's numbers: a resumed study must use the same.
COMPARABLE = ("data", "data_format", "split", "test_fraction", "split_seed", "skip_bad_rows", "limit", "quantize",
              "dtype", "max_new_tokens", "temperature", "top_p", "seed", "stop", "max_steps", "prompt_format",
              "problems", "exec_timeout_s")
SCORES = ("rouge_l", "rouge_l_code", "n", "prompt_format", "prediction_chars", "reference_chars",
          "empty_predictions", "tokens_per_s", "seconds")


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


def held_out_problems(config):
    """The programming problems pass@1 is scored on: `--problems FILE`, else the embedded task set's held-out
    problems when this install has it, else None (the table then shows no pass@1)."""
    from .execution import load_problems

    if config.problems:
        problems = load_problems(config.problems)
    else:
        try:
            from . import tasks
        except ImportError:
            log.warning("study: no --problems file and no embedded task set: pass@1 is not scored")
            return None
        problems = tasks.held_out_problems(seed=0)
    if config.limit and config.limit < len(problems):  # evenly spaced: problem files are often grouped by kind
        problems = [problems[i * len(problems) // config.limit] for i in range(config.limit)]
    return problems


def train_config_for(config, model, out, seed_offset=0, prompt_format="auto"):
    """The TrainConfig of one tuning run: defaults <- the --train-config YAML <- the study's data/split/model."""
    from .checkpoint import latest_checkpoint
    from .config import TrainConfig, config_from_values, load_yaml_config

    values = load_yaml_config(config.train_config, TrainConfig) if config.train_config else {}
    values.update(model=model, data=config.data, out=out, test_fraction=config.test_fraction,
                  split_seed=config.split_seed, skip_bad_rows=config.skip_bad_rows, quantize=config.quantize,
                  backend=config.backend, device=config.device, progress=config.progress,
                  data_format=config.data_format, prompt_format=prompt_format)
    values["seed"] = values.get("seed", TrainConfig.seed) + seed_offset
    if config.max_steps:
        values["max_steps"] = config.max_steps
    values["resume"] = latest_checkpoint(os.path.join(out, "checkpoints")) is not None
    values["overwrite"] = not values["resume"]  # a cell's earlier attempt that left no checkpoint is redone
    return config_from_values(values, TrainConfig, source=config.train_config or "study")


def _free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def score_cell(config, name, adapter, prompt_format, out, problems):
    """One cell: ROUGE-L (and pass@1 on `problems`) of the model + adapter in `prompt_format`."""
    cell_config = dataclasses.replace(config, model=name, adapter=adapter or "", out=out, prompt_format=prompt_format,
                                      resume=False, overwrite=True)  # an unfinished cell is redone whole
    model, tok = load_for_eval(cell_config)
    try:
        summary = evaluate_rouge(cell_config, model, tok)
        scores = {k: summary.get(k) for k in SCORES}
        if problems:
            pass_config = dataclasses.replace(cell_config, out=os.path.join(out, "pass1"), pass_at=1, samples=1,
                                              temperature=0.0)
            result = evaluate_problems(pass_config, model, tok, problems=problems)
            scores.update({"pass@1": result["pass@1"], "problems_n": result["n"],
                           "pass1_seconds": result["seconds"]})
        return scores
    finally:
        del model
        _free_memory()


def tuned_format(config, name):
    """The prompt format a model is tuned (and its tuned cells scored) in."""
    if config.prompt_format in ("alpaca", "chat"):
        return config.prompt_format
    return "chat" if model_tokenizer(dataclasses.replace(config, model=name)).chat_template is not None else "alpaca"


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
    problems = held_out_problems(config)

    def save():
        study["table"] = study_table(study, tuned, references)
        write_atomic(path, json.dumps({k: v for k, v in study.items() if k != "table"}, indent=1) + "\n")
        write_atomic(os.path.join(out, "study.md"), study["table"])

    def cell(record, key, *args):
        if key not in record:
            log.info("study: %s %s", name, key)
            start = time.perf_counter()
            record[key] = score_cell(config, name, *args, problems)
            record[key]["wall_seconds"] = round(time.perf_counter() - start, 1)
            save()

    for name in tuned + references:
        record = study["models"].setdefault(name, {})
        record["role"] = "tuned" if name in tuned else "reference"
        record.pop("error", None)
        here = os.path.join(out, slug(name))
        try:
            has_template = model_tokenizer(dataclasses.replace(config, model=name)).chat_template is not None
            if record["role"] == "reference":
                fmt = "chat" if has_template else "alpaca"
                cell(record, f"untuned_{fmt}", "", fmt, os.path.join(here, f"untuned-{fmt}"))
                continue
            cell(record, "untuned_alpaca", "", "alpaca", os.path.join(here, "untuned-alpaca"))
            if has_template:
                cell(record, "untuned_chat", "", "chat", os.path.join(here, "untuned-chat"))
            fmt = tuned_format(config, name)
            runs = record.setdefault("runs", {})
            for s in range(config.seeds):
                run = runs.setdefault(str(s), {})
                if "train" not in run:
                    log.info("study: %s QLoRA fine-tuning, seed offset %d (%s format)", name, s, fmt)
                    start = time.perf_counter()
                    train_config = train_config_for(config, name, os.path.join(here, f"train-seed{s}"), s, fmt)
                    result = train(train_config)
                    run["train"] = {**{k: result[k] for k in ("steps", "train_loss", "eval_loss")},
                                    "adapter": os.path.join(train_config.out, "adapter"),  # relative if --out is
                                    "seed": train_config.seed, "prompt_format": fmt,
                                    "seconds": round(time.perf_counter() - start, 1)}
                    save()
                cell(run, "tuned", run["train"]["adapter"], run["train"]["prompt_format"],
                     os.path.join(here, f"tuned-seed{s}"))
            record["summary"] = summarize(record)
            save()
        except MiniloraError as e:
            log.error("study: %s failed: %s", name, e)
            record["error"] = f"{type(e).__name__}: {e}"
            save()
        finally:
            _free_memory()
    save()
    return study


# ------------------------------------------------------------------------------------------- summary

def mean_sd(values):
    """(mean, sample standard deviation or None for one value) of the non-None values, or (None, None)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _gain(after, before):
    return None if after is None or not before else after / before - 1


def summarize(record):
    """Means and spreads over every finished tuning run (a later, smaller --seeds keeps the earlier runs), the
    two gains per metric, and which baseline was the better."""
    runs = [run["tuned"] for _, run in sorted(record.get("runs", {}).items(), key=lambda kv: int(kv[0]))
            if "tuned" in run]
    summary = {"seeds": len(runs)}
    for metric in ("rouge_l", "rouge_l_code", "pass@1"):
        alpaca = (record.get("untuned_alpaca") or {}).get(metric)
        chat = (record.get("untuned_chat") or {}).get(metric)
        best = max((v for v in (alpaca, chat) if v is not None), default=None)
        tuned = [r.get(metric) for r in runs]
        summary[metric] = {
            "untuned_alpaca": alpaca, "untuned_chat": chat, "best_untuned": best,
            "best_untuned_format": None if best is None else "chat" if chat == best and chat is not None else "alpaca",
            "tuned": mean_sd(tuned),
            "gain_vs_best": mean_sd([_gain(t, best) for t in tuned]),
            "gain_vs_alpaca": mean_sd([_gain(t, alpaca) for t in tuned]),
        }
    return summary


def _pct(value):
    return "—" if value is None else f"{100 * value:.2f}"


def _pct_sd(pair):
    mean, sd = pair
    return "—" if mean is None else _pct(mean) + ("" if sd is None else f" ± {100 * sd:.2f}")


def _gain_sd(pair):
    mean, sd = pair
    return "—" if mean is None else f"{100 * mean:+.1f}%" + ("" if sd is None else f" ± {100 * sd:.1f}")


def study_table(study, tuned, references):
    """The study's markdown: the main table, the answers' lengths, and the larger-reference verdict."""
    lines = ["| model | metric | untuned, Alpaca | untuned, chat | tuned (mean ± sd) | gain vs better untuned | "
             "gain vs untuned Alpaca | rows / problems |", "|---|---|---|---|---|---|---|---|"]
    lengths = ["| model | cell | prompt format | mean answer chars | mean reference chars | empty answers |",
               "|---|---|---|---|---|---|"]
    for name in tuned + references:
        record = study["models"].get(name, {})
        if "error" in record:
            lines.append(f"| {name} | error: {record['error'].splitlines()[0][:200]} |  |  |  |  |  |  |")
            continue
        cells = [(k, record[k]) for k in ("untuned_alpaca", "untuned_chat") if k in record]
        cells += [(f"tuned, seed {s}", r["tuned"]) for s, r in sorted(record.get("runs", {}).items()) if "tuned" in r]
        counts = next((f"{c.get('n', '—')} / {c.get('problems_n', '—')}" for _, c in cells), "—")
        if name in references:
            for metric, label in (("rouge_l", "ROUGE-L"), ("pass@1", "pass@1")):
                alpaca, chat = ((record.get(k) or {}).get(metric) for k in ("untuned_alpaca", "untuned_chat"))
                lines.append(f"| {name} (reference, untuned) | {label} | {_pct(alpaca)} | {_pct(chat)} | — | — | — | "
                             f"{counts} |")
        else:
            summary = record.get("summary") or summarize(record)
            n_seeds = summary["seeds"]
            for metric, label in (("rouge_l", "ROUGE-L"), ("rouge_l_code", "code ROUGE-L"), ("pass@1", "pass@1")):
                m = summary[metric]
                lines.append(f"| {name} | {label} | {_pct(m['untuned_alpaca'])} | {_pct(m['untuned_chat'])} | "
                             f"{_pct_sd(m['tuned'])}{f' ({n_seeds} seeds)' if n_seeds > 1 else ''} | "
                             f"{_bold(_gain_sd(m['gain_vs_best']))} | {_gain_sd(m['gain_vs_alpaca'])} | {counts} |")
        for label, c in cells:
            lengths.append(f"| {name} | {label.replace('_', ', ')} | {c.get('prompt_format', '—')} | "
                           f"{_num(c.get('prediction_chars'))} | {_num(c.get('reference_chars'))} | "
                           f"{_pct(c.get('empty_predictions'))}% |")
    text = "\n".join(lines) + "\n\nWhat the answers look like (characters per answer, after stripping):\n\n"
    text += "\n".join(lengths) + "\n"
    verdicts = reference_verdicts(study, tuned, references)
    if verdicts:
        text += "\nTuned models against the larger untuned references (same rows and problems):\n\n"
        text += "\n".join(f"- {v}" for v in verdicts) + "\n"
    return text


def _bold(text):
    return text if text == "—" else f"**{text}**"


def _num(value):
    return "—" if value is None else f"{value:.0f}"


def reference_verdicts(study, tuned, references):
    """One plain sentence per (tuned model, reference, metric): does the tuned mean beat the reference?"""
    verdicts = []
    for ref in references:
        record = study["models"].get(ref, {})
        scores = record.get("untuned_chat") or record.get("untuned_alpaca")
        if not scores:
            continue
        for name in tuned:
            summary = (study["models"].get(name) or {}).get("summary")
            if not summary:
                continue
            for metric, label in (("rouge_l", "ROUGE-L"), ("pass@1", "pass@1")):
                mine, theirs = summary[metric]["tuned"][0], scores.get(metric)
                if mine is None or theirs is None:
                    continue
                word = "beats" if mine > theirs else "does not beat"
                verdicts.append(f"{name} tuned {word} {ref} untuned on {label}: {_pct(mine)} vs {_pct(theirs)}.")
    return verdicts
