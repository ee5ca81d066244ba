"""LoRA: low-rank adapters on frozen linear layers, merged or not, saved and loaded in the PEFT format.

Hu et al., "LoRA" (arXiv 2106.09685): y = base(x) + (dropout(x) @ A^T @ B^T) * scaling, with A (r, in)
Kaiming-uniform and B (out, r) zero, so a fresh adapter changes nothing. scaling = alpha / r, or
alpha / sqrt(r) for rsLoRA (Kalajdzievski, arXiv 2312.03732). The base is any frozen linear: `nn.Linear`
or the NF4 `Linear4bit` (QLoRA). Checked against peft 0.21 `tuners/lora/layer.py` by tests/test_lora.py:
an adapter saved here gives the same logits under peft + transformers, and one saved by peft loads here.

On disk (PEFT layout, so `PeftModel.from_pretrained` reads it):
  adapter_config.json          peft_type LORA, r, lora_alpha, lora_dropout, target_modules, use_rslora, ...
  adapter_model.safetensors    base_model.model.<module>.lora_A.weight (r, in) / .lora_B.weight (out, r)
`save_merged` writes base + B A as a plain Hugging Face checkpoint (Phi-3's q/k/v and gate/up re-fused).
"""
import json
import math
import os
import re
import shutil

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CheckpointError, ConfigError, NonFiniteError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM wraps the HF model as base_model.model


def _fused(x):
    """The fused LoRA node runs on CUDA unless the torch reference path is chosen (backend "torch")."""
    if not x.is_cuda:
        return False
    from minilora.kernels.backend import resolve_backend

    return resolve_backend("auto", x.device) != "torch"


class LoRALinear(nn.Module):
    """A frozen linear `base_layer` plus the trainable low-rank update `lora_B @ lora_A`."""

    def __init__(self, base_layer, r, alpha, dropout=0.0, use_rslora=False, dtype=torch.float32):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_p = dropout
        device = _device_of(base_layer)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        # PEFT / loralib: A as nn.Linear's default init (bound 1/sqrt(in)), B zero so the start is the base model.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False
        self.output_unused = False  # set by model.Block while recomputing a block whose output is discarded
        self.keep_weight = False  # set by model.Block while recomputing: its backward follows at once

    def forward(self, x):
        if _fused(x) and not self.merged:  # one autograd node, LoRA accumulated into the base GEMM (kernels/lora.py)
            from minilora.kernels.lora import lora_linear

            mask = None
            if self.training and self.dropout_p > 0:
                mask = torch.rand_like(x, dtype=torch.float32) >= self.dropout_p
            return lora_linear(x, self.base_layer, self.lora_A, self.lora_B, self.scaling, mask, self.dropout_p,
                               output=not self.output_unused, keep_weight=self.keep_weight)
        out = self.base_layer(x)
        if self.merged:
            return out
        # peft: the LoRA path runs in the adapter's dtype and the sum is cast back to the output's dtype.
        # Under autocast the matmuls run in bf16 whatever x is, so casting x up to fp32 would only cost copies.
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.dtype)
        return (out + (self.dropout(h) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling).to(out.dtype)

    def delta_weight(self):
        """scaling * B @ A, the (out, in) update in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merge(self):
        """Fold B A into the base weight. An NF4 base is dequantized for good: merging gives a float nn.Linear."""
        if self.merged:
            return
        with torch.no_grad():
            if not isinstance(self.base_layer, nn.Linear):  # Linear4bit: re-quantizing would lose the update
                self.base_layer = _float_linear(self.base_layer)
            w = self.base_layer.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))  # add in fp32, round once
        self.merged = True

    def unmerge(self):
        """Subtract B A again (within the weight dtype's rounding; an NF4 base stays float)."""
        if not self.merged:
            return
        with torch.no_grad():
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout_p}, merged={self.merged}"


def _device_of(module):
    tensors = list(module.parameters()) + list(module.buffers())
    return tensors[0].device if tensors else torch.device("cpu")


def _is_linear(module):
    """nn.Linear or the NF4 Linear4bit (duck-typed so nf4.py stays an optional import)."""
    return isinstance(module, nn.Linear) or (hasattr(module, "dequantize") and hasattr(module, "in_features"))


def _float_weight(linear):
    return linear.weight if isinstance(linear, nn.Linear) else linear.dequantize()


def _float_linear(linear):
    """An nn.Linear holding `linear`'s weight as floats (dequantized for NF4), frozen, same device."""
    weight = _float_weight(linear).detach()
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    out.weight = nn.Parameter(weight.clone(), requires_grad=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return out


def lora_modules(model):
    """{module name: LoRALinear} in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model):
    """{"<module>.lora_A": tensor, "<module>.lora_B": tensor}: the whole adapter, our names."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = m.lora_A, m.lora_B
    return out


def parameter_counts(model):
    """(trainable, base): the trainable parameters (the adapter), and the base model's parameters with each
    weight at its logical size: an NF4 weight counts out x in (not its packed bytes, which are buffers, or a
    uint8/float Parameter under FSDP), tied weights once. The ratio is `python -m minilora.inspect`'s."""
    base = sum(m.in_features * m.out_features for m in model.modules() if _is_linear(m) and not isinstance(m, nn.Linear))
    base += sum(p.numel() for name, p in model.named_parameters()
                if not name.endswith("weight_packed") and not name.endswith((".lora_A", ".lora_B")))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, base


def _target_rules(targets):
    """PEFT's rule: a string is one regex matched against the full module name; list entries match the
    last name component(s). Returns {pattern: predicate}."""
    if isinstance(targets, str):
        return {targets: lambda name: re.fullmatch(targets, name) is not None}
    return {t: (lambda name, t=t: name == t or name.endswith("." + t)) for t in targets}


def apply_lora(model, r, alpha, dropout=0.0, targets=DEFAULT_TARGETS, use_rslora=False, dtype=torch.float32):
    """Wrap every linear whose name matches `targets` in a LoRALinear and freeze everything else.

    targets: leaf names as PEFT users type them (q_proj, ..., down_proj; lm_head is allowed), or one
    regex string matched against the full module name. Returns the model (changed in place).
    """
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ConfigError(f"lora r={r!r}: expected a positive integer rank.")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"lora alpha={alpha!r}: expected a positive number.")
    if not 0 <= dropout < 1:
        raise ConfigError(f"lora dropout={dropout!r}: expected 0 <= dropout < 1.")
    if lora_modules(model):
        raise ConfigError("apply_lora: the model already has LoRA layers; load or build a fresh model first.")
    if isinstance(targets, (list, tuple)) and not targets:
        raise ConfigError("lora target_modules is empty: name at least one linear layer (e.g. q_proj).")
    rules = _target_rules(targets)
    linears = [(name, m) for name, m in model.named_modules() if name and _is_linear(m)]
    chosen = [(name, m) for name, m in linears if any(rule(name) for rule in rules.values())]
    unmatched = [t for t, rule in rules.items() if not any(rule(name) for name, _ in linears)]
    if unmatched:
        leaf_names = sorted({name.rsplit(".", 1)[-1] for name, _ in linears})
        raise ConfigError(f"lora target_modules {unmatched} match no linear layer of this model; "
                          f"its linear layers are named {leaf_names}.")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(linear, r, alpha, dropout, use_rslora, dtype))
    return model


