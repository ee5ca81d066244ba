"""The training loop: QLoRA / LoRA fine-tuning of a causal LM on CodeAlpaca, in plain PyTorch.

`train(config)` reads top to bottom: load and split the data (fails before the model loads), load the
base model (NF4 or float), add LoRA, build AdamW, resume if asked, then for each optimizer step:

  1. take `grad_accum_steps` micro-batches of the epoch's fixed batch order (data.BatchOrder);
  2. loss = (sum of token losses over ALL micro-batches) / (answer tokens in ALL micro-batches), so every
     answer token weighs the same whatever micro-batch it lands in (torchtune's token normalisation;
     dividing each micro-batch by its own count would over-weight short answers);
  3. clip the global gradient norm; if the loss or the norm is NaN/inf, skip the update (no optimizer or
     schedule step) and stop with NonFiniteError after `max_nonfinite_steps` such steps in a row;
  4. AdamW step, learning rate = warmup then constant / cosine / linear decay;
  5. log a JSONL line, eval loss before the first step and every `eval_every` steps (with eval_every > 0), an
     atomic checkpoint every `save_every`.

At the end: OUT/adapter/ (PEFT files), metrics.jsonl, loss.png, train_config.json, manifest.json.
Precision: bf16 autocast on GPU with LoRA weights and optimizer state in fp32 (QLoRA's setup); fp32 on CPU.
Resume is exact (tests/test_train.py): the data cursor, optimizer, RNG states and step are restored.
Under torchrun each rank runs its share of a step's micro-batches and gradients are summed (distributed.py).
"""
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time

import numpy as np
import torch

from . import distributed
from .checkpoint import latest_checkpoint, load_checkpoint, read_state, save_checkpoint
from .config import TrainConfig
from .errors import ConfigError, NonFiniteError, ResumeError
from .lora import apply_lora, check_finite, lora_parameters, parameter_counts, save_adapter
from .outdir import check_not_inside, check_out_dir, remove_outputs
from .preflight import preflight

log = logging.getLogger(__name__)

# Settings a resumed run must share with its checkpoint (they change the model, the data order or what a
# step means). Others (learning rate, max_steps, eval/save cadence) may change, with a warning.
RESUME_MUST_MATCH = ("model", "data", "quantize", "dtype", "lora_r", "lora_alpha", "lora_dropout", "lora_targets",
                     "use_rslora", "optimizer", "micro_batch_size", "grad_accum_steps", "seed", "max_seq_len",
                     "overlong", "pack", "test_fraction", "split_seed", "skip_bad_rows")


@dataclasses.dataclass
class TrainState:
    """Where the run is: everything besides tensors that a checkpoint must restore."""
    step: int = 0  # optimizer steps attempted (skipped non-finite ones included)
    updates: int = 0  # optimizer steps taken: the learning-rate schedule's clock
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    nonfinite_in_a_row: int = 0
    tokens_seen: int = 0  # answer tokens trained on


# ------------------------------------------------------------------------------------------- pieces

RUN_OUTPUTS = ("checkpoints", "adapter", "metrics.jsonl", "manifest.json", "train_config.json", "loss.png")  # --overwrite


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def resolve_device_and_dtype(config):
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          "cpu" if config.device == "auto" else config.device)
    if config.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, config.dtype)
    if dtype == torch.bfloat16 and device.type == "cpu":
        raise ConfigError("--dtype bfloat16 on CPU: bf16 autocast is for GPUs; use --dtype float32 (or auto).")
    return device, dtype


def learning_rate_at(config, update, total_updates):
    """Linear warmup from 0 over `warmup_steps`, then constant / cosine to 0 / linear to 0 (HF schedules)."""
    peak, warmup = config.learning_rate, config.warmup_steps
    if update < warmup:
        return peak * (update + 1) / (warmup + 1)
    if config.lr_schedule == "constant":
        return peak
    progress = min(1.0, (update - warmup) / max(1, total_updates - warmup))
    if config.lr_schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * (1.0 - progress)


def build_optimizer(config, params):
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                  weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    try:
        import bitsandbytes as bnb  # only for the 8-bit / paged optimizers
    except ImportError as e:
        raise ConfigError(f"--optimizer {config.optimizer} needs bitsandbytes ({e}); pip install bitsandbytes, "
                          "or use --optimizer adamw.") from None
    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw32bit": bnb.optim.PagedAdamW32bit}[config.optimizer]
    return cls(params, **kwargs)


