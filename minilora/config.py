"""Model configuration: a frozen `ModelConfig` built from a Hugging Face `config.json`.

One small function per architecture turns the HF keys into the fields `model.py` reads. Every family
difference is a field here with a comment naming the model that needs it. Values we do not implement
(an unknown `rope_scaling` type, a `model_type` we do not know) raise `ConfigError` naming the key:
a silently ignored key would give a model that runs and is wrong.

Checked against transformers' configuration_{llama,qwen2,gemma,gemma2,gemma3,phi3}.py (v4 and v5 keys).
"""
import dataclasses
import json
import math
import os
from typing import Optional

import torch

from .errors import ConfigError

MAX_CONFIG_BYTES = 10 * 2**20  # a config.json is a few KB; bound what we parse
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "gemma", "gemma2", "gemma3_text", "phi3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float
    kind: str = "default"  # "default" | "linear" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = True
    activation: str = "silu"  # "silu" (SwiGLU) | "gelu_tanh" (Gemma GeGLU) | "gelu"
    qkv_bias: bool = False  # Qwen2: q/k/v biases; Llama attention_bias=True also sets o_bias
    o_bias: bool = False
    mlp_bias: bool = False  # Llama mlp_bias=True
    norm_unit_offset: bool = False  # Gemma: RMSNorm scales by (1 + w) in fp32
    embedding_scale: Optional[float] = None  # Gemma: embeddings times sqrt(hidden) in the model dtype
    attention_scale: Optional[float] = None  # Gemma 2/3: query_pre_attn_scalar**-0.5, else head_dim**-0.5
    attn_logit_softcap: Optional[float] = None  # Gemma 2: 50 * tanh(scores / 50)
    final_logit_softcap: Optional[float] = None  # Gemma 2: 30 * tanh(logits / 30)
    sandwich_norms: bool = False  # Gemma 2/3: norms after attention and MLP too (four per block)
    qk_norm: bool = False  # Gemma 3: RMSNorm on each query/key head before RoPE
    layer_windows: tuple = ()  # per layer: sliding window length or None (Gemma 2/3, Phi-3)
    local_rope: Optional[RopeConfig] = None  # Gemma 3: sliding layers use their own RoPE base
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[object] = None
    torch_dtype: str = "bfloat16"
    fused_qkv: bool = False  # Phi-3: checkpoint stores qkv_proj / gate_up_proj, split at load time

    @property
    def scale(self):
        return self.attention_scale if self.attention_scale is not None else self.head_dim ** -0.5

    def rope_for_layer(self, i):
        return self.local_rope if (self.local_rope is not None and self.layer_windows[i] is not None) else self.rope


MAX_SIZE = 2**31 - 1  # the largest size/count a config may give
MAX_LAYERS = 4096  # far above any real model; a larger count is a broken file, not a model to build


def _get(raw, key, source, default=dataclasses.MISSING, kind=None):
    if key not in raw or raw[key] is None:
        if default is dataclasses.MISSING:
            raise ConfigError(f"{source}: required key {key!r} is missing.")
        return default
    value = raw[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ConfigError(f"{source}: {key!r} must be a positive integer, found {value!r}.")
    if kind is int and value > MAX_SIZE:  # tensors of such sizes cannot be built (torch, our int32 kernels)
        raise ConfigError(f"{source}: {key!r}={value} is larger than {MAX_SIZE}.")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0):
        raise ConfigError(f"{source}: {key!r} must be a positive number, found {value!r}.")
    return value


def _parse_rope(params, source, key):
    """A RoPE dict in either v4 (`rope_scaling` + `rope_theta`) or v5 (`rope_parameters`) form."""
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: {key} must be a JSON object, found {params!r}.")
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    theta = _get(params, "rope_theta", f"{source}: {key}", kind=float)
    if kind == "default":
        return RopeConfig(theta=float(theta))
    if kind == "linear":
        return RopeConfig(theta=float(theta), kind="linear", factor=float(_get(params, "factor", f"{source}: {key}", kind=float)))
    if kind == "llama3":
        where = f"{source}: {key} of type 'llama3'"
        return RopeConfig(theta=float(theta), kind="llama3", factor=float(_get(params, "factor", where, kind=float)),
                          low_freq_factor=float(_get(params, "low_freq_factor", where, kind=float)),
                          high_freq_factor=float(_get(params, "high_freq_factor", where, kind=float)),
                          original_max_position_embeddings=_get(params, "original_max_position_embeddings", where, kind=int))
    raise ConfigError(f"{source}: {key} type {kind!r} is not implemented (supported: default, linear, llama3).")


