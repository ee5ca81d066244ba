"""Export a tuned model: base + LoRA adapter merged, as a plain Hugging Face checkpoint or one GGUF file.

    python -m minilora.export --model M --adapter DIR --out OUT --format hf|gguf|ollama [--gguf-type q8_0]

- `hf`: safetensors in the base's dtype (sharded when large), config.json, generation_config.json, the
  tokenizer files and chat template, loadable by `AutoModelForCausalLM.from_pretrained(OUT)`.
- `gguf`: one `.gguf` for llama.cpp / LM Studio, written by `gguf_export.py` with llama.cpp's `gguf` package.
- `ollama`: the GGUF plus a `Modelfile` whose TEMPLATE and stops come from the chat template (`modelfile.py`).

Streaming: the base checkpoint is read one tensor at a time (weights.SafetensorsFile); each tensor gets its
LoRA update B A * scaling added in fp32 and is rounded once to its own dtype, exactly as
`LoRALinear.merge` does, then handed to the writer. Host memory stays near one output shard (hf) or one
tensor (gguf), not the whole model. An NF4 base (a bitsandbytes 4-bit checkpoint) is dequantized first:
the merged model carries the NF4 rounding of the base the adapter was trained against, as every QLoRA
export does. Everything is checked (config, every base tensor name and shape, every adapter tensor)
before the first byte is written, and the output appears under its name only when complete.
"""
import argparse
import json
import logging
import math
import os
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .chat_template import read_chat_template
from .config import MAX_CONFIG_BYTES, load_config
from .errors import CheckpointError, MiniloraError, WeightsError
from .gguf_export import plan_gguf, write_gguf
from .hub import resolve_model_dir
from .lora import ADAPTER_WEIGHTS, FUSED_PARTS, PEFT_PREFIX, check_finite, read_adapter_config
from .model import Transformer
from .modelfile import modelfile_text
from .nf4 import Linear4bit, from_hf_state
from .weights import QUANT_STATE_SUFFIX, SafetensorsFile, _is_block_linear, checkpoint_key_map, find_weight_files

log = logging.getLogger(__name__)

FORMATS = ("hf", "gguf", "ollama")
GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_0", "q5_0")
DEFAULT_SHARD_BYTES = 2**30  # hf output: peak memory is about two shards (the shard and its serialized copy)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json")


def read_json(path, required=True):
    """A JSON object file (bounded in size, as config.py), {} if absent and not required."""
    if not os.path.isfile(path):
        if required:
            raise CheckpointError(f"{path} is missing.")
        return {}
    if os.path.getsize(path) > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: {os.path.getsize(path)} bytes is too large (limit {MAX_CONFIG_BYTES}).")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]}).") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}.")
    return data