def merge_lora(model):
    for m in lora_modules(model).values():
        m.merge()
    return model


def unmerge_lora(model):
    for m in lora_modules(model).values():
        m.unmerge()
    return model


# ------------------------------------------------------------------------------------ PEFT files

def _settings(model):
    """(r, alpha, dropout, use_rslora, target leaf names) shared by every LoRA layer of `model`."""
    modules = lora_modules(model)
    if not modules:
        raise ConfigError("the model has no LoRA layers: call apply_lora first.")
    kinds = {(m.r, m.alpha, m.dropout_p, m.use_rslora) for m in modules.values()}
    if len(kinds) != 1:
        raise ConfigError(f"LoRA layers disagree on (r, alpha, dropout, use_rslora): {sorted(kinds)}; "
                          "the PEFT format here stores one setting for all layers.")
    r, alpha, dropout, rslora = kinds.pop()
    targets = sorted({name.rsplit(".", 1)[-1] for name in modules})
    return r, alpha, dropout, rslora, targets


def adapter_state(model):
    """The adapter tensors under their PEFT names, detached and contiguous."""
    return {f"{PEFT_PREFIX}{name}.weight": t.detach().contiguous() for name, t in lora_parameters(model).items()}


def check_finite(tensors, what):
    """NonFiniteError naming the first tensors holding NaN/inf: nothing non-finite is written to disk."""
    bad = [f"{k} ({int((~torch.isfinite(t)).sum())} non-finite)" for k, t in tensors.items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteError(f"refusing to save {what}: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. "
                             "Training diverged; lower the learning rate or resume from an earlier checkpoint.")


def adapter_config(model, base_model_name_or_path=None):
    r, alpha, dropout, rslora, targets = _settings(model)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
            "target_modules": targets, "use_rslora": rslora, "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
            "base_model_name_or_path": base_model_name_or_path, "revision": None}


