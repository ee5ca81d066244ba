"""Scoring a model: ROUGE-L on a CodeAlpaca split, or pass@k on code problems. The logic behind evaluate.py.

`EvalConfig` holds every evaluation default once (evaluate.py's command line is generated from it); the
settings it shares with training (model, data, split fraction and seed, quantization) take their defaults
from `TrainConfig`, so an evaluation scores exactly the rows training held out. With `--adapter OUT/adapter`
the run's own `OUT/train_config.json` supplies the data file and split unless they are typed on the command
line.

ROUGE-L: every test row's Alpaca prompt (`data.format_prompt`, BOS as in training) is completed by
`generate.generate_text` (greedy by default, at most `max_new_tokens`), and the completion is scored against
the row's `output` with `metrics.rouge_l_scores` (rouge-score's default tokenizer, the study's metric) and its
code-aware variant; the corpus score is the mean F1 over rows. pass@k: `samples` completions per problem
(greedy for pass@1), run in `execution`'s sandbox, scored with the unbiased estimator.

Outputs in `out`: predictions.jsonl (one line per row or sample), summary.json, summary.md (the table
that is also printed); pass@k runs also keep completions.jsonl, and append each executed sample to
predictions.jsonl as it finishes (`--resume` continues a killed run). A non-empty `out` is refused unless
`--resume` or `--overwrite` is given.
"""
import dataclasses
import hashlib
import json
import logging
import os
import re
import time

import torch

from .config import Settings, TrainConfig
from .errors import CheckpointError, DataError, ResumeError
from .outdir import check_not_inside, check_out_dir, remove_outputs

log = logging.getLogger(__name__)

_TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
SPLIT_SETTINGS = ("data", "test_fraction", "split_seed", "skip_bad_rows")  # shared with the training run
# Codex (Chen et al. 2021) stop sequences for HumanEval-style completions of a function body.
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def _field(default, help, **meta):
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def _from_training(name, help=None):
    """A field whose default (and help, choices) is TrainConfig's: one default, two command lines."""
    f = _TRAIN_FIELDS[name]
    return dataclasses.field(default=f.default, metadata={**f.metadata, "help": help or f.metadata["help"]})


