"""`python -m minilora.inspect`: look inside a QLoRA model before (and after) training it.

    python -m minilora.inspect --model DIR [--rank 64 --targets q_proj v_proj --batch 4 --seq-len 512]
                               [--adapter DIR] [--measure] [--json] [--plot out.png]

For the chosen model it prints
  1. parameter counts: total, quantized to NF4 (the block linears), float (embeddings, norms, biases,
     an untied head), and the trainable LoRA parameters at the chosen rank and targets;
  2. a memory breakdown for training at `--batch` x `--seq-len`: NF4 packed weights, their absmax and
     double-quantization statistics, float parts, LoRA weights, gradients, AdamW state, and the
     activations autograd keeps for backward, with and without block-level gradient checkpointing.
     Estimated by the formulas in `estimate_activations` (each term says which op saves it); with
     `--measure` also measured in one real training step (`measure_training_step`): tensor sizes
     summed directly, activations counted with `torch.autograd.graph.saved_tensors_hooks`, and on CUDA
     the step's peak from `torch.cuda.max_memory_allocated`;
  3. per-layer NF4 error: each block linear is read from the checkpoint, quantized with `minilora.nf4`
     exactly as `load_model(..., quantize="nf4")` does, and compared with its float original
     (relative Frobenius error and max abs error), worst first. Streamed one tensor at a time.
With `--adapter` (a PEFT LoRA directory) it also shows, per LoRA layer, ||scaling * B A||_F against
||W||_F, the layers that moved most, and the effective rank of each update (`update_spectrum`).

The activation formulas follow what autograd keeps in minilora's own forward (model.py, lora.py,
kernels/): on CPU in fp32 with the plain-torch lines, and on CUDA under bf16 autocast with fp32 LoRA
weights and the Triton training kernels (what trainer.py runs there). tests/test_inspect.py checks them
byte for byte against the measurement on CPU for every attention path (SDPA with and without window
masks, Gemma 2's soft-capped attention with its T x T scores, Gemma 3's q/k norms); on an H100 they
matched byte for byte too, for all six tiny families and a SmolLM2-135M-shaped model (2026-11-25).

The file is longer than STYLE's 600 lines on purpose: each estimate sits beside the measurement that
checks it, so one file answers "where does the memory go" end to end.
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
from collections import Counter

import torch

from .cli import HelpFormatter
from .config import TrainConfig, load_config
from .errors import CheckpointError, ConfigError, MiniloraError, WeightsError

_DEFAULTS = TrainConfig()  # every training default lives in TrainConfig; none is repeated here


# ------------------------------------------------------------------------------- the model's shapes

def meta_model(config, r, alpha, targets, dropout=0.0):
    """The Transformer of `config` with LoRA applied, on the meta device (shapes only, no memory).

    apply_lora itself decides which linears `targets` selects, so the counts here are those of training
    (and a target that matches nothing raises the same ConfigError).
    """
    from .lora import apply_lora
    from .model import Transformer

    with torch.device("meta"):
        model = Transformer(config)
        apply_lora(model, r, alpha, dropout, targets)
    return model


def _is_quantized(name):
    """The weights load_model(..., quantize="nf4") turns into Linear4bit: every block linear."""
    from .weights import _is_block_linear

    return _is_block_linear(name.replace(".base_layer.", "."))


def count_parameters(model):
    """{total, quantized, float, lora, by_part} of a (meta) model with LoRA applied; tied weights once."""
    counts = Counter()
    for name, p in model.named_parameters():  # named_parameters skips the tied lm_head duplicate
        if ".lora_" in name:
            counts["lora"] += p.numel()
        elif _is_quantized(name):
            counts["quantized"] += p.numel()
        else:
            part = ("embeddings" if "embed_tokens" in name else "head" if name.startswith("lm_head") else
                    "norms" if "norm" in name else "biases")
            counts[part] += p.numel()
    floats = counts["embeddings"] + counts["head"] + counts["norms"] + counts["biases"]
    return {"total": counts["quantized"] + floats, "quantized": counts["quantized"], "float": floats,
            "lora": counts["lora"], "by_part": {k: counts[k] for k in ("embeddings", "head", "norms", "biases")}}


# ------------------------------------------------------------------------------ memory: estimates

def nf4_bytes(numel):
    """(packed bytes, statistics bytes) of one weight in minilora.nf4's layout with double quantization."""
    blocks = -(-numel // 64)  # one absmax per 64 weights (nf4.BLOCKSIZE)
    packed = (numel + 1) // 2  # two 4-bit indices per byte
    # absmax as uint8 codes + one fp32 scale per 256 absmax + the 256-entry fp32 code, the fp32 offset
    # and the 16-entry fp32 NF4 code, which every Linear4bit keeps its own copy of
    stats = blocks + 4 * -(-blocks // 256) + 4 * 256 + 4 + 4 * 16
    return packed, stats


@dataclasses.dataclass(frozen=True)
class Regime:
    """How the training step runs, which decides what autograd keeps and in which dtype."""
    act: int  # bytes of a kept activation: 4 (fp32) or 2 (bf16 autocast)
    autocast: bool  # bf16 autocast with fp32 LoRA weights (trainer.py on a GPU)
    kernels: bool  # the Triton training kernels of minilora/kernels/ (RMSNorm, RoPE, GLU, fused loss): CUDA's default
    cuda: bool  # CUDA dropout keeps a bool mask (CPU: an fp32 noise); flash attention keeps its RNG state
    fused_lora: bool = False  # LoRALinear runs kernels/lora.py's fused node (lora.py `_fused`: CUDA, backend not torch)
    merged_lora: bool = False  # ...and folds B A into the dequantized weight when it can (kernels/lora.py `_merges`)

    @staticmethod
    def of(device, dtype):
        cuda = device.type == "cuda"
        autocast = cuda and dtype != torch.float32
        kernels = fused = False
        if cuda:
            from minilora.kernels.backend import resolve_backend

            backend = resolve_backend("auto", device)
            kernels, fused = backend == "triton", backend != "torch"
        return Regime(act=2 if autocast else 4, autocast=autocast, kernels=kernels, cuda=cuda, fused_lora=fused,
                      merged_lora=kernels)


def _merges(reg, dropout, width, rows):
    """Does a LoRA layer of input `width` take the merged-weight node (minilora/kernels/lora.py `_merges`)?"""
    from minilora.kernels.lora import MERGE_MIN_ROWS

    return reg.merged_lora and not dropout and width % 64 == 0 and rows >= MERGE_MIN_ROWS


def _lora_activations(width, out_width, r, N, dropout, reg, grad_x, input_saved):
    """Bytes one targeted LoRALinear keeps (lora.py `forward`): h @ A^T keeps h, its (possibly dropped
    out) input, and A if h needs a gradient; u @ B^T keeps u = h A^T (r wide). `input_saved`: another
    op already keeps the same input tensor."""
    a = reg.act
    if _merges(reg, dropout, width, N):
        return 0 if input_saved else N * width * a  # the merged-weight node keeps x alone
    if reg.fused_lora:
        # minilora/kernels/lora.py saves u (x itself, or its dropped-out copy and the bool mask), xa = u A^T, and the
        # compute-dtype copies of A and B, whether or not x needs a gradient
        kept = N * r * a + a * r * (width + out_width)
        if dropout:
            return kept + N * width * (a + 1)
        return kept + (0 if input_saved else N * width * a)
    if reg.autocast:
        # x.to(fp32), then autocast's bf16 copy for the matmul: every layer keeps its own copy of its
        # input, and the bf16 copies of B (and of A when x needs a gradient)
        kept = N * width * 2 + 2 * r * out_width + (2 * r * width if grad_x else 0)
        return kept + N * r * a + (N * width * 1 if dropout and grad_x else 0)  # CUDA dropout: bool mask
    if dropout:  # a new dropped-out input, plus the mask (CPU: fp32 noise) when x needs a gradient
        return N * width * (a + ((1 if reg.cuda else 4) if grad_x else 0)) + N * r * a
    return (0 if input_saved else N * width * a) + N * r * a


def _block_activations(c, i, lora, r, dropout, B, T, reg, grad_in):
    """Bytes block `i` keeps for backward, by part, and whether its output requires grad.

    grad_in: does the block input require grad? Block 0's input (the frozen embedding's output) does
    not, so the ops before its first LoRA layer keep nothing. Part "input" is the block input itself
    when its first norm keeps it (not a copy): checkpointing keeps it anyway, so it is not recomputed.
    The RoPE tables all blocks share are counted by the caller.
    """
    N, a = B * T, reg.act
    D, H, Hkv, Dh, Fd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
    parts = Counter()

    def norm(width, rows, grad, part="norms"):
        """RMSNorm keeps its input and one fp32 rsqrt per row. The Triton kernel keeps x as it is; the
        torch lines keep h = x.float(): x itself in fp32, a new fp32 copy under bf16 autocast."""
        if grad:
            keeps_x = reg.kernels or a == 4
            parts[part if keeps_x else "norms"] += rows * width * (a if reg.kernels else 4)
            parts["norms"] += rows * 4
            if c.norm_unit_offset and not reg.kernels:
                parts["norms"] += 4 * width  # Gemma, torch lines: the (1 + w) vector
            return True
        return False

    def lora_layer(names, width, grad_x, input_saved=False):
        """LoRA on the linears `names`, which share one input (q/k/v, or gate/up)."""
        for name in [n for n in names if n in lora]:
            parts["lora"] += _lora_activations(width, lora[name], r, N, dropout, reg, grad_x, input_saved)
            input_saved = True
        return grad_x or any(n in lora for n in names)

    # attention half
    norm(D, N, grad_in, part="input")
    grad = lora_layer(("q_proj", "k_proj", "v_proj"), D, grad_in)
    grad_q, grad_k, grad_v = (grad_in or p in lora for p in ("q_proj", "k_proj", "v_proj"))
    if c.qk_norm:  # Gemma 3: RMSNorm of every query and key head
        norm(Dh, N * H, grad_q)
        norm(Dh, N * Hkv, grad_k)
    window = c.layer_windows[i] if c.layer_windows else None
    if c.attn_logit_softcap is not None:
        # Gemma 2 soft-capping (model.py `_softcapped_attention`). If q or k needs a gradient: q, and k and v
        # repeated to H heads, tanh of the scores, the inverted mask, the fp32 softmax, each score (B, H, T, T).
        # If v does: the probabilities (fp32: the softmax output itself; autocast: their bf16 copy).
        scores = B * H * T * T
        if grad_q or grad_k:
            parts["attention"] += N * 3 * H * Dh * a + scores * (a + 4) + (B * T * T if window else T * T)
        if grad_v and (reg.autocast or not (grad_q or grad_k)):
            parts["attention"] += scores * a
    elif grad:
        # SDPA (flash/efficient kernels): q, k, v, the output and the fp32 log-sum-exp per query and
        # head; on CUDA also flash attention's RNG seed and offset (two int64)
        parts["attention"] += N * ((2 * H + 2 * Hkv) * Dh * a + 4 * H) + (16 if reg.cuda else 0)
        if window is not None:
            parts["attention"] += B * T * T * a  # the bool window mask, converted to an additive float mask
    # o_proj's input: with SDPA a view of the output kept above, with soft-capping a new (B, T, H*Dh)
    grad = lora_layer(("o_proj",), H * Dh, grad, input_saved=grad and c.attn_logit_softcap is None)
    if c.sandwich_norms:
        norm(D, N, grad)  # Gemma 2/3 normalise the attention output too
    # MLP half
    norm(D, N, grad)
    grad_gate, grad_up = grad or "gate_proj" in lora, grad or "up_proj" in lora
    lora_layer(("gate_proj", "up_proj"), D, grad)
    if reg.kernels and c.activation != "gelu":  # the Triton GLU (model.py MLP) keeps gate and up
        parts["mlp"] += N * Fd * a * 2 if grad_gate or grad_up else 0
    else:  # torch: act(gate) keeps gate; act(gate) * up keeps act(gate) (if up needs a gradient) and up
        parts["mlp"] += N * Fd * a * (2 * int(grad_gate) + int(grad_up))
    grad = lora_layer(("down_proj",), Fd, grad_gate or grad_up)  # nothing else keeps the product
    if c.sandwich_norms:
        norm(D, N, grad)
    return parts, grad


def estimate_activations(c, lora, r, dropout, B, T, reg, uncheckpointed=0):
    """Bytes autograd keeps for backward in one training step, from the config.

    lora: {targeted linear leaf name: its output width}. Returns "blocks" (per block, bytes by part,
    without the block's input), "inputs" (block inputs kept by a norm, and the RoPE tables), "head",
    "total"; and "checkpointed": the peak with block-level gradient checkpointing (model.py), where the
    forward keeps only each block's inputs (x, RoPE tables, masks) and the head, and the backward
    recomputes one block at a time: kept + head + the largest block. With the last `uncheckpointed` blocks
    left out of checkpointing (model.uncheckpointed_blocks), their activations are also kept until the
    backward has passed them, before the first recomputation: kept + head + max(theirs, largest of the rest).
    """
    N, a, D, V = B * T, reg.act, c.hidden_size, c.vocab_size
    blocks, inputs, grad = [], 0, False  # the frozen embedding's output needs no gradient
    for i in range(c.num_hidden_layers):
        parts, grad = _block_activations(c, i, lora, r, dropout, B, T, reg, grad)
        inputs += parts.pop("input", 0)
        blocks.append(dict(parts))
    # RoPE: x * cos and x * sin (or the Triton kernel) keep cos and sin (B, T, Dh); Gemma 3 has two tables
    tables = (2 if c.local_rope is not None else 1) * 2 * N * c.head_dim * a
    inputs += tables
    # head: the final norm keeps its input as the block norms do
    head = (N * ((a if reg.kernels else 4) * D + 4) + (4 * D if c.norm_unit_offset and not reg.kernels else 0)
            if grad else 0)
    if reg.kernels and "lm_head" not in lora:
        # minilora/kernels/cross_entropy.py computes the hidden states' gradient in the forward and keeps only it
        head += N * D * a if grad else 0
    else:  # log_softmax keeps its fp32 output, nll_loss the int64 labels and an fp32 total weight
        head += N * V * 4 + N * 8 + 4
        if c.final_logit_softcap is not None:
            head += N * V * 4  # Gemma 2: tanh(logits / cap) keeps its output
        if "lm_head" in lora:  # its input, the final norm's output, is kept by nothing else
            head += _lora_activations(D, V, r, N, dropout, reg, grad, False)
    total = sum(sum(b.values()) for b in blocks) + inputs + head
    # checkpointing keeps every block's input x (B, T, D), the RoPE tables and each (B, 1, T, T) bool mask
    masks = len({w for w in c.layer_windows if w is not None}) * B * T * T if c.layer_windows else 0
    kept = c.num_hidden_layers * N * D * a + tables + masks
    sizes = [sum(b.values()) for b in blocks]
    split = len(sizes) - min(uncheckpointed, len(sizes))
    largest = max(sizes[:split], default=0)
    # with no block checkpointed (split 0) it is the plain step
    checkpointed = kept + head + max(largest, sum(sizes[split:])) if split else total
    return {"blocks": blocks, "inputs": inputs, "head": head, "total": total,
            "checkpointed": checkpointed, "checkpoint_kept": kept,
            "largest_block": max(sizes)}


def estimate_memory(model, r, dropout, batch, seq_len, dtype, device, uncheckpointed=0):
    """The memory of one QLoRA training step, by component, in bytes (see the module docstring);
    `uncheckpointed`: blocks left out of gradient checkpointing (the last ones)."""
    c = model.config
    reg, w = Regime.of(device, dtype), torch.empty(0, dtype=dtype).element_size()
    from .lora import lora_modules

    packed = stats = floats = 0
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        if _is_quantized(name):
            pk, st = nf4_bytes(p.numel())
            packed, stats = packed + pk, stats + st
        else:
            floats += p.numel() * w  # embeddings, norms, biases, untied head: kept in the compute dtype
    modules = lora_modules(model)
    lora_numel = sum(m.lora_A.numel() + m.lora_B.numel() for m in modules.values())
    lora = {name.rsplit(".", 1)[-1]: m.out_features for name, m in modules.items()}
    acts = estimate_activations(c, lora, r, dropout, batch, seq_len, reg, uncheckpointed)
    return {
        # with checkpointing, for as long as a block's backward runs (not an activation: autograd does not save it)
        "recompute_weights": _kept_merged_weights(c, modules, dropout, batch * seq_len, reg, uncheckpointed, w),
        "nf4_packed": packed, "nf4_stats": stats, "float_weights": floats,
        "lora_weights": 4 * lora_numel,  # LoRA weights in fp32 (QLoRA: fp32 adapters over a bf16 base)
        "gradients": 4 * lora_numel,  # only LoRA weights get gradients, in their own fp32
        # torch AdamW: exp_avg and exp_avg_sq like the weight, plus a 4-byte step tensor per weight
        "adamw_state": 8 * lora_numel + 4 * 2 * len(modules),
        "activations": acts["total"], "activations_checkpointed": acts["checkpointed"],
        "activation_detail": acts,
    }


def _kept_merged_weights(c, modules, dropout, rows, reg, uncheckpointed, itemsize):
    """Bytes of W + s B A that a block's recomputation hands to its backward (kernels/lora.py `keep_weight`), for
    the block that keeps the most: every merged layer (Triton backend, no dropout, in % 64 == 0, enough rows)
    that the recomputation runs, i.e. not down_proj where the recomputation skips it (all but Gemma 2/3)."""
    per_block = Counter()
    for name, m in modules.items():
        parts = name.split(".")
        if len(parts) < 3 or parts[1] != "layers" or int(parts[2]) >= c.num_hidden_layers - uncheckpointed:
            continue  # lm_head, or a block that is not recomputed
        if not _merges(reg, dropout, m.in_features, rows):
            continue
        if parts[-1] == "down_proj" and not c.sandwich_norms:
            continue
        per_block[int(parts[2])] += m.out_features * m.in_features * itemsize
    return max(per_block.values(), default=0)


# ---------------------------------------------------------------------------- memory: measurement

class SavedTensorsMeter:
    """Counts what autograd keeps for backward: each storage once, by the block that saved it.

    Parameters and buffers are not activations and are skipped. Use as a context manager around the
    forward pass. A storage some block got as its input (x, RoPE tables, masks) is counted apart:
    gradient checkpointing keeps those anyway, so they are not part of a block's recomputation.
    """

    def __init__(self, model):
        self.weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.saved = {}  # storage pointer -> [bytes, owners]
        self.inputs, self._held = set(), []  # storages handed to a block as input: x, RoPE tables, masks
        self.owner = "head"
        self.handles = []
        for i, block in enumerate(model.model.layers):
            self.handles.append(block.register_forward_pre_hook(functools.partial(self._enter, i)))
            self.handles.append(block.register_forward_hook(lambda m, args, out: setattr(self, "owner", "head")))

    def _enter(self, i, module, args):
        self.owner = i
        tensors = [t for t in args if torch.is_tensor(t)]
        self._held.extend(tensors)  # held until the meter closes, so no later tensor reuses the address
        self.inputs.update(t.untyped_storage().data_ptr() for t in tensors)

    def _pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.weights:
            self.saved.setdefault(ptr, [storage.nbytes(), set()])[1].add(self.owner)
        return t  # keep the tensor itself: we only count

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self._held.clear()
        for h in self.handles:
            h.remove()

    def by_owner(self):
        """bytes by block index, "inputs" (storages handed to blocks as input) and "head" (the rest)."""
        out = Counter()
        for ptr, (nbytes, owners) in self.saved.items():
            if ptr in self.inputs:
                out["inputs"] += nbytes
            else:
                out[next(iter(owners)) if len(owners) == 1 else "head"] += nbytes
        return out

    def total(self):
        return sum(nbytes for nbytes, _ in self.saved.values())


def _tensor_bytes(tensors):
    seen = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def measure_training_step(model_dir, r, alpha, dropout, targets, batch, seq_len, dtype, device, seed=0):
    """Load the model as training does, run one real step, and measure each component in bytes.

    The step's forward and backward run twice, without and with gradient checkpointing, then AdamW
    steps once. Activations: bytes saved for backward (`SavedTensorsMeter`); with checkpointing the
    backward recomputes one block at a time, which is counted as the largest block of the first run.
    On CUDA, `cuda_peak*` is the step's torch.cuda.max_memory_allocated above what was allocated before.
    """
    from .loading import load_model
    from .lora import apply_lora, lora_parameters
    from .nf4 import Linear4bit
    from .trainer import build_optimizer, token_loss_sum

    model, _ = load_model(model_dir, dtype=dtype, device=device, quantize="nf4")
    apply_lora(model, r, alpha, dropout, targets)
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    lora = list(lora_parameters(model).values())
    lora_names = {id(p) for p in lora}
    out = {"nf4_packed": _tensor_bytes(m.weight_packed for m in quantized),
           "nf4_stats": _tensor_bytes(t for m in quantized for n, t in m.named_buffers() if n != "weight_packed"),
           "float_weights": _tensor_bytes(p for p in model.parameters() if id(p) not in lora_names),
           "lora_weights": _tensor_bytes(lora)}
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=generator)
    labels = torch.cat([ids[:, 1:], torch.full((batch, 1), -100)], dim=1)  # next-token targets
    step = {"input_ids": ids.to(device), "labels": labels.to(device)}
    autocast = (torch.autocast("cuda", dtype=dtype) if Regime.of(torch.device(device), dtype).autocast
                else contextlib.nullcontext())  # as trainer.py: bf16 autocast on a GPU only
    model.train()
    for checkpointed in (False, True):
        model.gradient_checkpointing = checkpointed
        model.zero_grad(set_to_none=True)
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        with SavedTensorsMeter(model) as meter, autocast:
            loss, n = token_loss_sum(model, step, packed=False)
        (loss / n).backward()
        del loss
        key = "activations_checkpointed" if checkpointed else "activations"
        if checkpointed:
            out[key] = meter.total() + out["largest_block"]
        else:
            owners = meter.by_owner()
            blocks = [owners[i] for i in range(model.config.num_hidden_layers)]
            out.update(activations=meter.total(), activation_blocks=blocks, largest_block=max(blocks),
                       activation_head=owners["head"], activation_inputs=owners["inputs"])
        if cuda:
            torch.cuda.synchronize()
            out["cuda_peak_" + key] = torch.cuda.max_memory_allocated() - before
    out["gradients"] = _tensor_bytes(p.grad for p in lora)
    optimizer = build_optimizer(_DEFAULTS, lora)
    optimizer.step()
    out["adamw_state"] = _tensor_bytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return out


# ----------------------------------------------------------------------- NF4 error, LoRA updates

def stream_weights(model_dir, config, names=None):
    """Yield (parameter name, float tensor as stored) from the checkpoint one tensor at a time, with
    Phi-3's fused projections split as the loader does; only names for which `names(name)` is true."""
    from .model import Transformer
    from .weights import SafetensorsFile, checkpoint_key_map, find_weight_files

    with torch.device("meta"):
        key_map = checkpoint_key_map(config, Transformer(config))
    files, _ = find_weight_files(model_dir)
    for path in files:
        with SafetensorsFile(path) as handle:
            for key in handle.keys():
                wanted = [(n, rows) for n, rows in key_map.get(key, []) if names is None or names(n)]
                if wanted:
                    tensor = handle.get_tensor(key)
                    if not tensor.is_floating_point():  # weights.save_quantized wrote packed uint8 NF4
                        raise WeightsError(f"{path}: {key!r} is stored as {tensor.dtype} (a pre-quantized 4-bit "
                                           "checkpoint): its float original, which the NF4 error and the adapter "
                                           "norms compare against, is not there. Inspect the float checkpoint, "
                                           "or pass --no-errors (and no --adapter).")
                    for name, rows in wanted:
                        yield name, tensor if rows is None else tensor[rows]


def quantization_error(weight, dtype):
    """NF4 error of one weight: quantized as load_model does (cast to `dtype`, then quantize_nf4 with
    double quantization), dequantized in fp32, compared with the float original."""
    from .nf4 import dequantize_nf4, quantize_nf4

    original = weight.float()
    error = dequantize_nf4(quantize_nf4(weight.to(dtype)), torch.float32) - original
    return {"rel_fro": (error.norm() / original.norm()).item(), "max_abs": error.abs().max().item(),
            "max_weight": original.abs().max().item()}


def quantization_errors(model_dir, config, dtype, blocks=None):
    """[{name, shape, rel_fro, max_abs, max_weight}] for every block linear (or those of `blocks`),
    the worst relative error first."""
    def wanted(name):
        return _is_quantized(name) and (blocks is None or int(name.split(".")[2]) in blocks)

    rows = [{"name": name[: -len(".weight")], "shape": list(w.shape), **quantization_error(w, dtype)}
            for name, w in stream_weights(model_dir, config, wanted)]
    return sorted(rows, key=lambda row: -row["rel_fro"])


def update_spectrum(A, B, scaling):
    """Singular values of scaling * B A (B: out x r, A: r x in), without forming the (out, in) matrix.

    With B = Qb Rb and A^T = Qa Ra (thin QR, Q orthonormal), B A = Qb (Rb Ra^T) Qa^T, so B A has the
    singular values of the r x r matrix Rb Ra^T.
    """
    Rb = torch.linalg.qr(B.double())[1]
    Ra = torch.linalg.qr(A.double().t())[1]
    return torch.linalg.svdvals(Rb @ Ra.t()) * abs(scaling)


def effective_rank(s):
    """(entropy effective rank, count of singular values above 1% of the largest).

    Entropy effective rank (Roy & Vetterli 2007): exp(-sum p_i log p_i) with p = s / sum(s); equal
    singular values give their count, a single dominant one gives 1. A zero update has rank 0.
    """
    if s.numel() == 0 or s.max() <= 0:
        return 0.0, 0
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item()), int((s > 0.01 * s.max()).sum())