def batch_loss(model, batch, packed):
    """Sum of cross-entropy over the answer tokens of one micro-batch (a device scalar, no host sync).

    labels are already shifted (data.py): labels[t] is the target of position t. Unpacked right-padded
    rows need no positions/segments: causal order already hides the padding on the right, and leaving
    them out keeps SDPA's fast causal path. Packed rows pass both so examples do not see each other.
    `Transformer.loss` uses the fused linear + cross-entropy kernel on CUDA (no (tokens x V) logits).
    """
    if packed:
        return model.loss(batch["input_ids"], batch["labels"], batch["positions"], batch["segments"])
    return model.loss(batch["input_ids"], batch["labels"])


def token_loss_sum(model, batch, packed):
    """(batch_loss, number of answer tokens) for one micro-batch."""
    return batch_loss(model, batch, packed), int((batch["labels"] != -100).sum())


def step_batches(order, state, accum, last_epoch):
    """Yield each optimizer step's list of micro-batches, from the data cursor in `state` on.

    The cursor (state.epoch, state.batch_in_epoch) advances as batches are taken, so a checkpoint saved
    after a step resumes at the next batch. A step never spans two epochs (the last one of an epoch may
    be short). last_epoch: the final epoch index, or None to go on until the caller stops (--max-steps).
    """
    while last_epoch is None or state.epoch <= last_epoch:
        micro = []
        for batch in order.batches(state.epoch, state.batch_in_epoch):
            micro.append(batch)
            state.batch_in_epoch += 1
            if len(micro) == accum:
                yield micro
                micro = []
        if micro:
            yield micro
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0


def optimizer_step(model, optimizer, params, micro, lr, config, device, dtype, graphed=None, ranks=None):
    """Accumulate gradients over `micro`, clip, and step unless non-finite; returns (loss, grad norm, tokens).

    The loss is sum(token losses) / N with N the answer tokens of ALL micro-batches, counted before any
    backward, so the accumulated gradient is exactly that of one big batch. `graphed` (GraphedMicroSteps)
    replays captured forward+backward graphs instead of running them eagerly. Under torchrun (`ranks`,
    distributed.py) `micro` is the step's global list: this rank runs its share, then gradients are summed.
    """
    ranks = ranks or distributed.Ranks()
    n_tokens = sum(int((b["labels"] != -100).sum()) for b in micro)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)  # summed on the device: one host sync per step, not per micro-batch
    for batch, weight in ranks.work(micro):  # weight 0: an FSDP rank keeping step with busier ones
        batch = _to(batch, device)
        if graphed is not None:
            loss_sum += graphed(batch, 1.0 / n_tokens)
            continue
        with _autocast(device, dtype), _offload(config, device):
            loss, _ = token_loss_sum(model, batch, config.pack)
        if weight:
            (loss / n_tokens).backward()
            loss_sum += loss.detach()
        else:
            (loss * 0.0).backward()  # the same all-gathers as the other ranks, no gradient
    loss_sum = distributed.sum_over_ranks(ranks, params, loss_sum)  # one all_reduce; nothing on one process
    step_loss = loss_sum.item() / n_tokens
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf")).item()
    if math.isfinite(step_loss) and math.isfinite(grad_norm):  # else: skip, no update (the caller counts it)
        optimizer.step()
    optimizer.zero_grad(set_to_none=graphed is None)  # captured graphs write into the same .grad tensors
    return step_loss, grad_norm, n_tokens


