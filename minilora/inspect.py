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

The activation formulas follow what autograd saves in minilora's own forward (model.py, lora.py,
kernels/backend.py): on CPU in fp32 (what tests check exactly) and on CUDA under bf16 autocast with
fp32 LoRA weights (what trainer.py runs). They are for the fused-attention path (SDPA: q, k, v, output
and log-sum-exp, no T x T matrix) except Gemma 2's soft-capped attention, which keeps T x T scores.
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

from .config import TrainConfig, load_config
from .errors import MiniloraError

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
    """How the training step runs, which decides what autograd saves and in which dtype."""
    act: int  # bytes of a saved activation: 4 (fp32) or 2 (bf16 autocast)
    autocast: bool  # CUDA bf16 autocast with fp32 LoRA weights (trainer.py on a GPU)
    dropout_mask: int  # bytes per element dropout saves: CUDA's fused kernel a bool mask, CPU an fp32 noise

    @staticmethod
    def of(device, dtype):
        autocast = device.type == "cuda" and dtype != torch.float32
        return Regime(act=2 if autocast else 4, autocast=autocast, dropout_mask=1 if device.type == "cuda" else 4)


def _lora_activations(width, out_width, r, N, dropout, reg, grad_x, input_saved):
    """Bytes one targeted LoRALinear keeps (lora.py `forward`): h @ A^T keeps h, its (possibly dropped
    out) input; u @ B^T keeps u = h A^T, r wide. `input_saved`: another op already keeps the input."""
    a = reg.act
    if reg.autocast:  # x.to(fp32), then autocast's bf16 copy for the matmul: each layer keeps its own,
        kept = N * width * 2 + 2 * r * (width + out_width)  # plus the bf16 copies of A and B
        return kept + N * r * a + (N * width * reg.dropout_mask if dropout and grad_x else 0)
    if dropout:  # a new dropped-out input, plus the mask when x needs a gradient
        return N * width * (a + (reg.dropout_mask if grad_x else 0)) + N * r * a
    return (0 if input_saved else N * width * a) + N * r * a


def _block_activations(c, i, lora, r, dropout, B, T, reg, grad_in):
    """Bytes block `i` keeps for backward, by part, and whether its output requires grad.

    grad_in: does the block input require grad? Block 0's input (the frozen embedding's output) does
    not, so the ops before its first LoRA layer keep nothing. Part "input" is the block input itself
    (fp32 RMSNorm keeps x.float(), which is x): checkpointing keeps it anyway, so it is not recomputed.
    The RoPE tables all blocks share are counted by the caller.
    """
    N, a = B * T, reg.act
    D, H, Hkv, Dh, Fd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
    parts = Counter()

    def norm(width, rows, grad, part="norms"):  # RMSNorm keeps h = x.float() and rsqrt(mean(h^2) + eps), fp32
        if grad:
            parts[part if a == 4 else "norms"] += rows * 4 * width  # under bf16 autocast h is a new fp32 copy
            parts["norms"] += rows * 4 + (4 * width if c.norm_unit_offset else 0)  # Gemma: and (1 + w)

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
        # SDPA (flash/efficient kernels): q, k, v, the output and the fp32 log-sum-exp per query and head
        parts["attention"] += N * ((2 * H + 2 * Hkv) * Dh * a + 4 * H)
        if window is not None:
            parts["attention"] += B * T * T * a  # the bool window mask, converted to an additive float mask
    # o_proj's input: with SDPA a view of the output kept above, with soft-capping a new (B, T, H*Dh)
    grad = lora_layer(("o_proj",), H * Dh, grad, input_saved=grad and c.attn_logit_softcap is None)
    if c.sandwich_norms:
        norm(D, N, grad)  # Gemma 2/3 normalise the attention output too
    # MLP half: act(gate) keeps gate; act(gate) * up keeps act(gate) (if up needs a gradient) and up
    norm(D, N, grad)
    grad_gate, grad_up = grad or "gate_proj" in lora, grad or "up_proj" in lora
    lora_layer(("gate_proj", "up_proj"), D, grad)
    parts["mlp"] += N * Fd * a * (2 * int(grad_gate) + int(grad_up))
    grad = lora_layer(("down_proj",), Fd, grad_gate or grad_up)  # nothing else keeps the product
    if c.sandwich_norms:
        norm(D, N, grad)
    return parts, grad