@dataclasses.dataclass
class EvalConfig(Settings):
    model: str = _from_training("model")
    adapter: str = _field("", "PEFT LoRA adapter directory (train.py's OUT/adapter); '' = the untuned model")
    data: str = _from_training("data")
    split: str = _field("test", "which side of the train/test split to score", choices=("test", "train"))
    test_fraction: float = _from_training("test_fraction")
    split_seed: int = _from_training("split_seed")
    skip_bad_rows: bool = _from_training("skip_bad_rows")
    limit: int = _field(0, "score only the first N rows (or problems) of the split; 0 = all")
    problems: str = _field("", "JSONL of HumanEval/MBPP-layout problems: score pass@k instead of ROUGE-L")
    pass_at: int = _field(1, "k of pass@k")
    samples: int = _field(0, "completions per problem (0 = k); more than 1 needs --temperature > 0")
    prompt_format: str = _field("raw", "problems: 'raw' (the problem's own prompt) or 'alpaca' (wrapped in the "
                                "training template)", choices=("raw", "alpaca"))
    exec_timeout_s: float = _field(5.0, "wall-clock limit per executed sample (seconds)")
    exec_memory_mb: int = _field(1024, "memory limit per executed sample's sandbox, all its processes together (MiB)")
    exec_workers: int = _field(2, "samples executed at the same time")
    unsafe_no_sandbox: bool = _field(False, "DANGEROUS: where bubblewrap is unavailable, run model-written code "
                                     "without any isolation (it can read, change and delete your files); only in "
                                     "a throwaway VM or container")
    out: str = _field("runs/eval", "output directory: predictions.jsonl, summary.json, summary.md")
    resume: bool = _field(False, "pass@k: continue the run in --out, reusing its completions and skipping the "
                          "samples already executed")
    overwrite: bool = _field(False, "replace the outputs of an earlier run in --out (without it, or --resume, a "
                             "non-empty --out is refused)")
    quantize: str = _from_training("quantize")
    backend: str = _from_training("backend")
    device: str = _from_training("device")
    dtype: str = _field("auto", "weights dtype: 'auto' = bfloat16 on GPU, float32 on CPU",
                        choices=("auto", "bfloat16", "float32"))
    max_new_tokens: int = _field(256, "generated tokens per answer, at most")
    batch_size: int = _field(16, "prompts generated together")
    temperature: float = _field(0.0, "sampling temperature; 0 = greedy")
    top_p: float = _field(1.0, "nucleus sampling mass (with temperature > 0)")
    seed: int = _field(0, "seed of the sampler")
    stop: tuple = _field((), "extra stop strings (cut from the answer); EOS always stops")
    compile: bool = _field(False, "GPU: torch.compile the decode step inside its CUDA graph (faster at batch >= 8; "
                           "10-40 s of compiling per prompt-length bucket)")
    progress: bool = _field(True, "show a tqdm progress bar")
    # --study (minilora/study.py)
    study: bool = _field(False, "run the whole study table: untuned, QLoRA-tuned, relative improvement")
    models: str = _field("", "study: comma-separated short names, hub ids or local dirs ('' = the study's list)")
    reference_models: str = _field("phi3-mini", "study: models scored untuned only, for reference (comma-separated)")
    train_config: str = _field("", "study: YAML file of TrainConfig settings for the tuning runs")
    max_steps: int = _field(0, "study: optimizer steps per tuning run (0 = TrainConfig's epochs)")

    def validate(self):
        """ConfigError naming the flag for values that cannot work; returns self. Every field is checked."""
        need = self.need
        self.check_types()
        need(self.model.strip() != "", "model", "a model name or directory")
        need(self.out.strip() != "", "out", "an output directory")
        self.check_not_a_directory("data", "JSON/JSONL dataset")
        if self.problems:
            need(os.path.isfile(self.problems), "problems", "an existing JSONL file of problems")
        if self.adapter:
            need(os.path.isdir(self.adapter), "adapter", "an adapter directory (train.py's OUT/adapter)")
        self.check_device()
        need(self.exec_timeout_s <= 3600, "exec_timeout_s", "at most 3600 seconds per sample")
        need(self.exec_memory_mb >= 32, "exec_memory_mb", "at least 32 MiB")
        need(not (self.resume and self.overwrite), "overwrite", "not together with --resume")
        need(not self.resume or bool(self.problems) or self.study, "resume", "a pass@k run (--problems): a "
             "ROUGE-L run writes its outputs at its end")
        for name in ("max_new_tokens", "batch_size", "pass_at", "exec_workers", "exec_memory_mb"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1")
        for name in ("limit", "samples", "max_steps"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "an integer >= 0")
        need(self.temperature >= 0, "temperature", "a number >= 0")
        need(0 < self.top_p <= 1, "top_p", "0 < top_p <= 1")
        need(0 <= self.test_fraction < 1, "test_fraction", "0 <= fraction < 1")
        need(self.exec_timeout_s > 0, "exec_timeout_s", "a positive number of seconds")
        need(self.samples == 0 or self.samples >= self.pass_at, "samples", f"at least --pass-at={self.pass_at}")
        need(self.samples <= 1 or self.temperature > 0, "samples", "1 unless --temperature > 0 (greedy samples "
             "are all the same)")
        self.check_choices()
        return self


# ------------------------------------------------------------------------------------- set-up

def training_run_config(adapter):
    """The train_config.json of the run that wrote `adapter` (OUT/adapter -> OUT/train_config.json), or None.
    CheckpointError naming the file if it is not JSON or its split settings have the wrong types."""
    path = os.path.join(os.path.dirname(os.path.abspath(adapter)), "train_config.json")
    if not adapter or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]}); it is read for the "
                              "adapter's train/test split. Fix or remove it, or type --data/--test-fraction/"
                              "--split-seed.") from None
    if not isinstance(run, dict):
        raise CheckpointError(f"{path}: expected a JSON object of training settings, found {type(run).__name__}.")
    for key in SPLIT_SETTINGS:
        if key in run:
            kind = type(_TRAIN_FIELDS[key].default)
            ok = isinstance(run[key], kind) and not (kind is int and isinstance(run[key], bool))
            ok = ok or (kind is float and isinstance(run[key], int) and not isinstance(run[key], bool))
            if not ok:
                raise CheckpointError(f"{path}: {key}={run[key]!r} has type {type(run[key]).__name__}, expected "
                                      f"{kind.__name__}.")
    return run