def _rope(raw, source, layer_type=None):
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and layer_type is not None and layer_type in params:
        return _parse_rope(params[layer_type], source, f"rope_parameters[{layer_type!r}]")
    if isinstance(params, dict) and "rope_theta" in params:
        return _parse_rope(params, source, "rope_parameters")
    scaling = raw.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_scaling must be a JSON object or null, found {scaling!r}.")
    scaling = {**scaling, "rope_theta": _get(raw, "rope_theta", source, 10000.0, float)}
    return _parse_rope(scaling, source, "rope_scaling")


def _check_unsupported(raw, source):
    if raw.get("partial_rotary_factor", 1.0) not in (1, 1.0):
        raise ConfigError(f"{source}: partial_rotary_factor={raw['partial_rotary_factor']} is not implemented.")
    if raw.get("pretraining_tp", 1) not in (1, None):
        raise ConfigError(f"{source}: pretraining_tp={raw['pretraining_tp']} is not implemented (expected 1).")
    if raw.get("use_bidirectional_attention"):
        raise ConfigError(f"{source}: use_bidirectional_attention=true is not implemented.")


def _activation(name, source):
    table = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}
    if not isinstance(name, str) or name not in table:
        raise ConfigError(f"{source}: hidden_act {name!r} is not implemented (supported: {', '.join(table)}).")
    return table[name]


def _common(raw, source):
    heads = _get(raw, "num_attention_heads", source, kind=int)
    hidden = _get(raw, "hidden_size", source, kind=int)
    head_dim = _get(raw, "head_dim", source, hidden // heads, int)  # Qwen2, Phi-3, SmolLM2 have no head_dim key
    if head_dim < 2 or head_dim % 2:  # RoPE rotates pairs of channels
        raise ConfigError(f"{source}: head_dim={head_dim} (head_dim, or hidden_size={hidden} // num_attention_heads="
                          f"{heads}) must be an even number >= 2.")
    layers = _get(raw, "num_hidden_layers", source, kind=int)
    if layers > MAX_LAYERS:
        raise ConfigError(f"{source}: num_hidden_layers={layers} is larger than {MAX_LAYERS}.")
    kv_heads = _get(raw, "num_key_value_heads", source, heads, int)
    if heads % kv_heads:
        raise ConfigError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}.")
    return dict(
        model_type=raw["model_type"], vocab_size=_get(raw, "vocab_size", source, kind=int), hidden_size=hidden,
        intermediate_size=_get(raw, "intermediate_size", source, kind=int), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=int(head_dim),
        rms_norm_eps=float(_get(raw, "rms_norm_eps", source, 1e-6, float)),
        max_position_embeddings=_get(raw, "max_position_embeddings", source, 8192, int),
        pad_token_id=raw.get("pad_token_id"), bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        layer_windows=(None,) * layers,
    )


def _llama(raw, source):  # Llama 3.2, SmolLM2
    bias = bool(raw.get("attention_bias", False))
    return ModelConfig(**_common(raw, source), rope=_rope(raw, source),
                       tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                       activation=_activation(raw.get("hidden_act", "silu"), source),
                       qkv_bias=bias, o_bias=bias, mlp_bias=bool(raw.get("mlp_bias", False)))


def _qwen2(raw, source):  # Qwen2.5: q/k/v biases hard-coded in Qwen2Attention, none on o_proj
    if raw.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true is not implemented for qwen2.")
    return ModelConfig(**_common(raw, source), rope=_rope(raw, source),
                       tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                       activation=_activation(raw.get("hidden_act", "silu"), source), qkv_bias=True)


def _gemma_family(raw, source):
    common = _common(raw, source)
    # Gemma: the legacy hidden_act "gelu" in google/gemma-2b means the tanh approximation (HF PR #29402).
    return common, dict(tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)), activation="gelu_tanh",
                        norm_unit_offset=True, embedding_scale=math.sqrt(common["hidden_size"]),
                        qkv_bias=bool(raw.get("attention_bias", False)), o_bias=bool(raw.get("attention_bias", False)))


