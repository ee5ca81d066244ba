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

from .errors import ConfigError

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


def _get(raw, key, source, default=dataclasses.MISSING, kind=None):
    if key not in raw or raw[key] is None:
        if default is dataclasses.MISSING:
            raise ConfigError(f"{source}: required key {key!r} is missing.")
        return default
    value = raw[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ConfigError(f"{source}: {key!r} must be a positive integer, found {value!r}.")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0):
        raise ConfigError(f"{source}: {key!r} must be a positive number, found {value!r}.")
    return value


def _parse_rope(params, source, key):
    """A RoPE dict in either v4 (`rope_scaling` + `rope_theta`) or v5 (`rope_parameters`) form."""
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    theta = params.get("rope_theta")
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"{source}: {key} needs a positive 'rope_theta', found {theta!r}.")
    if kind == "default":
        return RopeConfig(theta=float(theta))
    if kind == "linear":
        return RopeConfig(theta=float(theta), kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        try:
            return RopeConfig(theta=float(theta), kind="llama3", factor=float(params["factor"]),
                              low_freq_factor=float(params["low_freq_factor"]),
                              high_freq_factor=float(params["high_freq_factor"]),
                              original_max_position_embeddings=int(params["original_max_position_embeddings"]))
        except KeyError as e:
            raise ConfigError(f"{source}: {key} of type 'llama3' lacks {e.args[0]!r}.") from None
    raise ConfigError(f"{source}: {key} type {kind!r} is not implemented (supported: default, linear, llama3).")


def _rope(raw, source, layer_type=None):
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and layer_type is not None and layer_type in params:
        return _parse_rope(params[layer_type], source, f"rope_parameters[{layer_type!r}]")
    if isinstance(params, dict) and "rope_theta" in params:
        return _parse_rope(params, source, "rope_parameters")
    scaling = dict(raw.get("rope_scaling") or {})
    scaling["rope_theta"] = _get(raw, "rope_theta", source, 10000.0, float)
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
    if name not in table:
        raise ConfigError(f"{source}: hidden_act {name!r} is not implemented (supported: {', '.join(table)}).")
    return table[name]


def _common(raw, source):
    heads = _get(raw, "num_attention_heads", source, kind=int)
    hidden = _get(raw, "hidden_size", source, kind=int)
    head_dim = raw.get("head_dim") or hidden // heads  # Qwen2, Phi-3, SmolLM2 have no head_dim key
    layers = _get(raw, "num_hidden_layers", source, kind=int)
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
    if len(types) != layers or any(t not in ("sliding_attention", "full_attention") for t in types):
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
                       attn_logit_softcap=raw.get("attn_logit_softcapping"),
                       final_logit_softcap=raw.get("final_logit_softcapping"))


def _gemma3(raw, source):  # Gemma 3 text: q/k norms, 5 local : 1 global layers with their own RoPE bases
    common, extra = _gemma_family(raw, source)
    layers = common["num_hidden_layers"]
    pattern = raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 6
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
                       attn_logit_softcap=raw.get("attn_logit_softcapping"),
                       final_logit_softcap=raw.get("final_logit_softcapping"))


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
    if model_type not in _BUILDERS:
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
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e}).") from None
    return config_from_dict(raw, path)
