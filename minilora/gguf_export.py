"""GGUF export: a merged checkpoint (export.MergedCheckpoint) as one `.gguf` file for llama.cpp.

Written with llama.cpp's own `gguf` package (`gguf.GGUFWriter`, `gguf.quants`, `gguf.get_tensor_name_map`),
never by hand. What each family needs matches llama.cpp's `convert_hf_to_gguf.py` (conversion/llama.py,
qwen.py, gemma.py, phi.py) and the loaders in its src/llama-model.cpp:
- Llama / SmolLM2: q/k rows permuted to llama.cpp's interleaved RoPE layout; llama3 RoPE scaling as a
  `rope_freqs` tensor of per-frequency factors; linear scaling as metadata.
- Qwen2.5: as is (q/k/v biases kept). Phi-3: fused `qkv_proj` -> attn_qkv and `gate_up_proj` -> ffn_up
  (gate rows first), as the checkpoint stores them; adapters on q/k/v or gate/up were merged into those rows.
- Gemma, Gemma 2, Gemma 3: norm weights stored as (1 + w), the scale llama.cpp applies; Gemma 2 soft-caps and
  sliding window as metadata; Gemma 3's sliding layers must follow llama.cpp's fixed pattern (every sixth
  layer global) and local RoPE base 10000, and queries must be scaled by head_dim**-0.5 as llama.cpp does.
Norms, biases and other 1-D tensors stay float32 (llama.cpp's rule); 2-D weights take --gguf-type, falling back
to f16 where a row is not a whole number of 32-value blocks; with q4_0/q5_0 the embedding and output head are
q8_0 (the most sensitive tensors, as llama.cpp's own quantizer keeps them at higher precision).
The tokenizer is written from tokenizer.json: byte-level BPE as llama.cpp's "gpt2" model (vocabulary, merges,
pre-tokenizer name recognised from the split regex), SentencePiece-style BPE with byte fallback (Gemma) as
its "llama" model (pieces, scores = -merge rank, byte tokens); the chat template goes in as is.
"""
import dataclasses
import json
import math
import os
import re

import numpy as np
import torch

from .chat_template import read_chat_template
from .errors import CheckpointError, ConfigError
from .tokenizer import load_tokenizer

try:
    import gguf
except ImportError:  # optional: only --format gguf / ollama needs it
    gguf = None

# Split regexes of the byte-level tokenizers we recognise -> llama.cpp's pre-tokenizer name.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


@dataclasses.dataclass
class Family:
    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # llama.cpp's LLAMA arch rotates interleaved pairs: HF's halves are permuted
    norm_plus_one: bool = False  # Gemma: llama.cpp multiplies by the stored weight, HF by (1 + w)
    tied_only: bool = False  # Gemma 1/2: llama.cpp has no output tensor for them


FAMILIES = {"llama": Family("LLAMA", permute_qk=True), "qwen2": Family("QWEN2"),
            "gemma": Family("GEMMA", norm_plus_one=True, tied_only=True),
            "gemma2": Family("GEMMA2", norm_plus_one=True, tied_only=True),
            "gemma3_text": Family("GEMMA3", norm_plus_one=True), "phi3": Family("PHI3")}

FILE_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0",
              "q5_0": "MOSTLY_Q5_0"}


@dataclasses.dataclass
class TensorPlan:
    source: str  # HF name, or "" for a tensor made here (rope_freqs)
    name: str  # GGUF name
    shape: tuple  # numpy (row-major) shape
    qtype: object  # gguf.GGMLQuantizationType


@dataclasses.dataclass
class GGUFPlan:
    arch: str
    gguf_name: str  # file name
    family: Family
    tensors: list
    extra: dict  # GGUF name -> float32 numpy array made here
    metadata: list  # [(GGUFWriter method name, args)]
    special_tokens: dict  # bos/eos/stop token strings, for the Modelfile


def _require_gguf():
    if gguf is None:
        raise CheckpointError("GGUF export needs llama.cpp's `gguf` package: pip install gguf "
                              "(or pip install -e \".[export]\").")


