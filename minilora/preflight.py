"""Preflight: what can fail in a training run fails before its first step (docs/reliability.md promise 2, E2, E3).

`trainer.train` calls `preflight` after loading everything and before it writes anything. By then loading has
already checked most inputs, and preflight reuses that work instead of repeating it:
  config      TrainConfig.validate(), train's first line (every flag's range and choices);
  data        load_records parsed and checked every row (bad ones fail the run, or are skipped and counted
              with --skip-bad-rows); tokenize_records tokenized every training row (kept, dropped, truncated);
  weights     load_model's strict loader (every tensor's name, shape, dtype and values);
  tokenizer   load_tokenizer (special ids inside its vocabulary).
What loading cannot see is checked here:
  - every token id of the training data, and EOS/PAD, fit the model's embedding (config.json vocab_size):
    a tokenizer from another model otherwise fails at the first batch that holds a large id;
  - free disk for the checkpoints: two kept while a third is written (checkpoint.check_disk_space);
  - one forward and backward at the largest micro-batch the data can produce: micro_batch_size copies of the
    longest example (every row is max_seq_len tokens with --pack). Out of memory, a shape error or a
    non-finite loss shows here, not hours in. The RNG state and the gradients are restored afterwards, so the
    run computes the same numbers as without preflight (tests/test_train.py's pinned loss curve).
It logs a short report (INFO: train.py shows it on stderr): rows kept, dropped and truncated, the step's memory
estimate (minilora.inspect's formulas; on CUDA also the measured peak), and the disk needed.
"""
import logging
import math
import time

import torch

from .checkpoint import check_disk_space, estimate_checkpoint_bytes
from .errors import ConfigError, NonFiniteError, TokenizerError

log = logging.getLogger(__name__)


def preflight(config, model, tok, examples, stats, out, device, dtype, counts=None, verbose=True):
    """Check the run described above; returns the report (logged when `verbose`). Raises a MiniloraError.

    examples: the tokenized training examples; stats: their data.TokenizeStats; counts: load_records'
    {"rows", "bad_rows_skipped", "train", "test"} when known.
    """
    check_token_ids(examples, tok, model.config.vocab_size)
    disk = 3 * estimate_checkpoint_bytes(model)  # keep_last=2 complete ones while the next is written
    check_disk_space(out, disk)
    batch = largest_batch(examples, config, tok.pad_id)
    B, T = batch["input_ids"].shape
    estimate = estimate_step_memory(config, model, B, T, device, dtype)
    seconds, peak = check_step(model, batch, config, device, dtype, estimate)
    counts = counts or {}
    lines = [
        "preflight: ok",
        f"  data     {counts.get('rows', '?')} rows read, {counts.get('bad_rows_skipped', 0)} bad rows skipped; "
        f"{counts.get('train', '?')} train / {counts.get('test', '?')} held out",
        f"  train    {stats} (max_seq_len {config.max_seq_len}, overlong={config.overlong})",
        f"  step     largest micro-batch {B} x {T} tokens: forward + backward ok in {seconds:.1f} s",
        f"  memory   ~{_gib(estimate['total'])} per step estimated ({estimate['detail']})"
        + (f"; measured peak {_gib(peak)}" if peak is not None else ""),
        f"  disk     ~{_gib(disk)} for checkpoints at {out}: enough free",
    ]
    report = "\n".join(lines)
    if verbose:  # train.py logs INFO to stderr; stdout stays for the tables evaluate.py and the study print
        log.info("%s", report)
    return report


def _gib(n):
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_token_ids(examples, tok, vocab_size):
    """TokenizerError if any id the run feeds the model is outside its embedding (vocab_size rows)."""
    top = max(max(ex.input_ids) for ex in examples)
    specials = {"eos": tok.eos_id, "pad": tok.pad_id, "bos": tok.bos_id}
    bad = {name: i for name, i in specials.items() if i is not None and i >= vocab_size}
    if top >= vocab_size or bad:
        raise TokenizerError(f"the tokenizer gives token id {max([top, *bad.values()])} (largest in the training data: "
                             f"{top}; special ids {specials}) but the model's embedding has {vocab_size} rows "
                             "(config.json vocab_size). The tokenizer does not belong to this model: use the "
                             "tokenizer.json of the base model.")