def estimate_activations(c, lora, r, dropout, B, T, reg):
    """Bytes autograd keeps for backward in one training step, from the config.

    lora: {targeted linear leaf name: its output width}. Returns "blocks" (per block, bytes by part,
    without the block's input), "inputs" (block inputs kept by a norm, and the RoPE tables), "head",
    "total"; and "checkpointed": the peak with block-level gradient checkpointing (model.py), where the
    forward keeps only each block's inputs (x, RoPE tables, masks) and the head, and the backward
    recomputes one block at a time: kept + head + the largest block.
    """
    N, a, D, V = B * T, reg.act, c.hidden_size, c.vocab_size
    blocks, inputs, grad = [], 0, False  # the frozen embedding's output needs no gradient
    for i in range(c.num_hidden_layers):
        parts, grad = _block_activations(c, i, lora, r, dropout, B, T, reg, grad)
        inputs += parts.pop("input", 0)
        blocks.append(dict(parts))
    # RoPE: x * cos and x * sin keep cos and sin (B, T, Dh), one pair per table (Gemma 3: a local one too)
    tables = (2 if c.local_rope is not None else 1) * 2 * N * c.head_dim * a
    inputs += tables
    # head: final norm, log_softmax output (fp32), the int64 labels and nll_loss's fp32 total weight
    final_norm = N * (4 * D + 4) + (4 * D if c.norm_unit_offset else 0)
    head = (final_norm if grad else 0) + N * V * 4 + N * 8 + 4
    if "lm_head" in lora:  # its input, the final norm's output, is kept by nothing else
        head += _lora_activations(D, V, r, N, dropout, reg, grad, False)
    if c.final_logit_softcap is not None:
        head += N * V * 4  # Gemma 2: tanh(logits / cap) keeps its output
    total = sum(sum(b.values()) for b in blocks) + inputs + head
    # checkpointing keeps every block's input x (B, T, D), the RoPE tables and each (B, 1, T, T) bool mask
    masks = len({w for w in c.layer_windows if w is not None}) * B * T * T if c.layer_windows else 0
    kept = c.num_hidden_layers * N * D * a + tables + masks
    largest = max(sum(b.values()) for b in blocks)
    return {"blocks": blocks, "inputs": inputs, "head": head, "total": total,
            "checkpointed": kept + head + largest, "checkpoint_kept": kept, "largest_block": largest}


def estimate_memory(model, r, dropout, batch, seq_len, dtype, device):
    """The memory of one QLoRA training step, by component, in bytes (see the module docstring)."""
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
    acts = estimate_activations(c, lora, r, dropout, batch, seq_len, reg)
    return {
        "nf4_packed": packed, "nf4_stats": stats, "float_weights": floats,
        "lora_weights": 4 * lora_numel,  # LoRA weights in fp32 (QLoRA: fp32 adapters over a bf16 base)
        "gradients": 4 * lora_numel,  # only LoRA weights get gradients, in their own fp32
        # torch AdamW: exp_avg and exp_avg_sq like the weight, plus a 4-byte step tensor per weight
        "adamw_state": 8 * lora_numel + 4 * 2 * len(modules),
        "activations": acts["total"], "activations_checkpointed": acts["checkpointed"],
        "activation_detail": acts,
    }


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
                out[owners.pop() if len(owners) == 1 else "head"] += nbytes
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

    from .lora import ADAPTER_WEIGHTS, PEFT_PREFIX, read_adapter_config

    cfg = read_adapter_config(adapter_dir)
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    pairs = {}
    with safe_open(os.path.join(adapter_dir, ADAPTER_WEIGHTS), framework="pt", device="cpu") as f:
        for key in f.keys():
            module, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            pairs.setdefault(module, {})[kind.split(".")[0]] = f.get_tensor(key).float()
    # a tied head's weight is the embedding
    source = {m + ".weight": m for m in pairs}
    if config.tie_word_embeddings and "lm_head" in pairs:
        source["model.embed_tokens.weight"] = "lm_head"
    norms = {source[n]: w.float().norm().item() for n, w in stream_weights(model_dir, config, source.__contains__)}
    rows = []
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"} or module not in norms:
            raise MiniloraError(f"{adapter_dir}: LoRA layer {module!r} needs lora_A and lora_B and a base weight "
                                f"in {model_dir}; found {sorted(ab)}.")
        s = update_spectrum(ab["A"], ab["B"], scaling)
        erank, rank_1pct = effective_rank(s)
        update = s.square().sum().sqrt().item()  # ||M||_F^2 is the sum of its squared singular values
        rows.append({"name": module, "update_fro": update, "weight_fro": norms[module],
                     "relative": update / norms[module], "erank": erank, "rank_1pct": rank_1pct,
                     "singular_values": s.tolist()})
    return {"r": r, "alpha": alpha, "scaling": scaling, "targets": cfg["target_modules"],
            "layers": sorted(rows, key=lambda row: -row["relative"])}