def _gemma(raw, source):  # Gemma 1
    common, extra = _gemma_family(raw, source)
    return ModelConfig(**common, **extra, rope=_rope(raw, source))


def _layer_types(raw, source, layers, default):
    types = raw.get("layer_types") or default
    if not isinstance(types, list) or len(types) != layers or any(t not in ("sliding_attention", "full_attention") for t in types):
        raise ConfigError(f"{source}: layer_types must list {layers} of 'sliding_attention'/'full_attention', found {types!r}.")
    return types


def _gemma2(raw, source):  # Gemma 2: even layers slide (transformers: `not bool(layer_idx % 2)`)
    common, extra = _gemma_family(raw, source)
    layers = common["num_hidden_layers"]
    types = _layer_types(raw, source, layers, ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
    window = raw.get("sliding_window")
    common["layer_windows"] = tuple(window if t == "sliding_attention" else None for t in types)
    return ModelConfig(**common, **extra, rope=_rope(raw, source), sandwich_norms=True,
                       attention_scale=_get(raw, "query_pre_attn_scalar", source, common["head_dim"], float) ** -0.5,
                       attn_logit_softcap=_get(raw, "attn_logit_softcapping", source, None, float),
                       final_logit_softcap=_get(raw, "final_logit_softcapping", source, None, float))


def _gemma3(raw, source):  # Gemma 3 text: q/k norms, 5 local : 1 global layers with their own RoPE bases
    common, extra = _gemma_family(raw, source)
    layers = common["num_hidden_layers"]
    pattern = raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 6
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
        raise ConfigError(f"{source}: sliding_window_pattern must be a positive integer, found {pattern!r}.")
    default = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
    types = _layer_types(raw, source, layers, default)
    common["layer_windows"] = tuple(raw.get("sliding_window") if t == "sliding_attention" else None for t in types)
    if isinstance(raw.get("rope_parameters"), dict) and "sliding_attention" in raw["rope_parameters"]:
        local = _rope(raw, source, "sliding_attention")
        glob = _rope(raw, source, "full_attention")
    else:
        local = RopeConfig(theta=float(_get(raw, "rope_local_base_freq", source, 10000.0, float)))
        glob = _rope(raw, source)
    return ModelConfig(**common, **extra, rope=glob, local_rope=local, sandwich_norms=True, qk_norm=True,
                       attention_scale=_get(raw, "query_pre_attn_scalar", source, common["head_dim"], float) ** -0.5,
                       attn_logit_softcap=_get(raw, "attn_logit_softcapping", source, None, float),
                       final_logit_softcap=_get(raw, "final_logit_softcapping", source, None, float))


def _phi3(raw, source):  # Phi-3 Mini 4K: fused qkv/gate_up (split at load), sliding window on every layer
    common = _common(raw, source)
    common["layer_windows"] = (raw.get("sliding_window"),) * common["num_hidden_layers"]
    bias = bool(raw.get("attention_bias", False))
    return ModelConfig(**common, rope=_rope(raw, source), tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                       activation=_activation(raw.get("hidden_act", "silu"), source), qkv_bias=bias, o_bias=bias,
                       fused_qkv=True)


_BUILDERS = {"llama": _llama, "qwen2": _qwen2, "gemma": _gemma, "gemma2": _gemma2, "gemma3_text": _gemma3, "phi3": _phi3}


def config_from_dict(raw, source="config.json"):
    """Build a ModelConfig from the parsed HF config.json (`source` names the file in errors)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object, found {type(raw).__name__}.")
    if raw.get("model_type") == "gemma3" and isinstance(raw.get("text_config"), dict):  # multimodal wrapper
        raw = {"model_type": "gemma3_text", **raw["text_config"]}
    model_type = raw.get("model_type")
    known_architectures = {"LlamaForCausalLM", "Qwen2ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM",
                           "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration", "Phi3ForCausalLM"}
    architectures = raw.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ConfigError(f"{source}: architectures must be a list of names, found {architectures!r}.")
    unknown = [a for a in architectures if a not in known_architectures]
    if unknown:
        raise ConfigError(f"{source}: unsupported architecture {unknown[0]!r}; supported: {', '.join(sorted(known_architectures))}.")
    if not isinstance(model_type, str) or model_type not in _BUILDERS:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}).")
    _check_unsupported(raw, source)
    window_values = [w for w in [raw.get("sliding_window")] if w is not None]
    if any(not isinstance(w, int) or w <= 0 for w in window_values):
        raise ConfigError(f"{source}: sliding_window must be a positive integer, found {raw['sliding_window']!r}.")
    return _BUILDERS[model_type](raw, source)


def load_config(directory):
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{path} is missing: a model directory needs the Hugging Face config.json.")
    if os.path.getsize(path) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {os.path.getsize(path)} bytes is too large for a config.json "
                          f"(limit {MAX_CONFIG_BYTES}).")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, an int of 5,000 digits
        raise ConfigError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]}).") from None
    return config_from_dict(raw, path)


# ---------------------------------------------------------------------------------- TrainConfig
# Every training default lives here once; train.py builds its command line from these fields
# (`--lora-r 16`, `--no-gradient-checkpointing`) and an optional YAML file (`--config run.yaml`).
# Defaults are the QLoRA paper's recipe (Dettmers et al. 2023, arXiv 2305.14314, §4 and Appendix B,
# and its qlora.py): r=64, alpha=16, dropout 0.1, every linear layer of the blocks, lr 2e-4 constant,
# max grad norm 0.3, effective batch 16, NF4 base with double quantization, gradient checkpointing.

def _field(default, help, **meta):
    return dataclasses.field(default=default, metadata={"help": help, **meta})


class Settings:
    """What the command-line dataclasses (TrainConfig, evaluation.EvalConfig) share: checks that name the
    flag, the `choices` of every field, and a JSON-able dict."""

    def need(self, ok, flag, expected):
        if not ok:
            raise ConfigError(f"--{flag.replace('_', '-')}={getattr(self, flag)!r}: expected {expected}.")

    def check_choices(self):
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            self.need(choices is None or getattr(self, f.name) in choices, f.name, f"one of {choices}")

    def check_types(self):
        """Every field has its default's type (a bool is not an int; an int may stand for a float), and every
        float is finite: a NaN learning rate or an infinite timeout fails here, not after the model loads."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), _cli_type(f)
            if value is None and f.default is None:
                continue
            if kind is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                self.need(ok and math.isfinite(value), f.name, "a finite number")
            elif kind is int:
                self.need(isinstance(value, int) and not isinstance(value, bool), f.name, "an integer")
            elif kind is tuple:
                self.need(isinstance(value, tuple) and all(isinstance(v, str) and v for v in value), f.name,
                          "a list of non-empty strings")
            else:
                self.need(isinstance(value, kind), f.name, f"a {kind.__name__}")

    def check_device(self):
        """--device: auto, cpu, cuda or cuda:N, and a CUDA one only where this torch has that GPU."""
        value = self.device
        if value == "auto":
            return
        try:
            device = torch.device(value)
        except (RuntimeError, ValueError):
            device = None
        self.need(device is not None and device.type in ("cpu", "cuda"), "device", "auto, cpu, cuda or cuda:N")
        if device.type == "cuda":
            self.need(torch.cuda.is_available(), "device", f"a device this torch can use: torch {torch.__version__} "
                      f"(CUDA {torch.version.cuda}) sees no CUDA GPU; use --device cpu or auto")
            self.need(device.index is None or device.index < torch.cuda.device_count(), "device",
                      f"one of the {torch.cuda.device_count()} visible GPUs (cuda:0 ...)")

    def check_not_a_directory(self, name, what):
        path = getattr(self, name)
        self.need(not os.path.isdir(path), name, f"a {what} file, not a directory")

    def to_dict(self):
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)}