def permute_qk(weight, heads):
    """HF's rotate-half RoPE layout -> llama.cpp's interleaved one, per head (conversion/llama.py permute)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def llama3_rope_factors(rope, head_dim):
    """Per-frequency divisors of Llama 3.x RoPE scaling (the `rope_freqs` tensor llama.cpp multiplies by)."""
    freqs = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    low, high = rope.original_max_position_embeddings / rope.low_freq_factor, rope.original_max_position_embeddings / rope.high_freq_factor
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    factors = np.where(wavelen < high, 1.0, np.where(wavelen > low, rope.factor, 1 / ((1 - smooth) / rope.factor + smooth)))
    return factors.astype(np.float32)


# ------------------------------------------------------------------------------- architecture

def _check_family(config, raw, family, source):
    """ConfigError for what llama.cpp's loader for this family cannot express (never a file that runs wrong)."""
    def refuse(what):
        raise ConfigError(f"{source}: {what}; llama.cpp's {family.arch.lower()} architecture cannot represent it, "
                          "so no GGUF is written.")
    if family.tied_only and not config.tie_word_embeddings:
        refuse("tie_word_embeddings=false (an untied output head)")
    if config.model_type in ("gemma2", "gemma3_text") and not math.isclose(config.scale, config.head_dim ** -0.5):
        refuse(f"query_pre_attn_scalar={raw.get('query_pre_attn_scalar')} differs from head_dim={config.head_dim} "
               "(llama.cpp scales queries by head_dim**-0.5)")
    if config.model_type == "gemma3_text":
        windows = config.layer_windows
        expected = [None if (i + 1) % 6 == 0 else windows[0] for i in range(len(windows))]
        if list(windows) != expected:
            refuse("a sliding-window layer pattern other than five local layers then one global")
        if config.local_rope is not None and (config.local_rope.theta != 10000.0 or config.local_rope.kind != "default"):
            refuse(f"local RoPE base {config.local_rope.theta} (llama.cpp uses 10000 on sliding layers)")
    if config.model_type in ("llama", "qwen2", "phi3") and config.activation != "silu":
        refuse(f"hidden_act giving {config.activation!r} (llama.cpp uses SiLU for this family)")
    if config.model_type == "gemma2" and len({w for w in config.layer_windows if w}) > 1:
        refuse("more than one sliding window size")


def _metadata(config, raw, family, gguf_type, name):
    """[(GGUFWriter method, args)] describing the architecture, as convert_hf_to_gguf.py writes it."""
    m = [("add_name", name), ("add_block_count", config.num_hidden_layers),
         ("add_context_length", config.max_position_embeddings), ("add_embedding_length", config.hidden_size),
         ("add_feed_forward_length", config.intermediate_size), ("add_head_count", config.num_attention_heads),
         ("add_head_count_kv", config.num_key_value_heads), ("add_layer_norm_rms_eps", config.rms_norm_eps),
         ("add_rope_freq_base", config.rope.theta), ("add_key_length", config.head_dim),
         ("add_value_length", config.head_dim), ("add_file_type", getattr(gguf.LlamaFileType, FILE_TYPES[gguf_type])),
         ("add_quantization_version", gguf.GGML_QUANT_VERSION)]
    if config.model_type in ("llama", "phi3"):
        m.append(("add_rope_dimension_count", config.head_dim))
    if config.model_type == "llama":
        m.append(("add_vocab_size", config.vocab_size))
    if config.rope.kind == "linear":
        m += [("add_rope_scaling_type", gguf.RopeScalingType.LINEAR), ("add_rope_scaling_factor", config.rope.factor)]
    if config.model_type == "gemma2":
        m += [("add_attn_logit_softcapping", config.attn_logit_softcap or 0.0),
              ("add_final_logit_softcapping", config.final_logit_softcap or 0.0),
              ("add_sliding_window", next((w for w in config.layer_windows if w), config.max_position_embeddings))]
    if config.model_type == "gemma3_text":
        if config.final_logit_softcap:
            m.append(("add_final_logit_softcapping", config.final_logit_softcap))
        m.append(("add_sliding_window", next((w for w in config.layer_windows if w), config.max_position_embeddings)))
    if config.model_type == "phi3":
        original = (raw.get("rope_scaling") or {}).get("original_max_position_embeddings") \
            or raw.get("original_max_position_embeddings") or config.max_position_embeddings
        m += [("add_rope_scaling_orig_ctx_len", original), ("add_sliding_window", config.layer_windows[0] or 0)]
    return m