def with_run_split(config, typed=()):
    """`config` with the adapter's training-run split settings, except those typed on the command line."""
    run = training_run_config(config.adapter) if config.adapter else None
    if run is None:
        return config
    changes = {k: run[k] for k in SPLIT_SETTINGS if k in run and k not in typed and run[k] != getattr(config, k)}
    for k in SPLIT_SETTINGS:
        if k in typed and k in run and run[k] != getattr(config, k):
            log.warning("--%s=%r differs from the adapter's training run (%r): the scored rows may have been "
                        "trained on.", k.replace("_", "-"), getattr(config, k), run[k])
    if changes:
        log.info("split settings from the adapter's train_config.json: %s", changes)
    return dataclasses.replace(config, **changes).validate()


def device_and_dtype(config):
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          "cpu" if config.device == "auto" else config.device)
    if config.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, config.dtype)


def load_for_eval(config):
    """(model, tokenizer) in eval mode, quantized and with the adapter as the config says."""
    from .loading import load_model

    device, dtype = device_and_dtype(config)
    model, tok = load_model(config.model, dtype=dtype, device=device, backend=config.backend,
                            quantize=None if config.quantize == "none" else config.quantize,
                            adapter=config.adapter or None)
    return model.eval(), tok  # eval(): LoRA dropout off, also for layers added after loading


def eval_records(config):
    """The records of the chosen split (in file order), rows with an empty reference dropped and counted."""
    from .data import load_records, split_records

    records = load_records(config.data, skip_bad_rows=config.skip_bad_rows)
    train, test = split_records(records, test_fraction=config.test_fraction, seed=config.split_seed)
    rows = test if config.split == "test" else train
    kept = [r for r in rows if r["output"].strip()]
    if config.limit:
        kept = kept[:config.limit]
    if not kept:
        raise DataError(f"{config.data}: the {config.split} split (test_fraction={config.test_fraction}, "
                        f"split_seed={config.split_seed}) has no rows with a non-empty output to score.")
    return kept, len(rows) - len([r for r in rows if r["output"].strip()])


def _progress(config, total, what):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=what, disable=not config.progress, dynamic_ncols=True)


def _generate(config, model, tok, prompts, stop):
    from .generate import generate_text

    generator = None
    if config.temperature > 0:
        generator = torch.Generator(model.model.embed_tokens.weight.device).manual_seed(config.seed)
    stats = {}
    with _progress(config, len(prompts), "generating") as bar:
        completions = generate_text(model, tok, prompts, config.max_new_tokens, batch_size=config.batch_size,
                                    temperature=config.temperature, top_p=config.top_p, generator=generator,
                                    stop_strings=tuple(stop), compile=config.compile, progress=bar.update,
                                    stats=stats)
    return completions, stats


def _base_summary(config, stats, seconds):
    device, dtype = device_and_dtype(config)
    return {"model": config.model, "adapter": config.adapter or None, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype).removeprefix("torch."), "quantize": config.quantize,
            "new_tokens": stats.get("new_tokens"), "generate_seconds": round(stats.get("seconds", 0.0), 3),
            "tokens_per_s": round(stats["new_tokens"] / stats["seconds"], 1) if stats.get("seconds") else None,
            "seconds": round(seconds, 3), "settings": config.to_dict()}


# ------------------------------------------------------------------------------------- ROUGE-L

def evaluate_rouge(config, model=None, tok=None):
    """Score the split with ROUGE-L and code-aware ROUGE-L; write the outputs; return the summary dict."""
    from .data import format_prompt
    from .metrics import rouge_l_scores

    config.validate()
    start = time.perf_counter()
    check_eval_out(config)
    records, empty = eval_records(config)
    if model is None:
        model, tok = load_for_eval(config)
    completions, stats = _generate(config, model, tok, [format_prompt(r) for r in records], config.stop)
    predictions = [c.strip() for c in completions]
    references = [r["output"] for r in records]
    scores = rouge_l_scores(predictions, references)
    code_scores = rouge_l_scores(predictions, references, code=True)
    rows = [{"row": i, "instruction": r["instruction"], "input": r["input"], "reference": r["output"],
             "prediction": p, "rouge_l": s, "rouge_l_code": c}
            for i, (r, p, s, c) in enumerate(zip(records, predictions, scores, code_scores))]
    summary = {"rouge_l": sum(scores) / len(scores), "rouge_l_code": sum(code_scores) / len(code_scores),
               "n": len(rows), "split": config.split, "data": config.data, "test_fraction": config.test_fraction,
               "split_seed": config.split_seed, "skipped_empty_reference": empty,
               **_base_summary(config, stats, time.perf_counter() - start)}
    if config.overwrite:
        remove_outputs(config.out, EVAL_OUTPUTS)
    write_outputs(config.out, rows, summary)
    return summary