def adapter_updates(model_dir, config, adapter_dir):
    """[{name, update_fro, weight_fro, relative, erank, rank_1pct, singular_values}] for each LoRA layer
    of the PEFT adapter in `adapter_dir`, the largest relative update first. ||W||_F is the checkpoint's
    float weight (NF4 training adds B A to its quantized copy; the difference is the NF4 error above)."""
    from safetensors import safe_open

    from .lora import ADAPTER_WEIGHTS, FUSED_PARTS, PEFT_PREFIX, read_adapter_config

    cfg = read_adapter_config(adapter_dir)
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: a PEFT adapter directory needs it beside adapter_config.json.")
    pairs = {}
    with safe_open(path, framework="pt", device="cpu") as f:
        for key in f.keys():
            module, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            pairs.setdefault(module, {})[kind.split(".")[0]] = f.get_tensor(key).float()
    source = {}  # the weights each LoRA layer adapts, by parameter name
    for module in pairs:
        head, _, leaf = module.rpartition(".")
        if config.fused_qkv and leaf in FUSED_PARTS:  # a peft adapter of Phi-3's fused qkv_proj / gate_up_proj
            source.update({f"{head}.{part}.weight": module for part in FUSED_PARTS[leaf]})
        else:
            source[module + ".weight"] = module
    if config.tie_word_embeddings and "lm_head" in pairs:
        source["model.embed_tokens.weight"] = "lm_head"  # a tied head's weight is the embedding
    squares, shapes = Counter(), {}  # a fused weight: the squared norms add, the rows stack
    for name, w in stream_weights(model_dir, config, source.__contains__):
        module = source[name]
        squares[module] += w.double().square().sum().item()
        rows = shapes.get(module, (0, w.shape[1]))[0]
        shapes[module] = (rows + w.shape[0], w.shape[1])
    weights = {m: (math.sqrt(squares[m]), shapes[m]) for m in shapes}
    rows = []
    for module, ab in pairs.items():
        if module not in weights:
            raise CheckpointError(f"{path}: LoRA layer {module!r} has no weight {module}.weight in {model_dir}; "
                                  "was the adapter trained on another model?")
        shape = weights[module][1]
        if set(ab) != {"A", "B"} or ab["B"].shape[0] != shape[0] or ab["A"].shape[1] != shape[1]:
            found = {k: list(v.shape) for k, v in ab.items()}
            raise CheckpointError(f"{path}: LoRA layer {module!r} needs lora_A (r, {shape[1]}) and lora_B "
                                  f"({shape[0]}, r) for its base weight {list(shape)}; found {found}.")
        s = update_spectrum(ab["A"], ab["B"], scaling)
        erank, rank_1pct = effective_rank(s)
        update = s.square().sum().sqrt().item()  # ||M||_F^2 is the sum of its squared singular values
        norm = weights[module][0]
        rows.append({"name": module, "update_fro": update, "weight_fro": norm, "relative": update / norm,
                     "erank": erank, "rank_1pct": rank_1pct, "singular_values": s.tolist()})
    return {"r": r, "alpha": alpha, "dropout": float(cfg.get("lora_dropout") or 0.0), "scaling": scaling,
            "targets": cfg["target_modules"], "layers": sorted(rows, key=lambda row: -row["relative"])}