def _tensor_type(name, shape, gguf_type):
    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or name.endswith("_norm.weight"):
        return Q.F32
    kind = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q5_0": Q.Q5_0}[gguf_type]
    if kind in (Q.Q4_0, Q.Q5_0) and name in ("token_embd.weight", "output.weight"):
        kind = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[kind][0]
    return kind if shape[-1] % block == 0 else Q.F16


# ---------------------------------------------------------------------------------- tokenizer

def _merges(model):
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _bytelevel_pre(pre, path):
    """llama.cpp's pre-tokenizer name for a byte-level tokenizer.json pre_tokenizer, or a clear error."""
    steps = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        split = steps[0].get("pattern", {}).get("Regex")
        if split in _SPLITS:
            return _SPLITS[split]
    raise CheckpointError(f"{path}: byte-level pre-tokenizer {json.dumps(pre)[:300]} is not one llama.cpp is known "
                          "to reproduce (recognised: GPT-2 regex, digits + GPT-2 (SmolLM), Llama 3 and Qwen2 splits).")


def _is_sentencepiece_bpe(tok):
    model = tok["model"]
    return model.get("byte_fallback") and not _has(tok.get("pre_tokenizer"), "ByteLevel")


def _has(node, kind):
    if not isinstance(node, dict):
        return False
    return node.get("type") == kind or any(_has(s, kind) for s in node.get("pretokenizers", []) + node.get("normalizers", []))


def tokenizer_metadata(directory, vocab_size):
    """[(GGUFWriter method, args)] for the tokenizer in `directory`, and its special token strings."""
    path = os.path.join(directory, "tokenizer.json")
    ours = load_tokenizer(directory)  # the ids minilora uses: the GGUF must say the same
    with open(path, encoding="utf-8") as f:
        tok = json.load(f)
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise CheckpointError(f"{path}: tokenizer model {model.get('type')!r}; GGUF export supports BPE tokenizers.")
    vocab = model["vocab"]
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    size = max(vocab_size, max(list(vocab.values()) + list(added), default=-1) + 1)
    if size > vocab_size:
        raise CheckpointError(f"{path}: token ids reach {size - 1} but config.json vocab_size is {vocab_size}.")
    T = gguf.TokenType
    tokens, types = [f"[PAD{i}]" for i in range(size)], [T.UNUSED] * size
    for text, i in vocab.items():
        tokens[i], types[i] = text, T.NORMAL
    spm = _is_sentencepiece_bpe(tok)
    unk = model.get("unk_token")
    m = []
    if spm:
        rank = {}
        for r, merge in enumerate(_merges(model)):  # a token's score: minus the rank of the merge making it
            rank.setdefault(merge.replace(" ", ""), r)
        scores = [-1000.0] * size
        for text, i in vocab.items():
            scores[i] = -float(rank[text]) if text in rank else 0.0
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
                types[i] = T.BYTE
        prefix = _has(tok.get("normalizer"), "Prepend") or (
            _has(tok.get("pre_tokenizer"), "Metaspace") and (tok["pre_tokenizer"].get("prepend_scheme") != "never"))
        m += [("add_tokenizer_model", "llama"), ("add_tokenizer_pre", "default"), ("add_add_space_prefix", bool(prefix))]
    else:
        m += [("add_tokenizer_model", "gpt2"), ("add_tokenizer_pre", _bytelevel_pre(tok.get("pre_tokenizer"), path))]
    for i, t in added.items():
        tokens[i] = t["content"]
        types[i] = T.CONTROL if t.get("special") else T.USER_DEFINED
        if spm:
            scores[i] = -1000.0
    if unk is not None and unk in vocab:
        types[vocab[unk]] = T.UNKNOWN
        m.append(("add_unk_token_id", vocab[unk]))
    m += [("add_token_list", tokens), ("add_token_types", types), ("add_token_merges", _merges(model))]
    if spm:
        m.append(("add_token_scores", scores))
    bos_added = ours.bos_id is not None and ours.encode("a", add_special_tokens=True)[:1] == [ours.bos_id] \
        and ours.encode("a")[:1] != [ours.bos_id]
    m += [("add_eos_token_id", ours.eos_id), ("add_pad_token_id", ours.pad_id), ("add_add_bos_token", bos_added),
          ("add_add_eos_token", False)]
    if ours.bos_id is not None:
        m.append(("add_bos_token_id", ours.bos_id))
    special = {"bos": tokens[ours.bos_id] if ours.bos_id is not None else None, "eos": tokens[ours.eos_id],
               "stop": [tokens[i] for i in ours.stop_ids]}
    return m, special