# ------------------------------------------------------------------------------------- pass@k

def extract_code(text):
    """The first ```-fenced block of `text` if there is one (instruction-tuned answers), else `text`."""
    match = re.search(r"```[^\n`]*\n(.*?)(?:```|$)", text, flags=re.S)
    return match.group(1) if match else text


def problem_prompt_text(problem, prompt_format):
    from .data import format_prompt
    from .execution import problem_layout, problem_prompt

    if prompt_format == "raw":
        return problem_prompt(problem)
    if problem_layout(problem) == "humaneval":
        record = {"instruction": "Complete the following Python function.", "input": problem["prompt"]}
    else:
        record = {"instruction": problem_prompt(problem), "input": ""}
    return format_prompt(record)


def evaluate_problems(config, model=None, tok=None):
    """pass@k of the model's completions of `config.problems`; writes the outputs; returns the summary.

    Before the model loads: the settings, --out, the problems file and the sandbox (SandboxError without
    bubblewrap unless --unsafe-no-sandbox). The completions are written to completions.jsonl once generated;
    each executed sample's row is then appended to predictions.jsonl (one write, fsynced) as it finishes, so
    a killed run loses only the samples in flight, and `--resume` reuses the completions and skips every
    sample already in predictions.jsonl. At the end predictions.jsonl is rewritten in problem order.
    """
    from .execution import Limits, load_problems, problem_layout, run_samples, sandbox_report, use_sandbox
    from .metrics import pass_at_k

    config.validate()
    start = time.perf_counter()
    check_eval_out(config)
    problems = load_problems(config.problems)
    problems = problems[:config.limit] if config.limit else problems
    samples = config.samples or config.pass_at
    use_sandbox(config.unsafe_no_sandbox)
    raw_humaneval = config.prompt_format == "raw" and all(problem_layout(p) == "humaneval" for p in problems)
    stop = tuple(config.stop) or (HUMANEVAL_STOP if raw_humaneval else ())
    settings = _completion_settings(config, samples, stop)
    completions_path = os.path.join(config.out, "completions.jsonl")
    predictions_path = os.path.join(config.out, "predictions.jsonl")
    stats = {}
    if config.resume:
        completions = _read_completions(completions_path, settings, len(problems) * samples)
    else:
        if model is None:
            model, tok = load_for_eval(config)
        prompts = [problem_prompt_text(p, config.prompt_format) for p in problems for _ in range(samples)]
        completions, stats = _generate(config, model, tok, prompts, stop)
        if config.prompt_format == "alpaca":
            completions = [extract_code(c) for c in completions]
        if config.overwrite:
            remove_outputs(config.out, EVAL_OUTPUTS)
        os.makedirs(config.out, exist_ok=True)
        write_atomic(completions_path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                               for r in [{"settings": settings}] + [{"completion": c} for c in completions]))
    grouped = [completions[i * samples:(i + 1) * samples] for i in range(len(problems))]
    done = _read_predictions(predictions_path) if config.resume else {}
    jobs = [((i, j), problems[i], grouped[i][j]) for i in range(len(problems)) for j in range(samples)
            if (i, j) not in done]
    if config.resume:
        log.info("--resume: %d of %d samples already executed, %d to run", len(done), len(problems) * samples, len(jobs))
    limits = Limits(timeout_s=config.exec_timeout_s, memory_mb=config.exec_memory_mb)
    fd = os.open(predictions_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        with _progress(config, len(jobs), "executing") as bar:
            for (i, j), result in run_samples(jobs, limits, config.exec_workers, config.unsafe_no_sandbox):
                row = {"problem": i, "task_id": problems[i].get("task_id", i), "sample": j, "completion": grouped[i][j],
                       "status": result.status, "stderr_tail": result.stderr_tail[-500:]}
                os.write(fd, (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))  # one write: one whole line
                os.fsync(fd)
                done[(i, j)] = row
                bar.update(1)
    finally:
        os.close(fd)
    rows = [done[(i, j)] for i in range(len(problems)) for j in range(samples)]
    correct = [sum(done[(i, j)]["status"] == "passed" for j in range(samples)) for i in range(len(problems))]
    scores = {f"pass@{config.pass_at}": sum(pass_at_k(samples, c, config.pass_at) for c in correct) / len(problems)}
    summary = {**scores, "n": len(problems), "samples_per_problem": samples, "problems": config.problems,
               "passed_samples": sum(r["status"] == "passed" for r in rows),
               "statuses": {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})},
               "stop": list(stop), "sandbox": sandbox_report(), **_base_summary(config, stats, time.perf_counter() - start)}
    write_outputs(config.out, rows, summary)
    return summary


