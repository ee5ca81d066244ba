"""Fuzzing the loaders (docs/reliability.md promise 3): mutated inputs only ever raise our clear errors.

Each target feeds 300-800 hypothesis-made inputs (2,700 in all, ~20 s), near-valid on purpose (a valid file with a few bytes
or keys changed reaches deeper code than random noise), to one of the loaders that reads user files:
  - safetensors files: byte flips, cuts and insertions, a rewritten length field, rewritten header JSON
    (minilora.weights.SafetensorsFile, then every tensor read back);
  - a sharded checkpoint's model.safetensors.index.json (find_weight_files, then load_weights into a tiny
    model on the meta device);
  - config.json, as a dict (config_from_dict, then the model built on the meta device) and as bytes
    (load_config);
  - dataset files, JSON list or JSONL, with bad rows, odd Unicode and damaged bytes (load_records, then
    tokenize_records with a real BPE tokenizer, as training does).
The property: the call succeeds, or raises a MiniloraError subclass. Anything else (TypeError, KeyError,
RecursionError, a PanicException from a Rust library ...) fails the test with the input that caused it.
Under CI=true hypothesis derandomizes (its "ci" profile), so CI runs the same inputs every time.
"""
import functools
import json
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes

from minilora.config import config_from_dict, load_config
from minilora.errors import MiniloraError
from minilora.weights import SAFETENSORS_DTYPES, SafetensorsFile, find_weight_files, load_weights

FUZZ = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))

# any JSON value, NaN and +-inf included (Python's json reads and writes them)
NASTY_NUMBERS = st.sampled_from([float("inf"), float("-inf"), float("nan"), -1, 0, 2**63, 2**64, 2**1000, 1.5, True])
JSON_LEAVES = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6) | NASTY_NUMBERS
JSON = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                               max_size=3), max_leaves=8)


def _only_clear_errors(call, *args, **kwargs):
    """call(...)'s result, or None when it raised one of our errors; any other exception propagates."""
    try:
        return call(*args, **kwargs)
    except MiniloraError:
        return None


# byte strings that break naive parsers: deep nesting, a 5,000-digit int, JSON's non-finite literals, a lone
# continuation byte, a BOM, U+2028 (a line break to str.splitlines, not to JSON), a lone surrogate escape
NASTY_BYTES = [b"\n", b"\r", b"{", b"[", b'"', b"\xff", b"\xef\xbb\xbf", b"\xe2\x80\xa8", b"[" * 3000, b"9" * 5000,
               b"Infinity", b"NaN", b"-1", b'"\\ud800"']
# whole JSON documents of the same kinds (a byte inserted at random rarely lands where a value starts)
NASTY_DOCUMENTS = [b"[" * 3000, b'{"a": ' + b"[" * 3000, b"9" * 5000, b'{"a": ' + b"9" * 5000 + b"}", b"Infinity",
                   b'{"a": {"dtype": "F32", "shape": [1e999], "data_offsets": [0, 4]}}', b'"\\ud800"', b"", b"\xff"]