@dataclasses.dataclass
class TrainConfig(Settings):
    model: str = _field("llama3-3b", "short name (see minilora/hub.py), hub id, or local directory of the base model")
    data: str = _field("sahil2801/CodeAlpaca-20k", "CodeAlpaca JSON/JSONL file, or a hub dataset id")
    out: str = _field("runs/qlora", "output directory: adapter/, checkpoints/, metrics.jsonl, loss.png, train_config.json")
    quantize: str = _field("nf4", "base weights: 'nf4' (QLoRA) or 'none' (float base, plain LoRA)", choices=("nf4", "none"))
    backend: str = _field("auto", "kernels: 4-bit matmul, and on GPU the fused training ops ('torch' = the plain "
                                  "PyTorch reference path everywhere; auto = triton on GPU)",
                          choices=("auto", "torch", "triton", "bnb"))
    device: str = _field("auto", "'auto' (cuda if present, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: str = _field("auto", "compute dtype: 'auto' = bfloat16 autocast on GPU, float32 on CPU",
                        choices=("auto", "bfloat16", "float32"))
    # LoRA (QLoRA paper: r=64, alpha=16, dropout 0.1 for models up to 13B, all linear layers)
    lora_r: int = _field(64, "LoRA rank r")
    lora_alpha: float = _field(16.0, "LoRA alpha; scaling = alpha / r (alpha / sqrt(r) with --use-rslora)")
    lora_dropout: float = _field(0.1, "dropout on the LoRA input")
    lora_targets: tuple = _field(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                                 "linear layers that get an adapter (HF names)")
    use_rslora: bool = _field(False, "rank-stabilised scaling alpha / sqrt(r)")
    # optimisation (QLoRA: constant lr 2e-4, max grad norm 0.3, batch 16, no weight decay, Adam beta2 0.999)
    optimizer: str = _field("adamw", "adamw (torch), or bitsandbytes adamw8bit / paged_adamw8bit / paged_adamw32bit "
                            "(the paper's qlora.py used paged_adamw32bit)",
                            choices=("adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw32bit"))
    learning_rate: float = _field(2e-4, "peak learning rate")
    lr_schedule: str = _field("constant", "after warmup", choices=("constant", "cosine", "linear"))
    warmup_steps: int = _field(0, "linear warmup from 0 over this many optimizer steps")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    adam_beta1: float = _field(0.9, "AdamW beta1")
    adam_beta2: float = _field(0.999, "AdamW beta2")
    adam_eps: float = _field(1e-8, "AdamW epsilon")
    max_grad_norm: float = _field(0.3, "clip the global gradient norm to this (0 = no clipping)")
    micro_batch_size: int = _field(4, "rows per forward/backward")
    grad_accum_steps: int = _field(4, "micro-batches per optimizer step (effective batch = micro_batch_size * this)")
    epochs: int = _field(1, "passes over the training split (ignored when --max-steps is set)")
    max_steps: Optional[int] = _field(None, "stop after this many optimizer steps")
    gradient_checkpointing: bool = _field(True, "recompute each block in the backward pass to save memory")
    uncheckpointed_blocks: int = _field(0, "with gradient checkpointing, the last N blocks keep their activations "
                                           "instead of recomputing them: faster, one block's activations each")
    offload_activations: bool = _field(False, "keep the activations saved for the backward pass in (pinned) CPU "
                                              "memory: longer sequences for PCIe traffic; turns CUDA graphs off")
    cuda_graphs: bool = _field(True, "on a GPU, capture each micro-batch's forward+backward as a CUDA graph "
                                     "(one per batch shape) and replay it: removes the CPU launch overhead")
    fsdp: bool = _field(False, "under torchrun, shard the frozen base over the ranks with FSDP2 (fully_shard): "
                               "for bases too big for one GPU; the LoRA weights stay replicated")
    seed: int = _field(0, "seed for LoRA init, dropout and the batch order")
    # data
    max_seq_len: int = _field(512, "longest example in tokens (longer ones are truncated or dropped)")
    overlong: str = _field("truncate", "what to do with over-long rows", choices=("truncate", "drop"))
    pack: bool = _field(False, "pack several examples per row (no attention across them)")
    test_fraction: float = _field(0.05, "held-out fraction of the records (never trained on; eval loss uses it)")
    split_seed: int = _field(0, "seed of the train/test split")
    skip_bad_rows: bool = _field(False, "drop malformed dataset rows instead of failing")
    # evaluation, logging, checkpoints
    eval_every: int = _field(100, "eval loss every this many steps (0 = only at the end)")
    eval_examples: int = _field(200, "held-out examples used for the eval loss")
    save_every: int = _field(100, "write a resumable checkpoint every this many steps (0 = only at the end)")
    keep_last: int = _field(2, "complete checkpoints kept on disk")
    resume: bool = _field(False, "continue from the latest complete checkpoint in OUT/checkpoints")
    resume_allow_data_change: bool = _field(False, "resume even if the tokenized training data changed")
    overwrite: bool = _field(False, "start a new run in an --out that holds an earlier one, replacing its "
                             "checkpoints, adapter and logs (without it, a non-empty --out is refused)")
    max_nonfinite_steps: int = _field(3, "stop with NonFiniteError after this many non-finite steps in a row")
    progress: bool = _field(True, "show a tqdm progress bar")

    def validate(self):
        """ConfigError naming the flag for values that cannot work; returns self. Every field is checked."""
        need = self.need
        self.check_types()
        need(self.model.strip() != "", "model", "a model name or directory")
        need(self.data.strip() != "", "data", "a dataset file or hub dataset id")
        self.check_not_a_directory("data", "JSON/JSONL dataset")
        need(self.out.strip() != "", "out", "an output directory")
        self.check_device()
        need(0 <= self.adam_beta1 < 1, "adam_beta1", "0 <= beta1 < 1")
        need(0 <= self.adam_beta2 < 1, "adam_beta2", "0 <= beta2 < 1")
        need(self.adam_eps > 0, "adam_eps", "a positive number")
        need(self.weight_decay >= 0, "weight_decay", "a number >= 0")
        need(not (self.resume and self.overwrite), "overwrite", "not together with --resume (one continues the "
             "run in --out, the other replaces it)")
        for name in ("lora_r", "micro_batch_size", "grad_accum_steps", "epochs", "keep_last", "max_nonfinite_steps"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1")
        for name in ("warmup_steps", "eval_every", "save_every", "eval_examples", "uncheckpointed_blocks"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "an integer >= 0")
        need(self.max_steps is None or (isinstance(self.max_steps, int) and self.max_steps >= 1), "max_steps", "an integer >= 1")
        need(self.max_seq_len >= 2, "max_seq_len", "at least 2 tokens")
        need(self.lora_alpha > 0, "lora_alpha", "a positive number")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "0 <= dropout < 1")
        need(self.learning_rate > 0 and math.isfinite(self.learning_rate), "learning_rate", "a positive number")
        need(self.max_grad_norm >= 0, "max_grad_norm", "a number >= 0")
        need(0 <= self.test_fraction < 1, "test_fraction", "0 <= fraction < 1")
        need(len(self.lora_targets) > 0, "lora_targets", "at least one layer name")
        self.check_choices()
        return self