# ------------------------------------------------------------------------------------- plan, write

def plan_gguf(merged, gguf_type, name):
    """Everything about the file decided and checked before writing: names, shapes, types, metadata."""
    _require_gguf()
    config, raw = merged.config, merged.raw_config
    source = os.path.join(merged.directory, "config.json")
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ConfigError(f"{source}: model_type {config.model_type!r} has no llama.cpp mapping here "
                          f"(supported: {', '.join(FAMILIES)}).")
    _check_family(config, raw, family, source)
    arch = getattr(gguf.MODEL_ARCH, family.arch)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    tensors, extra, unmapped = [], {}, []
    if config.rope.kind == "llama3":
        extra["rope_freqs.weight"] = llama3_rope_factors(config.rope, config.head_dim)
        tensors.append(TensorPlan("", "rope_freqs.weight", extra["rope_freqs.weight"].shape, gguf.GGMLQuantizationType.F32))
    for hf_name, shape, _ in merged.entries:
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = name_map.get_name(base)
        block = re.sub(r"^blk\.\d+\.", "blk.{bid}.", gguf_base or "")
        if gguf_base is None or block not in allowed:
            unmapped.append(hf_name)
            continue
        full = f"{gguf_base}.{suffix}"
        tensors.append(TensorPlan(hf_name, full, tuple(shape), _tensor_type(full, shape, gguf_type)))
    if unmapped:
        raise ConfigError(f"{source}: tensors with no llama.cpp {family.arch.lower()} name: {', '.join(unmapped[:6])}.")
    meta = _metadata(config, raw, family, gguf_type, name)
    tok_meta, special = tokenizer_metadata(merged.directory, config.vocab_size)
    template = read_chat_template(merged.directory)
    if template:
        tok_meta.append(("add_chat_template", template))
    file_name = f"{name}-{gguf_type}.gguf"
    return GGUFPlan(gguf.MODEL_ARCH_NAMES[arch], file_name, family, tensors, extra, meta + tok_meta, special)


def _to_gguf_data(tensor, plan_tensor, family, config):
    """The torch tensor as the numpy bytes/values llama.cpp reads for this tensor."""
    name = plan_tensor.name
    data = tensor.float()
    if family.norm_plus_one and name.endswith("norm.weight"):
        data = data + 1
    if family.permute_qk and re.search(r"\.attn_[qk]\.", name):
        heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
        data = permute_qk(data, heads)
    array = data.contiguous().numpy()
    Q = gguf.GGMLQuantizationType
    if plan_tensor.qtype == Q.F32:
        return array
    if plan_tensor.qtype == Q.F16:
        half = array.astype(np.float16)
        if not np.isfinite(half).all():
            raise CheckpointError(f"tensor {plan_tensor.source!r} has values beyond float16's range (max "
                                  f"{np.abs(array).max():.4g}); export with --gguf-type bf16 or q8_0.")
        return half
    return gguf.quants.quantize(array, plan_tensor.qtype)


def write_gguf(merged, plan, path):
    """Stream the merged tensors into `path` (header and tensor table first, then one tensor at a time)."""
    writer = gguf.GGUFWriter(path, plan.arch)
    try:
        for method, value in plan.metadata:
            getattr(writer, method)(value)
        for t in plan.tensors:
            kind = t.qtype
            if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dtype = np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16
                writer.add_tensor_info(t.name, t.shape, np.dtype(dtype), math.prod(t.shape) * np.dtype(dtype).itemsize)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(t.shape, kind)
                writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        by_source = {t.source: t for t in plan.tensors}
        for t in plan.tensors:
            if not t.source:
                writer.write_tensor_data(plan.extra[t.name])
        for hf_name, tensor in merged.tensors():
            writer.write_tensor_data(_to_gguf_data(tensor, by_source[hf_name], plan.family, merged.config))
    finally:
        writer.close()