class MergedCheckpoint:
    """A base checkpoint + PEFT LoRA adapter, validated up front and read back merged one tensor at a time.

    `entries`: [(HF tensor name, shape, output dtype)] in file order, the tied head left out.
    `tensors()`: yields (name, merged tensor) in that order.
    """

    def __init__(self, model_dir, adapter_dir=None, nf4_base=False):
        self.directory = os.path.abspath(model_dir)
        self.round_to_nf4 = nf4_base  # a float base rounded through NF4, as QLoRA training saw it
        self.config = load_config(self.directory)
        self.raw_config = read_json(os.path.join(self.directory, "config.json"))
        self.files, weight_map = find_weight_files(self.directory)
        self.handles = [SafetensorsFile(path) for path in self.files]
        try:
            self._index(weight_map)
            self._read_adapter(adapter_dir)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ the base checkpoint
    def _index(self, weight_map):
        config = self.config
        with torch.device("meta"):
            model = Transformer(config)
        key_map = checkpoint_key_map(config, model)
        self._expected = {name: list(p.shape) for name, p in model.named_parameters()}
        keys = [(h, k) for h in self.handles for k in h.keys()]
        quantized = {k[: -len(QUANT_STATE_SUFFIX)] for _, k in keys if k.endswith(QUANT_STATE_SUFFIX)}
        self.nf4 = bool(quantized) or self.round_to_nf4
        qconfig = self.raw_config.get("quantization_config") or {}
        compute = qconfig.get("bnb_4bit_compute_dtype") or config.torch_dtype
        self.nf4_dtype = getattr(torch, str(compute).removeprefix("torch."), torch.bfloat16)
        self.entries, self._where, problems, seen = [], {}, [], set()
        for handle, key in keys:
            if weight_map is not None and weight_map.get(key) != handle.name:
                problems.append(f"{handle.name}: tensor {key!r} is not listed for this shard in the index")
                continue
            if key == "lm_head.weight" and config.tie_word_embeddings:
                continue  # a tied model that also stores its head: the embedding is the head
            prefix = next((p for p in quantized if key.startswith(p + ".")), None)
            if prefix is not None and key != prefix + ".bias":  # the parts of a 4-bit linear
                self._where.setdefault(prefix + ".weight", {})[key] = handle
                if key == prefix + QUANT_STATE_SUFFIX:
                    meta = json.loads(bytes(handle.get_tensor(key).tolist()).decode("utf-8"))
                    self._add_entry(prefix + ".weight", list(meta["shape"]), self.nf4_dtype, key_map, seen, problems)
                continue
            dtype, shape, _ = handle._entries[key]
            if not dtype.is_floating_point:
                problems.append(f"{handle.name}: tensor {key!r} has dtype {dtype}, expected a floating dtype")
                continue
            self._where[key] = handle
            self._add_entry(key, shape, torch.float32 if dtype == torch.float64 else dtype, key_map, seen, problems)
        wanted = {name for names in key_map.values() for name, _ in names}
        covered = {name for key in seen for name, _ in key_map[key]}
        if config.tie_word_embeddings:
            wanted.discard("lm_head.weight")
        missing = sorted(wanted - covered)
        if missing:
            problems.append(f"missing tensors: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if problems:
            raise WeightsError(f"checkpoint {self.directory} does not match its config.json:\n  - " + "\n  - ".join(problems))
        self.shapes = {name: shape for name, shape, _ in self.entries}

    def _add_entry(self, key, shape, dtype, key_map, seen, problems):
        if key not in key_map:
            problems.append(f"unexpected tensor {key!r} (no such weight in a {self.config.model_type} model)")
            return
        if key in seen:
            problems.append(f"tensor {key!r} appears more than once")
            return
        parts = key_map[key]  # one parameter, or Phi-3's fused rows of several
        expected = list(self._expected[parts[0][0]])
        if parts[0][1] is not None:
            expected[0] = sum(s.stop - s.start for _, s in parts)
        if list(shape) != expected:
            problems.append(f"tensor {key!r} has shape {list(shape)}, expected {expected} (from config.json)")
            return
        seen.add(key)
        self.entries.append((key, list(shape), dtype))

    # ------------------------------------------------------------------ the adapter
    def _read_adapter(self, adapter_dir):
        """{base tensor name: [(row slice or None, A, B)]} and the scaling, every shape checked."""
        self.deltas, self.scaling, self.adapter_dir = {}, 0.0, adapter_dir
        if adapter_dir is None:
            return
        cfg = read_adapter_config(adapter_dir)
        r = int(cfg["r"])
        self.scaling = float(cfg["lora_alpha"]) / (math.sqrt(r) if cfg.get("use_rslora") else r)
        path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing (pickled adapter_model.bin files are not read; "
                                  "re-save the adapter with safetensors).")
        pairs, problems = {}, []
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in f.keys():
                    module, sep, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
                    if not sep or part not in ("A.weight", "B.weight"):
                        problems.append(f"unexpected tensor {key!r} (expected <module>.lora_A.weight / .lora_B.weight)")
                        continue
                    pairs.setdefault(module, {})[part[0]] = f.get_tensor(key).float()
        except (OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot be read as safetensors ({e}).") from None
        check_finite({f"{m}.lora_{p}": t for m, ab in pairs.items() for p, t in ab.items()}, f"an export of {path}")
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                problems.append(f"{module}: lora_A and lora_B must both be present")
                continue
            target, rows = self._target(module)
            if target is None:
                problems.append(f"{module}: no linear weight of that name in the base checkpoint")
                continue
            out_rows = rows.stop - rows.start if rows is not None else self.shapes[target][0]
            expected_a, expected_b = [r, self.shapes[target][1]], [out_rows, r]
            if list(ab["A"].shape) != expected_a or list(ab["B"].shape) != expected_b:
                problems.append(f"{module}: lora_A {list(ab['A'].shape)} / lora_B {list(ab['B'].shape)}, expected "
                                f"{expected_a} / {expected_b} (r={r}, base weight {self.shapes[target]})")
                continue
            self.deltas.setdefault(target, []).append((rows, ab["A"], ab["B"]))
        if "lm_head.weight" in self.deltas and self.config.tie_word_embeddings:
            problems.append("an adapter on lm_head cannot be merged into a model whose head is tied to its embedding")
        if problems:
            raise CheckpointError(f"adapter {path} does not fit {self.directory}:\n  - " + "\n  - ".join(problems))
        if not self.deltas:
            raise CheckpointError(f"adapter {path} holds no LoRA tensors.")

    def _target(self, module):
        """(base tensor name, row slice or None) that the LoRA on `module` updates."""
        name = f"{module}.weight"
        if name in self.shapes:
            return name, None
        parent, _, leaf = module.rpartition(".")
        for fused, parts in FUSED_PARTS.items():  # Phi-3: an adapter on q/k/v updates rows of the fused qkv_proj
            fused_name = f"{parent}.{fused}.weight"
            if leaf in parts and fused_name in self.shapes:
                sizes = self._part_rows(fused, self.shapes[fused_name][0])
                start = sum(sizes[:parts.index(leaf)])
                return fused_name, slice(start, start + sizes[parts.index(leaf)])
        return None, None

    def _part_rows(self, fused, rows):
        config = self.config
        if fused == "qkv_proj":
            q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
            return [q, kv, kv]
        return [rows // 2, rows // 2]

    # ------------------------------------------------------------------ reading back, merged
    def base_tensor(self, name):
        """The base tensor `name` as floats in its output dtype (NF4 dequantized)."""
        where = self._where[name]
        if isinstance(where, dict):  # a bitsandbytes 4-bit linear: all its parts, then dequantize
            prefix = name[: -len(".weight")]
            parts = {k: h.get_tensor(k) for k, h in where.items() if k != prefix + ".bias"}
            return from_hf_state(parts, prefix, self.nf4_dtype, torch.device("cpu"), "torch").dequantize()
        tensor = where.get_tensor(name)
        tensor = tensor.float() if tensor.dtype == torch.float64 else tensor
        if self.round_to_nf4 and _is_block_linear(name):  # as weights.py quantizes it for training
            tensor = Linear4bit.from_weight(tensor, backend="torch").dequantize()
        return tensor

    def tensors(self):
        for name, _, dtype in self.entries:
            tensor = self.base_tensor(name)
            if name in self.deltas:
                merged = tensor.float()
                for rows, a, b in self.deltas.pop(name):  # add in fp32, round once (LoRALinear.merge)
                    target = merged if rows is None else merged[rows]
                    target += (b @ a) * self.scaling
                tensor = merged.to(dtype)
            if not torch.isfinite(tensor).all():
                raise WeightsError(f"{self.directory}: tensor {name!r} has non-finite values after merging.")
            yield name, tensor

    def close(self):
        for handle in self.handles:
            handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------- writers

def _prepare_out(out, sources):
    """A fresh temp directory beside `out`; refuses to write into an input or over a non-empty directory."""
    out = os.path.abspath(out)
    for source in sources:
        if source and (out == source or out.startswith(source.rstrip(os.sep) + os.sep)):
            raise CheckpointError(f"--out {out} is inside the input directory {source}; choose another directory "
                                  "so the inputs are never overwritten.")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise CheckpointError(f"--out {out} already exists and is not empty; remove it or choose another directory.")
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return out, tmp


def _copy_tokenizer_files(source, dest):
    for fname in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, fname)):
            shutil.copyfile(os.path.join(source, fname), os.path.join(dest, fname))


def _generation_config(merged):
    """The base's generation_config.json, or one made from config.json's special ids."""
    existing = read_json(os.path.join(merged.directory, "generation_config.json"), required=False)
    if existing:
        return existing
    raw = merged.raw_config
    return {k: raw[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if raw.get(k) is not None}


def write_hf(merged, directory, max_shard_bytes=DEFAULT_SHARD_BYTES):
    """Write the merged model as a Hugging Face checkpoint into `directory` (which must exist)."""
    shards, current, size = [], {}, 0
    weight_map, total = {}, 0

    def flush():
        nonlocal current, size
        if current:
            path = os.path.join(directory, f"shard-{len(shards):05d}.safetensors")
            save_file(current, path, metadata={"format": "pt"})
            shards.append((path, list(current)))
            current, size = {}, 0

    for name, tensor in merged.tensors():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name], size, total = tensor.contiguous(), size + nbytes, total + nbytes
    flush()
    if len(shards) == 1:
        os.replace(shards[0][0], os.path.join(directory, "model.safetensors"))
    else:
        for i, (path, names) in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            os.replace(path, os.path.join(directory, fname))
            weight_map.update(dict.fromkeys(names, fname))
        with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = {k: v for k, v in merged.raw_config.items() if k != "quantization_config"}
    dtypes = {str(dtype).removeprefix("torch.") for _, _, dtype in merged.entries if dtype.is_floating_point}
    if merged.nf4 or len(dtypes) == 1:
        dtype = str(merged.nf4_dtype).removeprefix("torch.") if merged.nf4 else dtypes.pop()
        config["torch_dtype"] = config["dtype"] = dtype
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(directory, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(_generation_config(merged), f, indent=2)
    _copy_tokenizer_files(merged.directory, directory)


def export_model(model, adapter, out, format="gguf", gguf_type="f16", max_shard_bytes=DEFAULT_SHARD_BYTES,
                 name=None, nf4_base=False):
    """Merge `adapter` (a PEFT LoRA directory, or None for the base alone) into `model` and write `out`.

    model: a checkpoint directory, hub id or short name. nf4_base: round a float base's block linears through
    NF4 before merging, reproducing the base a QLoRA adapter was trained on (automatic for a checkpoint stored
    in 4 bits). Returns a dict describing what was written
    (`files`, `nf4_base`, `format`, `gguf_type`). See the module docstring for the formats.
    """
    if format not in FORMATS:
        raise CheckpointError(f"--format {format!r}: expected one of {', '.join(FORMATS)}.")
    if gguf_type not in GGUF_TYPES:
        raise CheckpointError(f"--gguf-type {gguf_type!r}: expected one of {', '.join(GGUF_TYPES)}.")
    directory = resolve_model_dir(model)
    with MergedCheckpoint(directory, adapter, nf4_base) as merged:
        plan = None
        if format in ("gguf", "ollama"):  # every check (family, tokenizer, template) before writing
            plan = plan_gguf(merged, gguf_type, name or os.path.basename(merged.directory.rstrip(os.sep)))
            if format == "ollama":
                modelfile = modelfile_text(read_chat_template(merged.directory), plan.gguf_name, plan.special_tokens)
        out, tmp = _prepare_out(out, [merged.directory, adapter and os.path.abspath(adapter)])
        try:
            if plan is None:
                write_hf(merged, tmp, max_shard_bytes)
            else:
                write_gguf(merged, plan, os.path.join(tmp, plan.gguf_name))
                if format == "ollama":
                    with open(os.path.join(tmp, "Modelfile"), "w", encoding="utf-8") as f:
                        f.write(modelfile)
            if os.path.isdir(out):
                os.rmdir(out)  # empty, checked by _prepare_out
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return {"out": out, "format": format, "gguf_type": gguf_type if plan else None, "nf4_base": merged.nf4,
                "files": sorted(os.listdir(out))}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minilora.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="base checkpoint directory, hub id or short name")
    parser.add_argument("--adapter", help="PEFT LoRA adapter directory (leave out to export the base alone)")
    parser.add_argument("--out", required=True, help="output directory (created; must not exist or be empty)")
    parser.add_argument("--format", choices=FORMATS, default="gguf",
                        help="hf: merged safetensors checkpoint; gguf: one .gguf for llama.cpp; ollama: gguf + Modelfile")
    parser.add_argument("--gguf-type", choices=GGUF_TYPES, default="f16",
                        help="weight type of the 2-D tensors in the .gguf (norms and biases stay f32)")
    parser.add_argument("--nf4-base", action="store_true",
                        help="round the float base's block linears through NF4 first: the base a QLoRA adapter was "
                             "trained on (automatic when the base checkpoint is stored in 4 bits)")
    parser.add_argument("--name", help="model name stored in the .gguf and used for its file name")
    parser.add_argument("--max-shard-size", type=float, default=DEFAULT_SHARD_BYTES / 2**30,
                        help="hf: largest safetensors shard in GiB (peak memory is about one shard)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        info = export_model(args.model, args.adapter, args.out, args.format, args.gguf_type,
                            int(args.max_shard_size * 2**30), args.name, args.nf4_base)
    except MiniloraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if info["nf4_base"]:
        print("note: the base is NF4 (4-bit): it was dequantized before merging, so the exported weights carry "
              "the NF4 rounding of the base the adapter was trained against.")
    kind = f"gguf ({info['gguf_type']})" if info["gguf_type"] else "hf"
    print(f"wrote {kind} to {info['out']}: {', '.join(info['files'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