class GraphedMicroSteps:
    """One micro-batch's forward + backward captured as a CUDA graph per batch shape, then replayed.

    Why: at these sizes an eager step is bound by Python and kernel-launch cost on the CPU (on Llama-3.2-3B,
    8 x 512 tokens, benchmarks/profile_step.py measured ~290 ms of CPU for ~150 ms of GPU work); a replay
    launches the whole forward+backward at once. Gradients accumulate in place into `.grad` tensors that
    exist before capture, so accumulation, clipping, the NaN guard and the optimizer stay eager and unchanged.
    Rows are padded to a multiple of 64 tokens so there are at most max_seq_len / 64 shapes; all graphs share
    one memory pool (they never run concurrently, and their only output, the loss, is copied at once).
    """

    MAX_GRAPHS = 16

    def __init__(self, model, params, packed, dtype, pad_id):
        self.model, self.params, self.packed, self.dtype, self.pad_id = model, params, packed, dtype, pad_id
        self.graphs, self.pool = {}, torch.cuda.graph_pool_handle()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def _loss(self, batch, inv_tokens):
        with _autocast(batch["input_ids"].device, self.dtype):
            loss = batch_loss(self.model, batch, self.packed)  # nothing in here may sync with the host
        (loss * inv_tokens).backward()
        return loss.detach()

    def _capture(self, batch):
        static = {k: v.clone() for k, v in batch.items()}
        inv_tokens = torch.zeros((), device=batch["input_ids"].device)
        saved = [p.grad.clone() for p in self.params]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (autotuning, cuBLAS workspaces) before capture, as CUDA graphs need
            self._loss(static, inv_tokens)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            loss = self._loss(static, inv_tokens)
        for p, g in zip(self.params, saved):  # undo the warm-up's accumulation
            p.grad.copy_(g)
        return graph, static, inv_tokens, loss

    def __call__(self, batch, inv_tokens):
        """Accumulate the gradient of (token-loss sum x inv_tokens) into .grad; returns the loss sum."""
        T = batch["input_ids"].shape[1]
        pad = -T % 64
        if pad:
            fill = {"input_ids": self.pad_id, "labels": -100, "positions": 0, "segments": 0}
            batch = {k: torch.nn.functional.pad(v, (0, pad), value=fill.get(k, 0)) for k, v in batch.items()}
        key = tuple(batch["input_ids"].shape)
        if key not in self.graphs:
            if len(self.graphs) >= self.MAX_GRAPHS:
                return self._loss(batch, inv_tokens)
            self.graphs[key] = self._capture(batch)
        graph, static, static_inv, loss = self.graphs[key]
        for k, v in batch.items():
            static[k].copy_(v)
        static_inv.fill_(inv_tokens)
        graph.replay()
        return loss.clone()


def _autocast(device, dtype):
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Within this context, activations autograd saves for the backward wait in pinned CPU memory.

    Like torch.autograd.graph.save_on_cpu, but weights (Parameters) and small tensors stay where they are:
    copying the frozen head or a LoRA matrix out and back every micro-batch would only cost PCIe time. With
    gradient checkpointing the saved activations are the block inputs, the memory that grows with depth.
    """

    def __init__(self, min_bytes=1 << 20):
        def pack(t):
            if isinstance(t, torch.nn.Parameter) or t.device.type == "cpu" or t.numel() * t.element_size() < min_bytes:
                return None, t
            host = torch.empty(t.size(), dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            return t.device, host

        def unpack(packed):
            device, t = packed
            return t if device is None else t.to(device, non_blocking=True)

        super().__init__(pack, unpack)


def _offload(config, device):
    """--offload-activations on a GPU: OffloadActivations; otherwise nothing."""
    return OffloadActivations() if config.offload_activations and device.type == "cuda" else contextlib.nullcontext()


def _to(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(model, examples, config, pad_id, device, dtype):
    """Token-weighted mean loss over `examples` (eval mode: dropout off), or None without examples."""
    from .data import collate_padded

    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), config.micro_batch_size):
        batch = _to(collate_padded(examples[i:i + config.micro_batch_size], pad_id), device)
        with _autocast(device, dtype):
            loss, n = token_loss_sum(model, batch, packed=False)
        total, count = total + loss.item(), count + n
    model.train(was_training)
    return total / max(count, 1)


def memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (peak RSS)


class MetricsLog:
    """Append-only JSONL, one object per line. On resume, lines after the checkpoint's step are dropped
    (the killed run logged them; the resumed run logs them again)."""

    def __init__(self, path, keep_up_to_step=None):
        self.path = path
        if keep_up_to_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            keep = [r for r in read_metrics(path) if r.get("step", 0) <= keep_up_to_step]
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:  # a kill mid-rewrite leaves the old log intact
                f.writelines(json.dumps(r) + "\n" for r in keep)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

    def write(self, record):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path):
    """The records of a metrics.jsonl; a torn last line (a run killed mid-write) is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return [r for r in records if isinstance(r, dict)]