@st.composite
def byte_mutations(draw, data: bytes):
    """`data` with 1-4 random edits: flip, cut, insert, duplicate, or a new 8-byte length prefix."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "flip", "cut", "insert", "insert", "dup", "length"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and data:
            at = min(at, len(data) - 1)
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            data = data[:at] + data[at + draw(st.integers(1, 16)):] if draw(st.booleans()) else data[:at]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from(NASTY_BYTES))
        elif kind == "dup":
            data[at:at] = data[at:at + draw(st.integers(1, 32))]
        elif kind == "length":
            data[:8] = draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    return bytes(data)


# ------------------------------------------------------------------------------------- safetensors

VALID_FILE = safetensors_bytes({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                                "b": torch.ones(3, dtype=torch.float16), "c": torch.zeros(0, 4)})


BAD_FIELD = (st.lists(st.integers(-3, 4) | NASTY_NUMBERS, min_size=1, max_size=3) | NASTY_NUMBERS | JSON
             | st.sampled_from(["F8_E4M3", "f32", "", "U64"]))


@st.composite
def safetensors_files(draw):
    """A safetensors file written from a header that is valid, or has one field, entry or the whole JSON broken."""
    header, offset = {}, 0
    for i in range(draw(st.integers(1, 3))):
        dtype = draw(st.sampled_from(sorted(SAFETENSORS_DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        nbytes = SAFETENSORS_DTYPES[dtype].itemsize * math.prod(shape)
        entry = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        broken = draw(st.sampled_from([None, None, "dtype", "shape", "data_offsets", "missing", "entry"]))
        if broken in entry:
            entry[broken] = draw(BAD_FIELD)
        elif broken == "missing":
            del entry[draw(st.sampled_from(sorted(entry)))]
        elif broken == "entry":
            entry = draw(JSON)
        header[draw(st.text(max_size=3)) + str(i)] = entry
    if draw(st.booleans()):
        header["__metadata__"] = draw(JSON)
    text = json.dumps(header).encode() + b" " * draw(st.integers(0, 7))  # safetensors pads to 8-byte alignment
    text = draw(st.just(text) | st.sampled_from(NASTY_DOCUMENTS))
    body = b"\0" * offset + draw(st.sampled_from([b"", b"", b"x"]))
    return len(text).to_bytes(8, "little") + text + body


def _read_all(path):
    with SafetensorsFile(path) as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            assert tensor.numel() == 0 or tensor.dtype in SAFETENSORS_DTYPES.values()


@settings(max_examples=800, **FUZZ)
@given(data=st.one_of(byte_mutations(VALID_FILE), safetensors_files()))
def test_safetensors_reader_only_raises_weights_errors(tmp_path_factory, data):
    path = os.path.join(tmp_path_factory.getbasetemp(), "fuzz.safetensors")
    with open(path, "wb") as f:
        f.write(data)
    _only_clear_errors(_read_all, path)


# ------------------------------------------------------------------------------------- shard index

TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 16, "hidden_size": 8,
        "intermediate_size": 12, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "tie_word_embeddings": False}


def _meta_model(raw):
    from minilora.model import Transformer

    with torch.device("meta"):
        return Transformer(config_from_dict(raw))


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    """A tiny Llama in two shards (no index yet); returns (directory, {tensor name: shard file})."""
    directory = tmp_path_factory.mktemp("sharded")
    shapes = {name: p.shape for name, p in _meta_model(TINY).named_parameters()}
    names = sorted(shapes)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in shards.items():
        with open(directory / shard, "wb") as f:
            f.write(safetensors_bytes({k: torch.randn(shapes[k]) for k in keys}))
        weight_map.update({k: shard for k in keys})
    return directory, weight_map


@st.composite
def shard_indexes(draw, weight_map):
    """An index whose weight_map was edited: keys dropped or added, shards renamed, escaping, swapped."""
    files = sorted(set(weight_map.values()))
    names = files + ["model-00003-of-00002.safetensors", "../model-00001-of-00002.safetensors", "/etc/passwd", ".",
                     "..", "", "a\0b", "x" * 300]
    edited = dict(weight_map)
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.sampled_from(sorted(weight_map)) | st.text(max_size=8))
        choice = draw(st.integers(0, 2))
        if choice == 0:
            edited.pop(key, None)
        else:
            edited[key] = draw(st.sampled_from(names)) if choice == 1 else draw(JSON)
    index = {"metadata": {"total_size": 0}, "weight_map": edited}
    text = json.dumps(draw(st.just(index) | st.just({"weight_map": draw(JSON)}) | JSON)).encode()
    return draw(st.just(text) | st.sampled_from(NASTY_DOCUMENTS))


def _load_index(directory):
    find_weight_files(str(directory))
    load_weights(_meta_model(TINY), str(directory), torch.float32, torch.device("cpu"))


@settings(max_examples=400, **FUZZ)
@given(data=st.data())
def test_shard_index_only_raises_weights_errors(sharded_dir, data):
    directory, weight_map = sharded_dir
    index = data.draw(shard_indexes(weight_map))
    if data.draw(st.booleans()):
        index = data.draw(byte_mutations(index))
    (directory / "model.safetensors.index.json").write_bytes(index)
    _only_clear_errors(_load_index, directory)


def test_fuzz_inputs_reach_the_success_path(sharded_dir):
    """The unmutated inputs load, so the fuzz targets above start from inputs that work."""
    directory, weight_map = sharded_dir
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _load_index(directory)
    path = directory / "valid.safetensors"
    path.write_bytes(VALID_FILE)
    _read_all(str(path))
    assert config_from_dict(dict(TINY)).hidden_size == 8


# ------------------------------------------------------------------------------------- config.json

@functools.lru_cache(maxsize=None)
def _family_configs():
    """config.json of each tiny test family, as transformers writes it."""
    from tiny import FAMILIES, hf_config

    return {family: hf_config(family).to_dict() for family in FAMILIES}


CONFIG_KEYS = ["model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
               "rope_theta", "rope_scaling", "rope_parameters", "hidden_act", "hidden_activation", "sliding_window",
               "layer_types", "sliding_window_pattern", "query_pre_attn_scalar", "attn_logit_softcapping",
               "final_logit_softcapping", "rope_local_base_freq", "tie_word_embeddings", "attention_bias", "mlp_bias",
               "partial_rotary_factor", "pretraining_tp", "use_sliding_window", "text_config", "torch_dtype"]
ROPE_KEYS = ["rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
             "original_max_position_embeddings", "sliding_attention", "full_attention"]
SMALL = st.integers(-2, 70) | st.floats(-2, 70) | st.sampled_from([0, 1, 2, 4, 8, 16, 64, 2**70, "8", "linear", "llama3",
                                                                  "yarn", "default", "silu", "gelu", "relu2", None, True])


@st.composite
def config_dicts(draw, bases):
    """A tiny family config with 1-4 keys changed, deleted, or given a rope dict with changed keys."""
    raw = json.loads(json.dumps(bases[draw(st.sampled_from(sorted(bases)))]))  # deep copy
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(CONFIG_KEYS) | st.text(max_size=5))
        action = draw(st.integers(0, 3))
        if action == 0:
            raw.pop(key, None)
        elif action == 1:
            raw[key] = draw(SMALL | JSON)
        else:
            rope = raw.get(key) if isinstance(raw.get(key), dict) else {"rope_type": "default", "rope_theta": 1e4}
            rope[draw(st.sampled_from(ROPE_KEYS))] = draw(SMALL | JSON)
            raw[draw(st.sampled_from(["rope_scaling", "rope_parameters", key]))] = rope
    return raw


def _config_and_model(raw):
    config = config_from_dict(raw)
    if config.num_hidden_layers <= 8 and config.num_attention_heads <= 64:  # meta tensors, but each layer costs time
        _meta_model(raw)


@settings(max_examples=600, **FUZZ)
@given(data=st.data())
def test_config_dict_only_raises_config_errors(data):
    bases = _family_configs()
    _only_clear_errors(_config_and_model, data.draw(config_dicts(bases)))


@settings(max_examples=300, **FUZZ)
@given(data=st.data())
def test_config_file_only_raises_config_errors(tmp_path_factory, data):
    bases = _family_configs()
    text = json.dumps(data.draw(config_dicts(bases))).encode()
    text = data.draw(st.just(text) | byte_mutations(text) | st.sampled_from(NASTY_DOCUMENTS + [b"\xff\xfe{}"]))
    directory = tmp_path_factory.getbasetemp() / "config_fuzz"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_bytes(text)
    _only_clear_errors(load_config, str(directory))


# ------------------------------------------------------------------------------------- dataset rows

FIELDS = ("instruction", "input", "output")
# text with what real files hold and what breaks naive code: newlines of every kind, lone surrogates (valid
# JSON escapes, not valid Unicode), NUL, BOM, right-to-left marks, emoji
TEXT = st.text(alphabet=st.sampled_from("abc_(): \t\n\r\u2028\x85\ud800\udfff\0\ufeff\u202e\U0001f600{}\"\\é中"), max_size=10)
PLAIN_TEXT = st.text(alphabet="abcdefgh_(): \n", min_size=1, max_size=10)


@st.composite
def dataset_files(draw):
    """A JSON-list or JSONL dataset of near-valid rows, written as UTF-8 (surrogates passed through raw).

    One file in three has only plain, valid rows, so the success path (tokenization, batches) is reached."""
    rows, clean = [], draw(st.integers(0, 2)) == 0
    for _ in range(draw(st.integers(0, 3))):
        row = {k: draw(PLAIN_TEXT if clean else TEXT) for k in FIELDS}
        for _ in range(0 if clean else draw(st.integers(0, 2))):
            key = draw(st.sampled_from(FIELDS) | st.text(max_size=4))
            if draw(st.booleans()):
                row.pop(key, None)
            else:
                row[key] = draw(JSON)
        rows.append(row if clean else draw(st.just(row) | JSON))
    ascii_only = draw(st.booleans())
    if draw(st.booleans()):
        text = json.dumps(rows, ensure_ascii=ascii_only, indent=draw(st.sampled_from([None, 2])))
        return text.encode("utf-8", errors="surrogatepass")
    lines = [json.dumps(r, ensure_ascii=ascii_only).encode("utf-8", errors="surrogatepass") for r in rows]
    if lines and not clean and draw(st.booleans()):
        lines[draw(st.integers(0, len(lines) - 1))] = draw(st.sampled_from(NASTY_DOCUMENTS))
    return draw(st.sampled_from([b"\n", b"\r\n"])).join(lines)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tiny import make_tokenizer

    from minilora.tokenizer import load_tokenizer

    directory = tmp_path_factory.mktemp("tok")
    make_tokenizer(str(directory))
    return load_tokenizer(str(directory))


def _load_and_tokenize(path, tok, skip_bad_rows):
    from minilora.data import collate_padded, load_records, tokenize_records

    records = load_records(path, skip_bad_rows=skip_bad_rows)
    examples, _ = tokenize_records(records, tok, max_len=256)
    batch = collate_padded(examples, tok.pad_id)
    assert ((batch["labels"] != -100).sum(1) > 0).all(), "every row has a supervised token"


@settings(max_examples=600, **FUZZ)
@given(data=st.data())
def test_dataset_rows_only_raise_data_errors(tmp_path_factory, tokenizer, data):
    body = data.draw(dataset_files())
    if data.draw(st.booleans()):
        body = data.draw(byte_mutations(body))
    path = os.path.join(tmp_path_factory.getbasetemp(), "fuzz.jsonl")
    with open(path, "wb") as f:
        f.write(body)
    _only_clear_errors(_load_and_tokenize, path, tokenizer, data.draw(st.booleans()))