EVAL_OUTPUTS = ("predictions.jsonl", "completions.jsonl", "summary.json", "summary.md")


def check_eval_out(config):
    """--out checks before the model loads (outdir.py); never inside the model or adapter directory."""
    for path, what in ((config.model, "the model directory"), (config.adapter, "the adapter directory")):
        if path and os.path.isdir(path):
            check_not_inside(config.out, path, what)
    check_out_dir(config.out, resume=config.resume, overwrite=config.overwrite)


def _completion_settings(config, samples, stop):
    """What decides the completions: a resumed run must have generated them with exactly these."""
    with open(config.problems, "rb") as f:
        problems_sha256 = hashlib.sha256(f.read()).hexdigest()
    keys = ("model", "adapter", "limit", "prompt_format", "max_new_tokens", "temperature", "top_p", "seed",
            "quantize", "dtype", "backend")
    return {**{k: getattr(config, k) for k in keys}, "problems_sha256": problems_sha256, "samples": samples,
            "stop": list(stop)}


def _read_completions(path, settings, count):
    """The completions of the run being resumed; ResumeError if there are none or other settings made them."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise ResumeError(f"--resume: {path} is missing, so there is nothing to resume (its completions are "
                          "written once generation ends). Start without --resume (with --overwrite).") from None
    except ValueError as e:
        raise ResumeError(f"--resume: {path} is not valid JSONL ({e}).") from None
    saved = rows[0].get("settings") if rows and isinstance(rows[0], dict) else None
    if not isinstance(saved, dict):
        raise ResumeError(f"--resume: {path} does not start with the run's settings.")
    differ = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if differ:
        listed = ", ".join(f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in differ)
        raise ResumeError(f"--resume: the run in {os.path.dirname(path)} was made with other settings ({listed}). "
                          "Use the same settings, or --overwrite.")
    completions = [r.get("completion") for r in rows[1:] if isinstance(r, dict)]
    if len(completions) != count or not all(isinstance(c, str) for c in completions):
        raise ResumeError(f"--resume: {path} holds {len(completions)} completions, expected {count}.")
    return completions


def _read_predictions(path):
    """{(problem, sample): row} of the samples already executed; a torn last line (a kill mid-write) is cut."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    whole = data[:data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        log.info("--resume: %s ends in a partly written line; it is dropped", path)
        write_atomic(path, whole.decode("utf-8", errors="replace"))
    done = {}
    for line in whole.decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            done[(int(row["problem"]), int(row["sample"]))] = row
        except (ValueError, KeyError, TypeError):
            continue
    return done


# ------------------------------------------------------------------------------------- outputs

def _pct(value):
    return "—" if value is None else f"{100 * value:.2f}"


def summary_table(summary):
    """The markdown table of one evaluation (scores in percent)."""
    name = summary["model"] + (f" + {summary['adapter']}" if summary.get("adapter") else "")
    speed = f"{summary['tokens_per_s']:.0f}" if summary.get("tokens_per_s") else "—"
    pass_keys = sorted(k for k in summary if k.startswith("pass@"))
    if pass_keys:
        head = "| model | problems | samples | " + " | ".join(pass_keys) + " | tokens/s | seconds |"
        row = (f"| {name} | {summary['n']} | {summary['samples_per_problem']} | "
               + " | ".join(_pct(summary[k]) for k in pass_keys) + f" | {speed} | {summary['seconds']:.0f} |")
    else:
        head = "| model | split | n | ROUGE-L | code ROUGE-L | tokens/s | seconds |"
        row = (f"| {name} | {summary['split']} (seed {summary['split_seed']}) | {summary['n']} | "
               f"{_pct(summary['rouge_l'])} | {_pct(summary['rouge_l_code'])} | {speed} | {summary['seconds']:.0f} |")
    sep = "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"
    return "\n".join([head, sep, row]) + "\n"


def write_outputs(out, rows, summary):
    """predictions.jsonl, summary.json, summary.md in `out` (each written whole, then renamed)."""
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, "predictions.jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    write_atomic(os.path.join(out, "summary.md"), summary_table(summary))


def write_atomic(path, text):
    """Write `text` to a temp file beside `path`, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