def plot_losses(metrics_path, png_path):
    """Training loss per step (and eval loss where measured) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and r["loss"] is not None and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per answer token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def file_sha256s(directory):
    """sha256 of the base model's config and weight files: a resumed run must train the same base."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name == "config.json" or name.endswith(".safetensors"):
            h = hashlib.sha256()
            with open(os.path.join(directory, name), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            out[name] = h.hexdigest()
    return out


def _check_resume(config, state, manifest_base, base_hashes, data_fingerprint):
    old = state["config"]
    changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in config.to_dict().items()
               if k in RESUME_MUST_MATCH and old.get(k) != v]
    if changed:
        raise ResumeError("cannot resume: these settings differ from the checkpoint's run: " + "; ".join(changed) +
                          ". Use the original values, or start a new run in another --out directory.")
    soft = [k for k, v in config.to_dict().items() if k not in RESUME_MUST_MATCH and k != "resume" and old.get(k) != v]
    if soft:
        log.warning("resuming with changed settings: %s", ", ".join(f"{k}={config.to_dict()[k]!r}" for k in soft))
    if manifest_base is not None and manifest_base != base_hashes:
        diff = sorted(k for k in set(manifest_base) | set(base_hashes) if manifest_base.get(k) != base_hashes.get(k))
        raise ResumeError(f"cannot resume: base weights changed since the run started ({', '.join(diff)} sha256 differ).")
    if state["data_fingerprint"] != data_fingerprint and not config.resume_allow_data_change:
        raise ResumeError("cannot resume: the tokenized training data changed (dataset fingerprint "
                          f"{state['data_fingerprint'][:12]} -> {data_fingerprint[:12]}). Pass "
                          "--resume-allow-data-change to continue anyway (the batch order will differ).")


# --------------------------------------------------------------------------------------------- train

def train(config: TrainConfig):
    """Run one training job as `config` says; returns a summary dict. See the module docstring.

    --backend other than auto is the kernel setting for the whole run (minilora/kernels/backend.py): "torch" is the
    plain PyTorch reference path everywhere (4-bit matmul, norms, RoPE, GLU, cross-entropy, LoRA), restored after.
    """
    from minilora.kernels.backend import get_backend, set_backend

    previous = get_backend()
    if config.backend != "auto":
        set_backend(config.backend)
    try:
        return _train(config)
    finally:
        set_backend(previous)