def save_adapter(model, directory, base_model_name_or_path=None):
    """Write adapter_config.json and adapter_model.safetensors (PEFT names) into `directory`."""
    tensors = {k: t.cpu() for k, t in adapter_state(model).items()}
    check_finite(tensors, f"the adapter to {directory}")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(adapter_config(model, base_model_name_or_path), f, indent=2)
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})


# PEFT options that change the maths; anything but these values cannot be loaded faithfully here.
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "modules_to_save": None, "layers_to_transform": None,
                "layer_replication": None, "lora_bias": False, "use_qalora": False}


def read_adapter_config(directory):
    """The PEFT adapter_config.json of `directory`, checked to be a plain LoRA we implement."""
    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: an adapter directory needs PEFT's adapter_config.json "
                              f"and {ADAPTER_WEIGHTS}.")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}).") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else cfg!r}; "
                              "only LORA adapters are supported.")
    problems = [f"{k}={cfg[k]!r} (supported: {v!r})" for k, v in _UNSUPPORTED.items() if cfg.get(k, v) not in (v, None, False)]
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg['bias']!r} (supported: 'none')")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            problems.append(f"{key}={cfg[key]!r} (per-layer ranks are not supported: expected {{}})")
    if cfg.get("target_parameters"):
        problems.append(f"target_parameters={cfg['target_parameters']!r} (not supported)")
    if problems:
        raise CheckpointError(f"{path}: adapter options minilora does not implement: {'; '.join(problems)}.")
    for key in ("r", "lora_alpha", "target_modules"):
        if cfg.get(key) is None:
            raise CheckpointError(f"{path}: required key {key!r} is missing.")
    _check_adapter_types(cfg, path)
    return cfg