# ----------------------------------------------------------------------------------- the report

def inspect_model(model_dir, r=_DEFAULTS.lora_r, alpha=_DEFAULTS.lora_alpha, dropout=_DEFAULTS.lora_dropout,
                  targets=_DEFAULTS.lora_targets, batch=_DEFAULTS.micro_batch_size, seq_len=_DEFAULTS.max_seq_len,
                  dtype=torch.float32, device="cpu", adapter=None, measure=False, errors=True, blocks=None):
    """Everything `python -m minilora.inspect` prints, as a JSON-ready dict (sizes in bytes).

    With `adapter`, its r, alpha, dropout and targets replace the arguments."""
    from .hub import resolve_model_dir
    from .lora import lora_modules

    model_dir = resolve_model_dir(model_dir)
    config = load_config(model_dir)
    adapter_report = None
    if adapter is not None:
        adapter_report = adapter_updates(model_dir, config, adapter)
        r, alpha, dropout, targets = (adapter_report[k] for k in ("r", "alpha", "dropout", "targets"))
        if targets == "all-linear":  # as lora.load_adapter
            targets = r"(?!lm_head$).*"
        elif not isinstance(targets, str):  # Phi-3: peft's fused names become our split linears
            from .lora import FUSED_PARTS

            targets = [p for t in targets for p in (FUSED_PARTS.get(t, (t,)) if config.fused_qkv else (t,))]
    if blocks is not None and not set(blocks) <= set(range(config.num_hidden_layers)):
        raise ConfigError(f"--blocks {sorted(blocks)}: {model_dir} has blocks 0 to {config.num_hidden_layers - 1}.")
    device = torch.device(device)
    model = meta_model(config, r, alpha, targets, dropout)
    shown = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
             "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")
    report = {
        "model": model_dir,
        "config": {k: getattr(config, k) for k in shown},
        "settings": {"r": r, "alpha": alpha, "dropout": dropout,
                     "targets": targets if isinstance(targets, str) else list(targets), "batch": batch,
                     "seq_len": seq_len, "dtype": str(dtype).removeprefix("torch."), "device": device.type},
        "parameters": count_parameters(model),
        "lora_layers": len(lora_modules(model)),
        "memory": {"estimated": estimate_memory(model, r, dropout, batch, seq_len, dtype, device), "measured": None},
        "nf4_error": quantization_errors(model_dir, config, dtype, blocks) if errors else None,
        "adapter": adapter_report,
    }
    if measure:
        report["memory"]["measured"] = measure_training_step(model_dir, r, alpha, dropout, targets, batch, seq_len,
                                                             dtype, device)
    return report