def _train(config: TrainConfig):
    from .data import BatchOrder, fingerprint, load_records, split_records, tokenize_example, tokenize_records
    from .formats import resolve_prompt_format
    from .hub import check_model_name, resolve_model_dir
    from .loading import load_model
    from .tokenizer import load_tokenizer

    config.validate()
    check_model_name(config.model)  # a mistyped local path fails now, not after the dataset's download
    if os.path.isdir(config.model):  # a local base: never write into it (a hub id is checked once resolved)
        check_not_inside(config.out, config.model, "the base model directory")
    check_out_dir(config.out, resume=config.resume, overwrite=config.overwrite)  # before anything is loaded
    out = os.path.abspath(config.out)
    device, dtype = resolve_device_and_dtype(config)
    ranks, device = distributed.setup(device)  # torchrun: join the process group, cuda:LOCAL_RANK
    # 1. data before the model: a bad dataset fails before minutes of model loading
    counts = {}  # rows read and skipped, for the preflight report
    records = load_records(config.data, skip_bad_rows=config.skip_bad_rows, counts=counts, data_format=config.data_format)
    train_records, test_records = split_records(records, test_fraction=config.test_fraction, seed=config.split_seed)
    counts.update(train=len(train_records), test=len(test_records))
    base_dir = os.path.abspath(resolve_model_dir(config.model))
    check_not_inside(config.out, base_dir, "the base model directory")
    # the tokenizer and its chat template are small: every row is tokenized before the weights load
    tok = load_tokenizer(base_dir)
    prompt_format = resolve_prompt_format(config.prompt_format, tok.chat_template is not None, counts["data_format"])
    config = dataclasses.replace(config, data_format=counts["data_format"], prompt_format=prompt_format)
    train_examples, stats = tokenize_records(train_records, tok, config.max_seq_len, config.overlong, prompt_format)
    test_examples = [ex for r in test_records
                     if (ex := tokenize_example(r, tok, config.max_seq_len, config.overlong, prompt_format=prompt_format))]
    test_examples = test_examples[: config.eval_examples]  # the eval loss only; evaluate.py scores generations
    log.info("data: %d train / %d test %s records in the %s prompt format; train tokenization: %s",
             len(train_records), len(test_records), config.data_format, prompt_format, stats)

    # 2. model, tokenizer, LoRA
    seed_everything(config.seed)
    fsdp = config.fsdp and ranks.world > 1
    if config.fsdp and not fsdp:
        log.info("--fsdp: one process, nothing to shard; the base stays whole")
    if config.offload_activations and device.type != "cuda":
        log.info("--offload-activations: on %s the activations are in host memory already; nothing to move", device)
    # FSDP: quantize on the GPU, keep the whole base in host memory; fully_shard then moves 1/N to each GPU
    model, _ = load_model(base_dir, dtype=dtype, device="cpu" if fsdp else device, quantize_device=device,
                          quantize=None if config.quantize == "none" else config.quantize, backend=config.backend)
    apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets, config.use_rslora)
    model.gradient_checkpointing = config.gradient_checkpointing
    model.uncheckpointed_blocks = min(config.uncheckpointed_blocks, model.config.num_hidden_layers)
    if config.uncheckpointed_blocks and not config.gradient_checkpointing:
        log.warning("--uncheckpointed-blocks %d has no effect without --gradient-checkpointing (every block keeps "
                    "its activations)", config.uncheckpointed_blocks)
    elif config.gradient_checkpointing and model.uncheckpointed_blocks:
        log.info("gradient checkpointing: the first %d blocks recompute, the last %d keep their activations",
                 model.config.num_hidden_layers - model.uncheckpointed_blocks, model.uncheckpointed_blocks)
    params = list(lora_parameters(model).values())
    if fsdp:
        held, whole = distributed.shard_base(ranks, model, params, device)
        log.info("FSDP2: rank %d holds %.1f MiB of the %.1f MiB frozen base", ranks.rank, held / 2**20, whole / 2**20)
    optimizer = build_optimizer(config, params)
    trainable, base = parameter_counts(model)
    log.info("LoRA: %d trainable parameters (%.3f%% of the base model's %d)", trainable, 100 * trainable / base, base)

    order = BatchOrder(train_examples, config.micro_batch_size, config.max_seq_len, tok.pad_id, seed=config.seed,
                       pack=config.pack)
    accum = config.grad_accum_steps
    total_steps = config.max_steps or sum(math.ceil(order.num_batches(e) / accum) for e in range(config.epochs))
    # every row, id, the largest batch's forward/backward and the disk, checked before anything is written
    preflight(config, model, tok, train_examples, stats, out, device, dtype, counts, verbose=ranks.main)
    if config.overwrite and ranks.main:
        remove_outputs(out, RUN_OUTPUTS)
    os.makedirs(out, exist_ok=True)
    data_fingerprint = fingerprint(train_examples)
    base_hashes = file_sha256s(base_dir)
    distributed.check_same(ranks, "the tokenized training data and base weights", (data_fingerprint, base_hashes))

    # 3. resume, or start fresh
    state, rank_rng = TrainState(), None
    ckpt_root = os.path.join(out, "checkpoints")
    manifest_path = os.path.join(out, "manifest.json")
    if config.resume:
        path = latest_checkpoint(ckpt_root)
        if path is None:
            raise ResumeError(f"--resume: no complete checkpoint in {ckpt_root}. Start without --resume.")
        manifest_base = json.load(open(manifest_path)).get("base_sha256") if os.path.exists(manifest_path) else None
        _check_resume(config, read_state(path), manifest_base, base_hashes, data_fingerprint)
        saved = load_checkpoint(path, model, optimizer)  # also restores every RNG
        state, rank_rng = TrainState(**saved["train_state"]), saved.get("rank_rng")
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, state.step, state.epoch, state.batch_in_epoch)
    elif ranks.main:
        with open(manifest_path, "w") as f:
            json.dump({"config": config.to_dict(), "base_dir": base_dir, "base_sha256": base_hashes,
                       "data_fingerprint": data_fingerprint, "versions": _versions()}, f, indent=1)
    if ranks.main:
        with open(os.path.join(out, "train_config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=1)
    distributed.broadcast_parameters(ranks, params)  # rank 0's adapter everywhere, as DDP starts
    distributed.set_rank_rng(ranks, rank_rng, config.seed, state.step)  # each rank its own dropout masks
    metrics = MetricsLog(os.path.join(out, "metrics.jsonl") if ranks.main else os.devnull,  # rank 0 logs
                         keep_up_to_step=state.step if config.resume else None)

    def checkpoint():
        rng_states = distributed.gather_rng_states(ranks)  # a collective: every rank calls checkpoint()
        if ranks.main:
            save_checkpoint(ckpt_root, state.step, model, optimizer,
                            {"train_state": dataclasses.asdict(state), "config": config.to_dict(),
                             "data_fingerprint": data_fingerprint, "base_model": config.model,
                             "rank_rng": rng_states}, config.keep_last)

    # 4. the loop
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=state.step, disable=not (config.progress and ranks.main), dynamic_ncols=True)
    model.train()
    # FSDP all-gathers and the offload's host copies are not captured in CUDA graphs
    use_graphs = config.cuda_graphs and device.type == "cuda" and not fsdp and not config.offload_activations
    graphed = GraphedMicroSteps(model, params, config.pack, dtype, tok.pad_id) if use_graphs else None
    steps = step_batches(order, state, config.grad_accum_steps, None if config.max_steps else config.epochs - 1)
    last_loss = None
    if config.eval_every and state.step == 0:  # the curve's baseline: B = 0, so this is the base model's loss
        metrics.write({"step": 0, "eval_loss": evaluate_loss(model, test_examples, config, tok.pad_id, device, dtype)})
    while state.step < total_steps and (micro := next(steps, None)) is not None:
        t0 = time.perf_counter()
        lr = learning_rate_at(config, state.updates, total_steps)
        step_loss, grad_norm, n_tokens = optimizer_step(model, optimizer, params, micro, lr, config, device, dtype,
                                                        graphed, ranks)
        state.step += 1
        skipped = not (math.isfinite(step_loss) and math.isfinite(grad_norm))
        if skipped:
            state.nonfinite_in_a_row += 1
            log.warning("step %d: non-finite loss %s / grad norm %s; update skipped (%d in a row)",
                        state.step, step_loss, grad_norm, state.nonfinite_in_a_row)
        else:
            state.updates, state.nonfinite_in_a_row, state.tokens_seen = state.updates + 1, 0, state.tokens_seen + n_tokens
            last_loss = step_loss
        seconds = time.perf_counter() - t0
        input_tokens = sum(int((b["segments"] != 0).sum()) for b in micro)  # segment 0 = padding
        record = {"step": state.step, "epoch": state.epoch, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                  "answer_tokens": n_tokens, "tokens_per_s": input_tokens / seconds, "seconds": seconds,
                  "memory_gb": memory_gb(device), "skipped": skipped, "world_size": ranks.world}
        if state.nonfinite_in_a_row >= config.max_nonfinite_steps:
            metrics.write(record)
            raise NonFiniteError(f"{state.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or "
                                 f"gradient (last: step {state.step}, loss {step_loss}, grad norm {grad_norm}). "
                                 f"The last complete checkpoint in {ckpt_root} holds finite weights; resume it "
                                 "with a lower --learning-rate.")
        if config.eval_every and state.step % config.eval_every == 0 and state.step < total_steps:
            record["eval_loss"] = evaluate_loss(model, test_examples, config, tok.pad_id, device, dtype)
        metrics.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                        mem=f"{record['memory_gb']:.1f}G")
        if config.save_every and state.step % config.save_every == 0 and state.step < total_steps:
            checkpoint()
    bar.close()

    # 5. the end: final eval, checkpoint, adapter, plot
    eval_loss = evaluate_loss(model, test_examples, config, tok.pad_id, device, dtype)
    metrics.write({"step": state.step, "eval_loss": eval_loss})
    check_finite(lora_parameters(model), "the final adapter")
    checkpoint()
    adapter_dir = os.path.join(out, "adapter")
    if ranks.main:
        save_adapter(model, adapter_dir, base_model_name_or_path=config.model)
        tok.save(adapter_dir)  # the tokenizer travels with the adapter, as peft users expect
        plot_losses(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png"))
    summary = {"steps": state.step, "updates": state.updates, "train_loss": last_loss, "eval_loss": eval_loss,
               "tokens_seen": state.tokens_seen, "adapter": adapter_dir}
    if fsdp:
        summary["base_bytes_held"], summary["base_bytes_whole"] = held, whole
    log.info("done: %s", summary)
    distributed.teardown(ranks)  # the others wait here for rank 0's writes
    return summary


def _versions():
    import platform

    from . import __version__

    versions = {"python": platform.python_version(), "torch": torch.__version__, "minilora": __version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    return versions