def _check_adapter_types(cfg, path):
    """CheckpointError naming the file and key for a value of the wrong type or range (`"r": "eight"`)."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    targets = cfg["target_modules"]
    checks = [
        ("r", isinstance(cfg["r"], int) and not isinstance(cfg["r"], bool) and cfg["r"] >= 1, "an integer >= 1"),
        ("lora_alpha", number(cfg["lora_alpha"]) and cfg["lora_alpha"] > 0, "a positive number"),
        ("lora_dropout", cfg.get("lora_dropout") is None or (number(cfg["lora_dropout"]) and 0 <= cfg["lora_dropout"] < 1),
         "a number in [0, 1)"),
        ("target_modules", isinstance(targets, str) and targets != "" or (isinstance(targets, list) and targets and
                                                                          all(isinstance(t, str) and t for t in targets)),
         "a list of module names or a regular-expression string"),
        ("use_rslora", isinstance(cfg.get("use_rslora", False), bool), "true or false"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise CheckpointError(f"{path}: {key}={cfg.get(key)!r} is not {expected}.")


# Phi-3 checkpoints fuse these projections; minilora splits them at load time (weights.py), so a peft
# adapter on a fused layer becomes one LoRA per part: the same A, and B cut by rows (exact, as
# dW_qkv = B A stacks dW_q = B[q rows] A, dW_k = B[k rows] A, dW_v = B[v rows] A).
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _unfused_targets(targets, fused):
    if not fused or isinstance(targets, str):
        return targets
    return [part for t in targets for part in FUSED_PARTS.get(t, (t,))]


def _destinations(key, params, fused):
    """[(our PEFT-style key, row slice or None)] that the file tensor `key` fills; [] if none."""
    if key in params:
        return [(key, None)]
    for fused_name, parts in FUSED_PARTS.items() if fused else ():
        head, sep, tail = key.partition(f".{fused_name}.")  # tail: "lora_A.weight" / "lora_B.weight"
        names = [f"{head}.{part}.{tail}" for part in parts]
        if sep and all(n in params for n in names):
            if tail.startswith("lora_A"):
                return [(n, None) for n in names]
            starts = [0]
            for n in names:
                starts.append(starts[-1] + params[n].shape[0])
            return [(n, slice(a, b)) for n, a, b in zip(names, starts, starts[1:])]
    return []


def load_adapter(model, directory):
    """Attach the PEFT LoRA adapter in `directory` to `model` (which must not have LoRA layers yet).

    Strict: every tensor in the file must be a LoRA weight of a targeted layer with the right shape and
    every LoRA weight must be in the file; all problems are reported at once. Returns the model.
    """
    cfg = read_adapter_config(directory)
    targets = cfg["target_modules"]
    if targets == "all-linear":  # peft: every linear except the output head
        targets = r"(?!lm_head$).*"
    fused = bool(getattr(getattr(model, "config", None), "fused_qkv", False))
    try:
        apply_lora(model, int(cfg["r"]), float(cfg["lora_alpha"]), float(cfg.get("lora_dropout") or 0.0),
                   _unfused_targets(targets, fused), bool(cfg.get("use_rslora", False)))
    except ConfigError as e:
        raise CheckpointError(f"{os.path.join(directory, ADAPTER_CONFIG)} does not fit this model: {e}") from None
    path = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing (pickled adapter_model.bin files are not loaded; "
                              "re-save the adapter with safetensors).")
    params = {f"{PEFT_PREFIX}{name}.weight": p for name, p in lora_parameters(model).items()}
    problems, filled = [], set()
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as safetensors ({e}); the file is truncated or corrupt.") from None
    with handle:
        for key in handle.keys():
            destinations = _destinations(key, params, fused)
            if not destinations:
                problems.append(f"unexpected tensor {key!r} (no LoRA layer of that name)")
                continue
            tensor = handle.get_tensor(key)
            expected = list(params[destinations[0][0]].shape)
            if destinations[0][1] is not None:  # a fused B: the parts' rows stacked
                expected[0] = destinations[-1][1].stop
            if list(tensor.shape) != expected:
                problems.append(f"tensor {key!r} has shape {list(tensor.shape)}, expected {expected}")
                continue
            with torch.no_grad():
                for name, rows in destinations:
                    part = tensor if rows is None else tensor[rows]
                    params[name].copy_(part.to(device=params[name].device, dtype=params[name].dtype))
                    filled.add(name)
    missing = sorted(set(params) - filled)
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    if problems:
        raise CheckpointError(f"adapter {path} does not match the model:\n  - " + "\n  - ".join(problems))
    return model


# ---------------------------------------------------------------------------------- merged export

def merged_state_dict(model):
    """HF tensor names -> float tensors of base + B A, for every weight of the model (NF4 dequantized).

    Phi-3's q/k/v and gate/up are concatenated back into qkv_proj / gate_up_proj; a tied lm_head is
    written once (as the embedding), as transformers' save_pretrained does.
    """
    state = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear):
                base = module.base_layer
                w = _float_weight(base)
                state[f"{name}.weight"] = w if module.merged else (w.float() + module.delta_weight()).to(w.dtype)
                if base.bias is not None:
                    state[f"{name}.bias"] = base.bias
            elif _is_linear(module) and not isinstance(module, nn.Linear):
                state[f"{name}.weight"] = module.dequantize()
                if module.bias is not None:
                    state[f"{name}.bias"] = module.bias
        for name, p in model.named_parameters(remove_duplicate=True):
            if ".lora_" not in name and ".base_layer." not in name and name not in state:
                state[name] = p
    for name in [k for k in state if ".base_layer." in k]:
        del state[name]
    config = model.config
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if config.fused_qkv:  # Phi-3 checkpoints store fused projections
        for i in range(config.num_hidden_layers):
            attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            for part in ("weight", "bias"):
                if f"{attn}.q_proj.{part}" in state:
                    state[f"{attn}.qkv_proj.{part}"] = torch.cat([state.pop(f"{attn}.{p}_proj.{part}") for p in "qkv"])
            state[f"{mlp}.gate_up_proj.weight"] = torch.cat([state.pop(f"{mlp}.gate_proj.weight"),
                                                             state.pop(f"{mlp}.up_proj.weight")])
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


_COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja")


def save_merged(model, directory, base_dir=None, tokenizer=None):
    """Write base + LoRA as a Hugging Face checkpoint that `AutoModelForCausalLM.from_pretrained` loads.

    base_dir: the base model's directory (default: `model.source_dir` where the loader recorded it); its
    config.json (and tokenizer / generation config files) are copied, since the merged model has exactly
    the base architecture. The weights are written in their float dtype (NF4 layers dequantized to their
    compute dtype). `tokenizer` (a minilora Tokenizer) is saved instead of the base's tokenizer files.
    """
    base_dir = base_dir or getattr(model, "source_dir", None)
    if base_dir is None:
        raise CheckpointError("save_merged needs base_dir=, the base model's directory (its config.json is copied).")
    base_dir = os.path.abspath(base_dir)
    if os.path.abspath(directory) == base_dir:
        raise CheckpointError(f"save_merged: output directory {directory} is the base model directory; "
                              "choose another so the base weights are not overwritten.")
    if not os.path.isfile(os.path.join(base_dir, "config.json")):
        raise CheckpointError(f"save_merged: {base_dir} has no config.json to copy for the merged model.")
    state = merged_state_dict(model)
    check_finite(state, f"merged weights to {directory}")
    os.makedirs(directory, exist_ok=True)
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    for fname in _COPIED_FILES:
        if tokenizer is not None and fname.startswith(("tokenizer", "special_tokens")):
            continue
        src = os.path.join(base_dir, fname)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(directory, fname))
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory
