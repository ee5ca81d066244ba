"""Loading Hugging Face safetensors checkpoints into `Transformer`, strictly and tensor by tensor.

- `model.safetensors`, or shards listed in `model.safetensors.index.json`.
- Strict: every checkpoint tensor maps to a parameter, every parameter is filled once, shapes match (a
  mismatch names the config.json fields behind it), dtypes are floating point (float64 is cast, with a
  warning) and values finite; all problems are gathered into one `WeightsError` naming file and key.
- Pickle formats (`*.bin`, `*.pt`, `*.pth`) are refused: loading them can run arbitrary code.
- Streaming: the model is built on the meta device and each tensor is read (plain reads, no mmap that
  would keep the file's pages resident), cast and moved on its own, so host memory peaks near one copy
  of the model in the target dtype plus one tensor. With quantize="nf4" each block linear is quantized
  as it arrives, so the float copy of a 3B model never exists.
- Pre-quantized bitsandbytes 4-bit checkpoints (HF layout) load directly; `save_quantized` writes one
  that transformers + bitsandbytes load.
- Phi-3's fused `qkv_proj` / `gate_up_proj` are split here (rows q;k;v and gate;up).
"""
import json
import logging
import math
import os

import torch
from torch import nn

from .config import ModelConfig
from .errors import WeightsError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64: cast, with a log line


def find_weight_files(directory):
    """(safetensors files of a checkpoint directory, checked to exist, in index order; the index's weight_map or None)."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, RecursionError, KeyError, TypeError) as e:  # ValueError: bad JSON, bad UTF-8, huge ints
            raise WeightsError(f"{index_path}: malformed shard index ({e!r}); expected "
                                  '{"weight_map": {"tensor name": "shard file", ...}}.') from None
        files = []
        for shard in weight_map.values():
            if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
                raise WeightsError(f"{index_path}: shard path {shard!r} escapes the checkpoint directory "
                                   "(shard entries must be plain file names).")
            if shard not in files:
                files.append(shard)
        missing = [s for s in files if not os.path.isfile(os.path.join(directory, s))]
        if missing:
            raise WeightsError(f"{index_path} lists shard(s) that are missing from {directory}: "
                                  f"{', '.join(missing)}. Download the complete checkpoint again.")
        return [os.path.join(directory, s) for s in files], weight_map
    if os.path.isfile(single):
        return [single], None
    pickles = sorted(f for f in os.listdir(directory) if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise WeightsError(
            f"{directory} holds only pickle weights ({', '.join(pickles)}). minilora does not load pickle files "
            "because loading them can run arbitrary code. Convert them once to safetensors, e.g. "
            "`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)`.")
    raise WeightsError(f"{directory} has no model.safetensors or model.safetensors.index.json.")


def checkpoint_key_map(config: ModelConfig, model: nn.Module):
    """HF tensor name -> list of (parameter name, row slice or None). Identity except Phi-3's fused tensors."""
    names = {name: [(name, None)] for name, _ in model.named_parameters()}
    if config.fused_qkv:
        q_rows = config.num_attention_heads * config.head_dim
        kv_rows = config.num_key_value_heads * config.head_dim
        F = config.intermediate_size
        for i in range(config.num_hidden_layers):
            attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            for part in ("weight", "bias"):
                if f"{attn}.q_proj.{part}" in names:
                    names[f"{attn}.qkv_proj.{part}"] = [
                        (f"{attn}.q_proj.{part}", slice(0, q_rows)),
                        (f"{attn}.k_proj.{part}", slice(q_rows, q_rows + kv_rows)),
                        (f"{attn}.v_proj.{part}", slice(q_rows + kv_rows, q_rows + 2 * kv_rows))]
                    for p in "qkv":
                        del names[f"{attn}.{p}_proj.{part}"]
            names[f"{mlp}.gate_up_proj.weight"] = [(f"{mlp}.gate_proj.weight", slice(0, F)),
                                                   (f"{mlp}.up_proj.weight", slice(F, 2 * F))]
            del names[f"{mlp}.gate_proj.weight"], names[f"{mlp}.up_proj.weight"]
    return names