def largest_batch(examples, config, pad_id):
    """The largest micro-batch training can build: micro_batch_size copies of the longest example, padded to
    max_seq_len when packing (a packed row is always max_seq_len tokens)."""
    from .data import collate_packed

    longest = max(examples, key=lambda ex: len(ex.input_ids))
    rows = [[longest]] * min(config.micro_batch_size, len(examples))
    return collate_packed(rows, pad_id, config.max_seq_len if config.pack else None)


def estimate_step_memory(config, model, B, T, device, dtype):
    """{"total": bytes, "detail": text}: minilora.inspect's estimate of one training step at B x T."""
    from .inspect import count_parameters, estimate_memory, meta_model

    meta = meta_model(model.config, config.lora_r, config.lora_alpha, config.lora_targets, config.lora_dropout)
    est = estimate_memory(meta, config.lora_r, config.lora_dropout, B, T, dtype, device, config.uncheckpointed_blocks)
    if config.quantize == "none":  # inspect assumes the QLoRA layout: block linears in NF4
        est["float_weights"] += count_parameters(meta)["quantized"] * torch.empty(0, dtype=dtype).element_size()
        est["nf4_packed"] = est["nf4_stats"] = 0
    weights = est["nf4_packed"] + est["nf4_stats"] + est["float_weights"]
    lora = est["lora_weights"] + est["gradients"] + est["adamw_state"]
    acts = est["activations_checkpointed" if config.gradient_checkpointing else "activations"]
    if config.gradient_checkpointing:
        acts += est["recompute_weights"]
    return {"total": weights + lora + acts,
            "detail": f"weights {_gib(weights)}, LoRA + grads + AdamW {_gib(lora)}, activations {_gib(acts)}"}


def _is_out_of_memory(error):
    # CUDA raises OutOfMemoryError; a failed CPU allocation is a plain RuntimeError with this text
    return isinstance(error, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(error)


def check_step(model, batch, config, device, dtype, estimate):
    """One forward + backward of `batch` in training mode; (seconds, CUDA peak bytes or None).

    ConfigError naming the batch size and length if it runs out of memory, NonFiniteError if the loss or the
    gradients are not finite. The RNG state, the gradients and the module mode are left as they were."""
    from .trainer import _autocast, _to, batch_loss

    B, T = batch["input_ids"].shape
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # dropout draws
            with _autocast(device, dtype):
                loss = batch_loss(model, _to(batch, device), config.pack)
            loss.backward()
            loss = loss.item() / max(1, int((batch["labels"] != -100).sum()))
            grads = [p.grad for p in params if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item() \
                if grads else 0.0
    except RuntimeError as e:
        if not _is_out_of_memory(e):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows = f"--max-seq-len {config.max_seq_len} with --pack" if config.pack else "the longest example"
        checkpointing = "keep --gradient-checkpointing on"
        if config.uncheckpointed_blocks:
            checkpointing += f" with fewer --uncheckpointed-blocks than {config.uncheckpointed_blocks}"
        raise ConfigError(
            f"preflight: one training micro-batch of {B} rows x {T} tokens does not fit in {device} memory "
            f"({str(e).splitlines()[0][:200]}). It is the largest the data can produce (--micro-batch-size "
            f"{config.micro_batch_size}, rows of {rows}); estimated need ~{_gib(estimate['total'])}. Lower "
            "--micro-batch-size and raise --grad-accum-steps to keep the effective batch, lower --max-seq-len, "
            f"{checkpointing}, or use --quantize nf4.") from None
    finally:
        for p in params:
            p.grad = None
        model.train(was_training)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise NonFiniteError(f"preflight: the loss ({loss}) or gradient norm ({grad_norm}) of a {B} x {T} micro-batch "
                             f"is not finite before any training step, in {str(dtype).removeprefix('torch.')} on "
                             f"{device}. The base model overflows on this input: try --dtype float32, or check the "
                             "base weights.")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return time.perf_counter() - t0, peak