def _cli_type(field):
    """The argparse type of a dataclass field, from its default (or Optional[int])."""
    if field.type in (Optional[int], "Optional[int]"):
        return int
    return type(field.default)


def build_parser(cls=TrainConfig, description=None):
    """An argparse parser with one `--flag` per field of `cls`; defaults are SUPPRESSed so that
    `parse_config` can tell a flag typed on the command line from the dataclass default."""
    import argparse

    # allow_abbrev=False: `--lr nan` must be an unknown flag, not an abbreviation of --lr-schedule
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML file of field: value pairs; flags typed here override it")
    for f in dataclasses.fields(cls):
        flag, kind = "--" + f.name.replace("_", "-"), _cli_type(f)
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        elif kind is tuple:
            parser.add_argument(flag, dest=f.name, nargs="+", help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, choices=f.metadata.get("choices"), help=help_text)
    return parser


def parse_config(argv=None, cls=TrainConfig, description=None):
    """defaults <- YAML file (--config) <- flags typed on the command line; validated."""
    args = vars(build_parser(cls, description).parse_args(argv))
    values = {}
    path = args.pop("config", None)
    if path is not None:
        values.update(load_yaml_config(path, cls))
    values.update(args)
    return config_from_values(values, cls, source=path or "command line")


def load_yaml_config(path, cls=TrainConfig):
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot be read ({e.strerror}).") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e}).") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of field: value, found {type(raw).__name__}.")
    return {k.replace("-", "_"): v for k, v in raw.items()}


def config_from_values(values, cls=TrainConfig, source="config"):
    """A validated `cls` from a dict of field values (YAML/JSON types checked against the defaults)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {unknown}; known: {sorted(fields)}.")
    clean = {}
    for name, value in values.items():
        kind = _cli_type(fields[name])
        if value is None and fields[name].default is None:
            clean[name] = None
        elif kind is tuple and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            clean[name] = tuple(value)
        elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            clean[name] = float(value)
        elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            clean[name] = value
        else:
            raise ConfigError(f"{source}: {name}={value!r} has type {type(value).__name__}, expected {kind.__name__}.")
    return cls(**clean).validate()