def _config_fields(config, expected, found):
    """' (from config.json: hidden_size=64)': the config fields behind the expected dims that differ."""
    sizes = {"vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
             "intermediate_size": config.intermediate_size, "head_dim": config.head_dim,
             "num_attention_heads * head_dim": config.num_attention_heads * config.head_dim,
             "num_key_value_heads * head_dim": config.num_key_value_heads * config.head_dim}
    wrong = set(expected) if len(expected) != len(found) else {e for e, f in zip(expected, found) if e != f}
    named = [f"{k}={v}" for k, v in sizes.items() if v in wrong]
    return f" (from config.json: {', '.join(named)})" if named else ""


def set_parameter(model, name, value: torch.Tensor):
    """Replace the (meta) parameter `name` by `value`, frozen-or-not as before."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, attr)
    setattr(module, attr, nn.Parameter(value, requires_grad=old.requires_grad))


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
MAX_HEADER_BYTES = 100 * 2**20  # the format's own limit


class SafetensorsFile:
    """A safetensors file read tensor by tensor with plain reads; the header is validated up front.

    Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
    then the data; offsets are relative to the end of the header.
    """

    def __init__(self, path):
        self.path, self.name = path, os.path.basename(path)
        size = os.path.getsize(path)
        self._file = open(path, "rb")
        try:
            self._read_header(size)
        except BaseException:
            self._file.close()
            raise

    def _fail(self, what):
        raise WeightsError(f"{self.path}: {what}. The file is truncated or corrupt: download it again.")

    def _read_header(self, size):
        head = self._file.read(8)
        if len(head) < 8:
            self._fail(f"only {size} bytes, too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            self._fail(f"header length {n} exceeds the file size {size}")
        try:
            header = json.loads(self._file.read(n))
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, an int of 5,000 digits, deep nesting
            self._fail(f"header is not valid JSON ({type(e).__name__}: {str(e)[:200]})")
        if not isinstance(header, dict):
            self._fail("header is not a JSON object")
        header.pop("__metadata__", None)
        self._data_start, self._entries, data_end = 8 + n, {}, 8 + n
        for key, entry in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                shape, offsets = list(entry["shape"]), list(entry["data_offsets"])
                if len(offsets) != 2 or not all(type(v) is int for v in shape + offsets):  # not 1.5, "3", true
                    raise TypeError("shape and data_offsets must be lists of integers")
                begin, end = offsets
            except (KeyError, TypeError):
                self._fail(f"tensor {key!r} has a malformed header entry {repr(entry)[:200]}")
            nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            # an empty tensor may not claim huge dims either: torch.empty([0, 2**64]) overflows
            if min(shape, default=0) < 0 or math.prod(max(d, 1) for d in shape) > size or begin < 0 or end - begin != nbytes:
                self._fail(f"tensor {key!r}: offsets {begin}..{end} do not fit shape {shape} of {entry['dtype']}")
            if self._data_start + end > size:
                self._fail(f"tensor {key!r} ends at byte {self._data_start + end} but the file has {size} bytes")
            self._entries[key] = (dtype, shape, begin)
            data_end = max(data_end, self._data_start + end)
        if data_end != size:  # as safetensors itself: the tensors must cover the data region exactly
            self._fail(f"the tensors end at byte {data_end} but the file has {size} bytes")

    def keys(self):
        return list(self._entries)

    def get_tensor(self, key):
        dtype, shape, begin = self._entries[key]
        tensor = torch.empty(shape, dtype=dtype)
        if tensor.numel():
            self._file.seek(self._data_start + begin)
            self._file.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
        return tensor

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


QUANT_STATE_SUFFIX = ".weight.quant_state.bitsandbytes__nf4"  # marks a bitsandbytes 4-bit linear


def _quantized_prefix(key, quantized):
    """The module name of a pre-quantized linear that `key` belongs to, or None."""
    prefix = key[: -len(".weight")] if key.endswith(".weight") else key.split(".weight.", 1)[0]
    return prefix if prefix in quantized and key != prefix + ".bias" else None


def load_weights(model: nn.Module, directory, dtype, device, quantize=None, backend="auto", quantize_device=None):
    """Fill the meta-device `model` from the checkpoint in `directory`; returns the model.

    quantize="nf4": each block linear is quantized to a `Linear4bit` as its weight arrives (on `device`),
    so the float copy of the whole model never exists. Pre-quantized bitsandbytes 4-bit linears (HF layout:
    `weight` uint8 + `weight.absmax`, `weight.quant_map`, `weight.nested_*`, `weight.quant_state.*`) load as
    `Linear4bit` with quantize="nf4" and are dequantized to `dtype` otherwise.
    quantize_device: where the quantization runs when it is not `device` (e.g. on the GPU for a model kept in
    host memory until FSDP2 shards it); each quantized layer is moved to `device` as soon as it is made.
    """
    config = model.config
    key_map = checkpoint_key_map(config, model)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    filled, problems, cast = set(), [], []
    files, weight_map = find_weight_files(directory)
    handles = [SafetensorsFile(path) for path in files]
    try:
        all_keys = [key for h in handles for key in h.keys()]
        quantized = {k[: -len(QUANT_STATE_SUFFIX)] for k in all_keys if k.endswith(QUANT_STATE_SUFFIX)}
        parts_left = {}  # pre-quantized linear -> how many of its tensors are still to come
        for key in all_keys:
            prefix = _quantized_prefix(key, quantized)
            if prefix is not None:
                parts_left[prefix] = parts_left.get(prefix, 0) + 1
        pending = {}
        for handle in handles:
            fname = handle.name
            for key in handle.keys():
                if weight_map is not None and weight_map.get(key) != fname:
                    problems.append(f"{fname}: tensor {key!r} is not listed for this shard in model.safetensors.index.json "
                                    f"(index says {weight_map.get(key)!r})")
                    continue
                if key == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # a tied model that also stores its head (vllm#6758): the embedding is used
                prefix = _quantized_prefix(key, quantized)
                if prefix is not None:
                    pending.setdefault(prefix, {})[key] = handle.get_tensor(key)
                    parts_left[prefix] -= 1
                    if parts_left[prefix] == 0:
                        _place_prequantized(model, prefix, pending.pop(prefix), expected, filled, problems, fname,
                                            dtype, device, quantize, backend)
                    continue
                if key not in key_map:
                    problems.append(f"{fname}: unexpected tensor {key!r} (no such parameter in a {config.model_type} model)")
                    continue
                tensor = handle.get_tensor(key)
                if tensor.dtype not in FLOAT_DTYPES:
                    problems.append(f"{fname}: tensor {key!r} has dtype {tensor.dtype}, expected a floating dtype "
                                    "(float32, bfloat16, float16 or float64)")
                    continue
                if tensor.dtype == torch.float64:
                    cast.append(key)
                    tensor = tensor.float()  # before the finiteness check: 1e300 becomes inf here, not later
                if not torch.isfinite(tensor).all():
                    bad = (~torch.isfinite(tensor)).sum().item()
                    problems.append(f"{fname}: tensor {key!r} has {bad} non-finite values (NaN/inf)")
                    continue
                for name, rows in key_map[key]:
                    part = tensor if rows is None else tensor[rows]
                    if rows is not None and part.shape[0] != rows.stop - rows.start:
                        problems.append(f"{fname}: fused tensor {key!r} has {tensor.shape[0]} rows, expected at least {rows.stop}")
                        continue
                    if tuple(part.shape) != expected[name]:
                        problems.append(f"{fname}: tensor {key!r} has shape {list(part.shape)}, expected "
                                        f"{list(expected[name])}{_config_fields(config, expected[name], part.shape)}")
                        continue
                    if name in filled:
                        problems.append(f"{fname}: tensor {key!r} appears more than once")
                        continue
                    filled.add(name)
                    _place(model, name, part, dtype, device, quantize, backend, quantize_device or device)
                del tensor
    finally:
        for handle in handles:
            handle.close()
    missing = sorted(set(expected) - filled)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        problems.append(f"missing tensors (no file in {directory} has them): {shown}")
    if problems:
        raise WeightsError(f"checkpoint {directory} does not match the {config.model_type} model built from its "
                           "config.json:\n  - " + "\n  - ".join(problems))
    if cast:
        log.warning("%s: %d float64 tensors (%s%s) cast to %s", directory, len(cast), ", ".join(cast[:3]),
                    " ..." if len(cast) > 3 else "", str(dtype).removeprefix("torch."))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope(device)
    return model


def _replace_module(model, module_name, module):
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def _place_prequantized(model, prefix, tensors, expected, filled, problems, fname, dtype, device, quantize, backend):
    from .nf4 import from_hf_state

    name = prefix + ".weight"
    if name not in expected or not _is_block_linear(name):
        problems.append(f"{fname}: 4-bit tensor {name!r} is not a block linear of this model")
        return
    try:
        module = from_hf_state(tensors, prefix, dtype, device, backend)
    except WeightsError as e:
        problems.append(f"{fname}: {e}")
        return
    if (module.out_features, module.in_features) != expected[name]:
        problems.append(f"{fname}: 4-bit tensor {name!r} has shape {[module.out_features, module.in_features]}, "
                        f"expected {list(expected[name])}")
        return
    filled.add(name)
    old = model.get_submodule(prefix)
    if quantize == "nf4":
        module.bias = old.bias  # the float bias is a tensor of its own in the checkpoint
        _replace_module(model, prefix, module)
    else:
        set_parameter(model, name, module.dequantize().to(dtype))


def _is_block_linear(name):
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


def _place(model, name, tensor, dtype, device, quantize, backend, quantize_device):
    if quantize == "nf4" and _is_block_linear(name):
        from .nf4 import Linear4bit

        module_name = name[: -len(".weight")]
        old = model.get_submodule(module_name)
        module = Linear4bit.from_weight(tensor.to(device=quantize_device, dtype=dtype), old.bias, backend=backend)
        _replace_module(model, module_name, module.to(device) if quantize_device != device else module)
        return
    set_parameter(model, name, tensor.to(device=device, dtype=dtype).contiguous())


def save_quantized(model, directory, compute_dtype="bfloat16"):
    """Write `model` (loaded with quantize="nf4") as a transformers + bitsandbytes 4-bit checkpoint.

    Layout as `save_pretrained` of a `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`
    model: the float tensors under their own names, each 4-bit linear as `to_hf_state` writes it, and
    config.json with its `quantization_config`. Tokenizer files are copied from the source directory.
    """
    import shutil

    from safetensors.torch import save_file

    from .nf4 import Linear4bit, to_hf_state

    source = getattr(model, "source_dir", None)
    if source is None:
        raise ValueError("save_quantized needs a model from load_model (it copies config.json from its source).")
    if os.path.abspath(directory) == os.path.abspath(source):
        raise ValueError(f"save_quantized: output {directory} is the source checkpoint; choose another directory.")
    tensors, nested = {}, False
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            tensors.update({k: v.detach().cpu().contiguous() for k, v in to_hf_state(module, name).items()})
            nested = nested or module.state.nested
    for name, param in model.named_parameters():
        if name not in tensors and not (name == "lm_head.weight" and model.config.tie_word_embeddings):
            tensors[name] = param.detach().cpu().contiguous()
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(source, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    raw["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": nested, "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_storage": "uint8"}
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=2)
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                  "chat_template.jinja"):
        if os.path.isfile(os.path.join(source, extra)):
            shutil.copyfile(os.path.join(source, extra), os.path.join(directory, extra))