_MEMORY_ROWS = (  # (key, label): the order the breakdown is printed and plotted in
    ("nf4_packed", "NF4 packed weights (4 bits each)"),
    ("nf4_stats", "absmax + double-quant statistics"),
    ("float_weights", "float weights (embeddings, norms, head)"),
    ("lora_weights", "LoRA weights (fp32)"),
    ("gradients", "gradients (LoRA only, fp32)"),
    ("adamw_state", "AdamW state (2 fp32 moments + step)"),
)
_STATIC = [k for k, _ in _MEMORY_ROWS]


def _size(n):
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_report(rep, top=10):
    """The report as the text `python -m minilora.inspect` prints."""
    c, s, p = rep["config"], rep["settings"], rep["parameters"]
    est, mea = rep["memory"]["estimated"], rep["memory"]["measured"]
    targets = s["targets"] if isinstance(s["targets"], str) else ", ".join(s["targets"])
    lines = [f"{rep['model']}: {c['model_type']}, {c['num_hidden_layers']} blocks, hidden {c['hidden_size']}, "
             f"MLP {c['intermediate_size']}, heads {c['num_attention_heads']} (kv {c['num_key_value_heads']}) x "
             f"{c['head_dim']}, vocab {c['vocab_size']}{', tied head' if c['tie_word_embeddings'] else ''}", "",
             "Parameters"]
    parts = ", ".join(f"{k} {v:,}" for k, v in p["by_part"].items() if v)
    lines += [f"  total            {p['total']:>14,}",
              f"  quantized (NF4)  {p['quantized']:>14,}  {100 * p['quantized'] / p['total']:.1f}%: every block linear",
              f"  {'float (' + s['dtype'] + ')':17}{p['float']:>14,}  {parts}",
              f"  trainable LoRA   {p['lora']:>14,}  {100 * p['lora'] / p['total']:.2f}% of total: r={s['r']}, "
              f"alpha={s['alpha']:g} on {targets} ({rep['lora_layers']} layers)", ""]
    lines.append(f"Memory of one training step: batch {s['batch']} x {s['seq_len']} tokens, {s['dtype']} on "
                 f"{s['device']}, LoRA dropout {s['dropout']:g}")
    lines.append(f"  {'':44}{'estimated':>12}{'measured' if mea else '':>12}")

    def row(label, key):
        lines.append(f"  {label:44}{_size(est[key]):>12}{_size(mea.get(key)) if mea else '':>12}")

    for key, label in _MEMORY_ROWS:
        row(label, key)
    static = sum(est[k] for k in _STATIC)
    row("activations, no checkpointing", "activations")
    row("activations, block checkpointing", "activations_checkpointed")
    if est.get("recompute_weights"):  # not a saved activation, so not measured by the meter
        lines.append(f"  {'+ merged weights a recomputation keeps':44}{_size(est['recompute_weights']):>12}")
    lines.append(f"  {'total, no checkpointing':44}{_size(static + est['activations']):>12}"
                 f"{_size(sum(mea[k] for k in _STATIC) + mea['activations']) if mea else '':>12}")
    checkpointed = static + est["activations_checkpointed"] + est.get("recompute_weights", 0)
    lines.append(f"  {'total, block checkpointing':44}{_size(checkpointed):>12}"
                 f"{_size(sum(mea[k] for k in _STATIC) + mea['activations_checkpointed']) if mea else '':>12}")
    if mea and "cuda_peak_activations" in mea:
        lines.append(f"  CUDA peak above the weights during forward + backward: {_size(mea['cuda_peak_activations'])} "
                     f"without, {_size(mea['cuda_peak_activations_checkpointed'])} with checkpointing "
                     "(saved activations + logits and their gradient + LoRA gradients + temporaries)")
    act = est["activation_detail"]
    bits = 8 * (est["nf4_packed"] + est["nf4_stats"]) / p["quantized"]
    lines += [f"  {bits:.3f} bits per quantized weight (4 + the absmax statistics)",
              f"  activations: largest block {_size(act['largest_block'])}, head (final norm and loss) "
              f"{_size(act['head'])}, block inputs + RoPE tables {_size(act['inputs'])}; checkpointing keeps "
              f"{_size(act['checkpoint_kept'])} of block inputs and masks and recomputes one block at a time"]
    if rep["nf4_error"]:
        rows = rep["nf4_error"]
        lines += ["", f"NF4 quantization error, worst {min(top, len(rows))} of {len(rows)} block linears "
                      "(relative = ||W - Q||_F / ||W||_F, Q the dequantized NF4 weight)",
                  f"  {'layer':42}{'shape':>12}{'relative':>10}{'max |W-Q|':>11}{'max |W|':>10}"]
        for e in rows[:top]:
            lines.append(f"  {e['name']:42}{'x'.join(map(str, e['shape'])):>12}{e['rel_fro']:>10.4f}"
                         f"{e['max_abs']:>11.4f}{e['max_weight']:>10.4f}")
        by_kind = _mean_by_kind(rows, "rel_fro")
        lines.append("  mean relative error by projection: " + ", ".join(f"{k} {v:.4f}" for k, v in by_kind.items()))
    a = rep["adapter"]
    if a:
        rows = a["layers"]
        lines += ["", f"LoRA adapter: r={a['r']}, alpha={a['alpha']:g}, scaling={a['scaling']:g}; the "
                      f"{min(top, len(rows))} of {len(rows)} layers that moved most "
                      "(relative = ||scaling B A||_F / ||W||_F)",
                  "  effective rank = exp(entropy of the normalised singular values of B A) (Roy & Vetterli 2007); "
                  "rank@1% = singular values above 1% of the largest",
                  f"  {'layer':42}{'||sBA||_F':>11}{'||W||_F':>10}{'relative':>10}{'eff.rank':>9}{'rank@1%':>8}"]
        for u in rows[:top]:
            lines.append(f"  {u['name']:42}{u['update_fro']:>11.4f}{u['weight_fro']:>10.3f}{u['relative']:>10.5f}"
                         f"{u['erank']:>9.2f}{u['rank_1pct']:>8}")
        by_kind = _mean_by_kind(rows, "relative")
        lines.append("  mean relative update by projection: " + ", ".join(f"{k} {v:.5f}" for k, v in by_kind.items()))
    return "\n".join(lines)


def _mean_by_kind(rows, key):
    groups = {}
    for row in rows:
        groups.setdefault(row["name"].rsplit(".", 1)[-1], []).append(row[key])
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def _block_of(name):
    return int(name.split(".")[2]) if name.startswith("model.layers.") else -1


def plot_report(rep, path):
    """Per-layer NF4 error, the memory breakdown, and (with an adapter) the relative update per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = [p for p in ("error", "memory", "adapter") if p == "memory" or rep.get({"error": "nf4_error"}.get(p, p))]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel in ("error", "adapter"):
            rows, key = (rep["nf4_error"], "rel_fro") if panel == "error" else (rep["adapter"]["layers"], "relative")
            for kind in sorted({r["name"].rsplit(".", 1)[-1] for r in rows}):
                pts = sorted((_block_of(r["name"]), r[key]) for r in rows if r["name"].endswith("." + kind))
                ax.plot([b for b, _ in pts], [v for _, v in pts], marker=".", label=kind)
            ax.set_xlabel("block")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.set_ylabel("||W - Q||_F / ||W||_F" if panel == "error" else "||scaling B A||_F / ||W||_F")
            ax.set_title("NF4 error per layer" if panel == "error" else "LoRA update per layer")
            ax.legend(fontsize=7)
        else:
            est = rep["memory"]["estimated"]
            bars = [("no checkpointing", est["activations"]), ("block checkpointing", est["activations_checkpointed"])]
            labels = [label for _, label in _MEMORY_ROWS] + ["activations"]
            for y, (name, act) in enumerate(bars):
                left = 0
                for i, value in enumerate([est[k] for k in _STATIC] + [act]):
                    ax.barh(y, value / 2**20, left=left, color=f"C{i}", label=labels[i] if y == 0 else None)
                    left += value / 2**20
            ax.set_yticks(range(len(bars)), [name for name, _ in bars])
            s = rep["settings"]
            ax.set_xlabel("MiB (estimated)")
            ax.set_title(f"training memory, batch {s['batch']} x {s['seq_len']}, {s['dtype']}")
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minilora.inspect", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="local model directory, hub id or short name")
    parser.add_argument("--adapter", help="PEFT LoRA adapter directory: analyse its updates (its r/alpha/targets win)")
    parser.add_argument("--rank", type=int, default=_DEFAULTS.lora_r, help="LoRA rank r")
    parser.add_argument("--alpha", type=float, default=_DEFAULTS.lora_alpha, help="LoRA alpha")
    parser.add_argument("--dropout", type=float, default=_DEFAULTS.lora_dropout, help="LoRA dropout")
    parser.add_argument("--targets", nargs="+", default=list(_DEFAULTS.lora_targets), help="LoRA target linears")
    parser.add_argument("--batch", type=int, default=_DEFAULTS.micro_batch_size, help="rows per micro-batch")
    parser.add_argument("--seq-len", type=int, default=_DEFAULTS.max_seq_len, help="tokens per row")
    parser.add_argument("--device", default=_DEFAULTS.device, help="'auto' (cuda if present), 'cpu', 'cuda' "
                        "(estimates for cuda need no GPU; --measure does)")
    parser.add_argument("--dtype", default=_DEFAULTS.dtype, choices=("auto", "bfloat16", "float32"),
                        help="compute dtype: 'auto' = bfloat16 autocast on GPU, float32 on CPU (as train.py)")
    parser.add_argument("--measure", action="store_true", help="also run one real training step and measure it")
    parser.add_argument("--errors", action=argparse.BooleanOptionalAction, default=True,
                        help="compute the per-layer NF4 error table (reads every block linear once)")
    parser.add_argument("--blocks", type=int, nargs="+", help="only these block indices in the error table")
    parser.add_argument("--top", type=int, default=10, help="rows of the error and adapter tables in the text output")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    parser.add_argument("--plot", metavar="PNG", help="draw the per-layer error and the memory breakdown to this file")
    args = parser.parse_args(argv)
    from .trainer import resolve_device_and_dtype

    try:
        if args.batch < 1 or args.seq_len < 1 or args.rank < 1:
            raise ConfigError(f"--batch {args.batch}, --seq-len {args.seq_len}, --rank {args.rank}: expected "
                              "positive integers.")
        device, dtype = resolve_device_and_dtype(TrainConfig(device=args.device, dtype=args.dtype))
        if args.measure and device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--measure on cuda: no CUDA device is visible here; use --device cpu to measure on CPU.")
        report = inspect_model(args.model, args.rank, args.alpha, args.dropout, tuple(args.targets), args.batch,
                               args.seq_len, dtype, device, args.adapter, args.measure, args.errors,
                               set(args.blocks) if args.blocks else None)
    except MiniloraError as e:
        print(f"error ({type(e).__name__}): {e}", file=sys.stderr)
        return 1
    if args.plot:
        plot_report(report, args.plot)
    print(json.dumps(report, indent=1) if args.json else format_report(report, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
