"""Export (minilora/export.py, gguf_export.py, modelfile.py) checked by independent readers.

- `hf`: transformers' AutoModelForCausalLM loads the merged checkpoint with no missing/unexpected keys and
  reproduces our model + adapter (unmerged) logits.
- `gguf`: transformers' GGUF reader (`from_pretrained(dir, gguf_file=...)`, which dequantizes with the gguf
  package) gives the same logits within the chosen type's error, and its tokenizer built from the GGUF
  encodes a code snippet to our ids. Gemma 1 has no transformers GGUF reader: its tensors are read back
  with gguf.GGUFReader and compared one by one. llama.cpp itself runs the files when llama-cpp-python is
  installed (skipped otherwise).
- Ollama: the Modelfile's turn layout reproduces transformers' apply_chat_template; with a Go toolchain the
  TEMPLATE itself is executed by Go's text/template.
Tiny random checkpoints of every family come from tests/tiny.py.
"""
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from minilora.errors import CheckpointError, ConfigError, WeightsError
from minilora.export import export_model, main
from minilora.loading import load_model
from minilora.lora import apply_lora, save_adapter
from tiny import FAMILIES, make_checkpoint

gguf = pytest.importorskip("gguf")
tf = pytest.importorskip("transformers")

SNIPPET = "def add(a, b):\n    return a + b  # 123\nfor i in range(10):\n    print(i)"
F16_EPS = 2.0 ** -11  # unit roundoff of float16

# What llama.cpp can represent: Gemma 2/3 scale queries by head_dim**-0.5 (query_pre_attn_scalar = head_dim)
# and Gemma 3 has one global layer in six; transformers' GGUF reader fills the rest from its defaults.
GGUF_OVERRIDES = {
    "gemma2": dict(head_dim=256, query_pre_attn_scalar=256),
    "gemma3_text": dict(head_dim=256, query_pre_attn_scalar=256, num_hidden_layers=6,
                        layer_types=["sliding_attention"] * 5 + ["full_attention"]),
    "llama": dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),  # transformers' GGUF reader ignores rope_freqs; tested on its own below
}


def _adapter(base, directory, seed=1, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    torch.manual_seed(seed)
    model, _ = load_model(base)
    apply_lora(model, 4, 8.0, targets=targets)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)  # a trained-looking adapter: B is zero only at the start
    save_adapter(model, directory)
    return directory


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """{family: (base dir, adapter dir)} of tiny random checkpoints with a random adapter."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for family in FAMILIES:
        base = str(root / family / "base")
        make_checkpoint(family, base, **GGUF_OVERRIDES.get(family, {}))
        out[family] = (base, _adapter(base, str(root / family / "adapter")))
    return out


def _ours(base, adapter, ids):
    model, _ = load_model(base, adapter=adapter)
    with torch.no_grad():
        return model(ids).float()


def _ids(base, n=20):
    _, tok = load_model(base)
    return torch.tensor([tok.encode(SNIPPET)[:n]]), tok


def _gguf_file(directory):
    files = glob.glob(os.path.join(directory, "*.gguf"))
    assert len(files) == 1, os.listdir(directory)
    return os.path.basename(files[0])


def _report(a, b):
    d = (a - b).abs()
    return f"max diff {d.max().item():.3g}, mean {d.mean().item():.3g}, max |logit| {b.abs().max().item():.3g}"


# ------------------------------------------------------------------------------------------ hf

@pytest.mark.parametrize("family", FAMILIES)
def test_hf_export_reproduces_adapter_logits(tuned, tmp_path, family):
    base, adapter = tuned[family]
    out = str(tmp_path / "hf")
    export_model(base, adapter, out, "hf")
    for fname in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert os.path.isfile(os.path.join(out, fname)), fname
    ids, _ = _ids(base)
    hf, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        theirs = hf(ids).logits
    ours = _ours(base, adapter, ids)
    base_logits = _ours(base, None, ids)
    # fp32 base: merging is one fp32 add per weight, so fp32 tolerances (a few ulps through the layers).
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5, msg=lambda m: f"{family}: {_report(theirs, ours)}")
    assert (base_logits - ours).abs().max() > 100 * 1e-5  # the adapter changes the logits: the check can fail


def test_hf_export_shards_and_index(tuned, tmp_path):
    base, adapter = tuned["qwen2"]
    out = str(tmp_path / "hf")
    export_model(base, adapter, out, "hf", max_shard_bytes=64 * 1024)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 2
    hf = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids, _ = _ids(base)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, _ours(base, adapter, ids), rtol=1e-4, atol=1e-5)


def test_hf_export_of_nf4_base_says_so(tuned, tmp_path, capsys):
    """A bitsandbytes 4-bit base is dequantized before merging; the command line says so."""
    from minilora.weights import save_quantized

    base, adapter = tuned["llama"]
    model, _ = load_model(base, quantize="nf4", backend="torch")
    nf4_dir = str(tmp_path / "nf4")
    save_quantized(model, nf4_dir, compute_dtype="float32")
    out = str(tmp_path / "hf")
    assert main(["--model", nf4_dir, "--adapter", adapter, "--out", out, "--format", "hf"]) == 0
    assert "NF4" in capsys.readouterr().out
    config = json.load(open(os.path.join(out, "config.json")))
    assert "quantization_config" not in config
    hf = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids, _ = _ids(base)
    ours = _ours(nf4_dir, adapter, ids)  # our loader dequantizes the 4-bit checkpoint (no quantize=)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours, rtol=1e-4, atol=1e-5)


def test_nf4_base_flag_reproduces_qlora_model(tuned, tmp_path):
    """--nf4-base rounds a float base through NF4 first: the export equals our QLoRA model (NF4 base +
    adapter) up to the one fp32 rounding of the merge."""
    base, adapter = tuned["qwen2"]
    out = str(tmp_path / "hf")
    info = export_model(base, adapter, out, "hf", nf4_base=True)
    assert info["nf4_base"]
    ids, _ = _ids(base)
    model, _ = load_model(base, quantize="nf4", backend="torch", adapter=adapter)
    with torch.no_grad():
        ours = model(ids).float()
        theirs = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert (theirs - _ours(base, adapter, ids)).abs().max() > 1e-3  # NF4 rounding is visible: the flag did something


# ---------------------------------------------------------------------------------------- gguf

def _transformers_gguf(directory, family):
    name = _gguf_file(directory)
    # transformers' phi3 GGUF config mapping has no sliding_window key (the file has it: checked below)
    extra = {"sliding_window": 6} if family == "phi3" else {}
    model = tf.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32, **extra)
    return model, tf.AutoTokenizer.from_pretrained(directory, gguf_file=name)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gemma"])
def test_gguf_f16_matches_merged_model(tuned, tmp_path, family):
    base, adapter = tuned[family]
    out = str(tmp_path / "gguf")
    export_model(base, adapter, out, "gguf", "f16")
    model, tokenizer = _transformers_gguf(out, family)
    ids, tok = _ids(base)
    with torch.no_grad():
        theirs = model(ids).logits
    ours = _ours(base, adapter, ids)
    # f16 weights: each carries a relative rounding of at most 2**-11; through three blocks of a few
    # matmuls each that grows to a few of those units on the logits. 16 units of max|logit| covers it.
    tol = 16 * F16_EPS * ours.abs().max().item()
    assert (theirs - ours).abs().max().item() <= tol, f"{family}: {_report(theirs, ours)}, tol {tol:.3g}"
    assert (_ours(base, None, ids) - ours).abs().max().item() > 5 * tol  # the adapter is visible at this tolerance
    assert tokenizer.encode(SNIPPET, add_special_tokens=False) == tok.encode(SNIPPET)


# Block quantization error relative to the block's max |w|, plus the f16 rounding of the stored scale times
# the largest code (max * 2**-11). q8_0: steps of max/127, error half a step. q4_0: steps of max/8 and codes
# -8..7 with the block max at -8, so a value of the other sign near -max is clipped at 7: one full step.
BLOCK_BOUNDS = {"Q8_0": 1 / 254 + F16_EPS, "Q4_0": 1 / 8 + F16_EPS}


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0"])
def test_gguf_block_quantization_error(tuned, tmp_path, gguf_type):
    """Every quantized tensor, read back with gguf.GGUFReader and dequantized by gguf, is within the block
    bound of the merged fp32 weight; the logits then stay within a few of those relative units."""
    bound = BLOCK_BOUNDS[gguf_type.upper()]
    base, adapter = tuned["qwen2"]
    hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "gguf")
    export_model(base, adapter, hf_dir, "hf")
    export_model(base, adapter, out, "gguf", gguf_type)
    from safetensors.torch import load_file

    merged = load_file(os.path.join(hf_dir, "model.safetensors"))
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, 3)
    by_gguf = {name_map.get_name(k.rpartition(".")[0]) + "." + k.rpartition(".")[2]: v for k, v in merged.items()}
    reader = gguf.GGUFReader(os.path.join(out, _gguf_file(out)))
    quantized = 0
    for t in reader.tensors:
        values = torch.from_numpy(np.array(gguf.dequantize(t.data, t.tensor_type))).float()
        expected = by_gguf[t.name].float()
        if t.tensor_type in (gguf.GGMLQuantizationType.F32,):
            assert torch.equal(values.reshape(expected.shape), expected), t.name
            continue
        quantized += 1
        blocks = expected.reshape(-1, 32)
        err = (values.reshape(-1, 32) - blocks).abs()
        limit = blocks.abs().amax(1, keepdim=True) * BLOCK_BOUNDS[t.tensor_type.name]
        assert (err <= limit + 1e-7).all(), f"{t.name}: worst {(err / limit.clamp_min(1e-12)).max():.3g} of the bound"
    assert quantized >= 7 * 3  # every block linear of the three layers
    model, _ = _transformers_gguf(out, "qwen2")
    ids, _ = _ids(base)
    with torch.no_grad():
        theirs = model(ids).logits
    ours = _ours(base, adapter, ids)
    tol = 16 * bound * ours.abs().max().item()  # 16 relative units, as for f16 above
    assert (theirs - ours).abs().max().item() <= tol, f"{gguf_type}: {_report(theirs, ours)}, tol {tol:.3g}"


def test_gguf_metadata_read_back(tuned, tmp_path):
    """Architecture keys, special ids and chat template as gguf.GGUFReader reads them."""
    for family, arch in (("phi3", "phi3"), ("gemma2", "gemma2"), ("gemma", "gemma"), ("llama", "llama")):
        base, adapter = tuned[family]
        template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        cfg_path = os.path.join(base, "tokenizer_config.json")
        cfg = json.load(open(cfg_path))
        json.dump({**cfg, "chat_template": template}, open(cfg_path, "w"))
        try:
            out = str(tmp_path / family)
            export_model(base, adapter, out, "gguf", "bf16")
        finally:
            json.dump(cfg, open(cfg_path, "w"))
        reader = gguf.GGUFReader(os.path.join(out, _gguf_file(out)))

        def field(key):
            f = reader.fields[key]
            value = f.contents()
            return value

        config = json.load(open(os.path.join(base, "config.json")))
        assert field("general.architecture") == arch
        assert field(f"{arch}.block_count") == config["num_hidden_layers"]
        assert field(f"{arch}.attention.head_count_kv") == config["num_key_value_heads"]
        assert field("tokenizer.chat_template") == template
        assert field("tokenizer.ggml.eos_token_id") == 1 and field("tokenizer.ggml.bos_token_id") == 2
        assert field("tokenizer.ggml.add_bos_token") is True  # tiny.py's post-processor prepends <bos>
        assert len(field("tokenizer.ggml.tokens")) == config["vocab_size"]
        if family in ("phi3", "gemma2"):
            assert field(f"{arch}.attention.sliding_window") == config["sliding_window"]
        if family == "gemma2":
            assert field("gemma2.attn_logit_softcapping") == config["attn_logit_softcapping"]


def test_gemma1_tensors_read_back(tuned, tmp_path):
    """No transformers reader for the gemma GGUF architecture: compare each tensor as gguf reads it with the
    merged checkpoint (norms stored as 1 + w, as llama.cpp's gemma loader expects)."""
    from safetensors.torch import load_file

    base, adapter = tuned["gemma"]
    export_model(base, adapter, str(tmp_path / "hf"), "hf")
    export_model(base, adapter, str(tmp_path / "gguf"), "gguf", "f16")
    merged = load_file(str(tmp_path / "hf" / "model.safetensors"))
    reader = gguf.GGUFReader(str(tmp_path / "gguf" / _gguf_file(str(tmp_path / "gguf"))))
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    assert len(names) == len(merged)
    for t in reader.tensors:
        layer = t.name.split(".")[1] if t.name.startswith("blk.") else None
        hf_name = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}.get(t.name)
        if hf_name is None:
            part = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
                    "ffn_norm": "post_attention_layernorm"}[t.name.split(".")[2]]
            hf_name = f"model.layers.{layer}.{part}.weight"
        expected = merged[hf_name].float() + (1 if "norm" in t.name else 0)
        values = torch.from_numpy(np.array(gguf.dequantize(t.data, t.tensor_type))).float().reshape(expected.shape)
        torch.testing.assert_close(values, expected, rtol=F16_EPS, atol=1e-6 if "norm" in t.name else 6e-8)


def test_llama3_rope_factors_match_transformers():
    """rope_freqs (llama.cpp divides each frequency by it) equals transformers' llama3 frequency ratio."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from minilora.config import config_from_dict
    from minilora.gguf_export import llama3_rope_factors
    from tiny import hf_config

    cfg = hf_config("llama")
    ours = llama3_rope_factors(config_from_dict(cfg.to_dict()).rope, 16)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16))
    torch.testing.assert_close(torch.from_numpy(ours), plain / scaled, rtol=1e-5, atol=0)
    assert ours.max() > 1  # the scaling is active at this config's original length


# ------------------------------------------------------------------------------------- refusals

def test_bad_inputs_fail_before_writing(tuned, tmp_path):
    base, adapter = tuned["qwen2"]
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="inside the input directory"):
        export_model(base, adapter, os.path.join(base, "sub"), "hf")
    with pytest.raises(CheckpointError, match="lora_A"):  # gemma2's adapter: 256-wide heads, qwen2 has 16
        export_model(base, tuned["gemma2"][1], str(out), "hf")
    assert not out.exists() and not glob.glob(str(out) + ".tmp-*")
    gemma2 = str(tmp_path / "gemma2")
    make_checkpoint("gemma2", gemma2)  # query_pre_attn_scalar=24 != head_dim: llama.cpp cannot scale that way
    with pytest.raises(ConfigError, match="query_pre_attn_scalar"):
        export_model(gemma2, None, str(out), "gguf")
    with pytest.raises(CheckpointError, match="no chat template"):
        export_model(base, adapter, str(out), "ollama")
    assert not out.exists()
    mamba = str(tmp_path / "mamba")
    shutil.copytree(base, mamba)
    cfg = json.load(open(os.path.join(mamba, "config.json")))
    json.dump({**cfg, "architectures": ["MambaForCausalLM"]}, open(os.path.join(mamba, "config.json"), "w"))
    with pytest.raises(ConfigError, match="MambaForCausalLM"):
        export_model(mamba, None, str(out), "gguf")
    os.makedirs(out)
    open(out / "keep.txt", "w").write("x")
    with pytest.raises(CheckpointError, match="not empty"):
        export_model(base, adapter, str(out), "hf")
    assert (out / "keep.txt").read_text() == "x"


def test_command_line_runs(tuned, tmp_path):
    base, adapter = tuned["llama"]
    out = str(tmp_path / "cli")
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "minilora.export", "--model", base, "--adapter", adapter, "--out", out,
                           "--format", "gguf", "--gguf-type", "q8_0"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "q8_0" in done.stdout and _gguf_file(out).endswith("-q8_0.gguf")
    bad = subprocess.run([sys.executable, "-m", "minilora.export", "--model", base, "--adapter", str(tmp_path / "none"),
                          "--out", str(tmp_path / "x"), "--format", "hf"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "adapter_config.json" in bad.stderr


# --------------------------------------------------------------------------------------- ollama

TEMPLATES = {  # the chat templates of the families' instruct checkpoints, abridged to their turn layout
    "chatml": ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
               "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
               "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "llama3": ("{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
               "+ message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "gemma": ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
              "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
              "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
              "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    "phi3": ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
}
CONVERSATIONS = [
    [{"role": "user", "content": "Write add(a, b)."}],
    [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "Sum a list."},
     {"role": "assistant", "content": "sum(xs)"}, {"role": "user", "content": "And the product?"}],
]


def _with_template(base, tmp_path, template):
    directory = str(tmp_path / "chat")
    shutil.copytree(base, directory)
    cfg = json.load(open(os.path.join(directory, "tokenizer_config.json")))
    json.dump({**cfg, "chat_template": template}, open(os.path.join(directory, "tokenizer_config.json"), "w"))
    return directory


def _go_render(template, conversation, tmp_path):
    """Execute the Modelfile TEMPLATE with Go's text/template on Ollama's data (System, Messages)."""
    system = next((m["content"] for m in conversation if m["role"] == "system"), "")
    messages = [m for m in conversation if m["role"] != "system"]
    program = tmp_path / "render.go"
    program.write_text(
        'package main\nimport ("encoding/json"; "os"; "text/template")\n'
        'type Message struct { Role string; Content string }\n'
        'type Data struct { System string; Messages []Message }\n'
        'func main() { var d Data; json.Unmarshal([]byte(os.Args[2]), &d)\n'
        ' t := template.Must(template.New("t").Parse(os.Args[1])); t.Execute(os.Stdout, d) }\n')
    data = json.dumps({"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})
    done = subprocess.run(["go", "run", str(program), template, data], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GOCACHE": str(tmp_path / "gocache"), "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("kind", TEMPLATES)
def test_ollama_modelfile_follows_chat_template(tuned, tmp_path, kind):
    from minilora.modelfile import CHAT_FORMATS, detect_chat_format

    base = _with_template(tuned["qwen2"][0], tmp_path, TEMPLATES[kind])
    out = str(tmp_path / "ollama")
    export_model(base, tuned["qwen2"][1], out, "ollama", "q8_0")
    text = open(os.path.join(out, "Modelfile")).read()
    assert text.startswith(f"FROM ./{_gguf_file(out)}\n")
    fmt = detect_chat_format(TEMPLATES[kind])
    assert fmt.name == kind and fmt in CHAT_FORMATS
    for stop in fmt.stops:
        assert f"PARAMETER stop {json.dumps(stop)}" in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    _check_against_transformers(base, TEMPLATES[kind], template, tmp_path)


def _check_against_transformers(directory, jinja, go_template, tmp_path):
    """The family's turn layout (and, with Go installed, the TEMPLATE itself) renders CONVERSATIONS exactly as
    transformers' apply_chat_template does, BOS aside (llama.cpp adds it)."""
    from minilora.modelfile import default_system, detect_chat_format

    fmt = detect_chat_format(jinja)
    hf_tok = tf.AutoTokenizer.from_pretrained(directory)
    system = default_system(jinja, fmt, {"bos": hf_tok.bos_token})
    for conversation in CONVERSATIONS:
        reference = hf_tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        if "bos_token" in jinja:
            reference = reference.removeprefix(hf_tok.bos_token or "")
        sys_text = next((m["content"] for m in conversation if m["role"] == "system"), system)
        turns = [m for m in conversation if m["role"] != "system"]
        ours = "" if fmt.system_in_user or not sys_text else fmt.turn("system", sys_text)
        for i, m in enumerate(turns):
            content = (fmt.turn("system", sys_text) if fmt.system_in_user and i == 0 and sys_text else "") + m["content"]
            ours += fmt.turn(m["role"], content)
        assert ours + fmt.generation == reference
        if shutil.which("go"):
            assert _go_render(go_template, conversation, tmp_path) == reference


@pytest.mark.real
@pytest.mark.parametrize("name", ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"))
def test_real_modelfile_follows_chat_template(tmp_path, name):
    from conftest import real_checkpoint

    from minilora.chat_template import read_chat_template
    from minilora.modelfile import modelfile_text

    base = real_checkpoint(name)
    hf_tok = tf.AutoTokenizer.from_pretrained(base)
    text = modelfile_text(read_chat_template(base), "m.gguf", {"bos": hf_tok.bos_token, "stop": [hf_tok.eos_token]})
    assert 'PARAMETER stop "<|im_end|>"' in text
    _check_against_transformers(base, read_chat_template(base), text.split('TEMPLATE """', 1)[1].split('"""', 1)[0],
                                tmp_path)


# ------------------------------------------------------------------------------------ llama.cpp

@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_runs_the_gguf(tuned, tmp_path, family):
    """llama.cpp's own forward pass (llama-cpp-python) on the f16 file: same logits as ours."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    base, adapter = tuned[family]
    out = str(tmp_path / "gguf")
    export_model(base, adapter, out, "gguf", "f16")
    # llama.cpp runs Phi-3 without its sliding window (llama.cpp PR 13676): compare within the window
    ids, _ = _ids(base, 6 if family == "phi3" else 12)
    llm = llama_cpp.Llama(os.path.join(out, _gguf_file(out)), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids[0].tolist())
    theirs = torch.tensor(np.array(llm.scores[: ids.shape[1]]))
    ours = _ours(base, adapter, ids)[0]
    tol = 16 * F16_EPS * ours.abs().max().item()
    assert (theirs - ours).abs().max().item() <= tol, f"{family}: {_report(theirs, ours)}, tol {tol:.3g}"


# ---------------------------------------------------------------------------------- real checkpoints

REAL = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma3-270m")
REAL_SNIPPET = "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)  # 12345\n"
BF16_EPS = 2.0 ** -8  # unit roundoff of bfloat16


@pytest.mark.real
@pytest.mark.parametrize("name", REAL)
def test_real_checkpoint_export(tmp_path, name):
    """A real bf16 checkpoint + adapter: the hf export reproduces our unmerged model within the bf16 rounding of
    the merged weights; the f16 and q8_0 GGUFs, read by transformers, match that export within their own
    rounding; the GGUF tokenizer gives our ids (with the BOS the model expects)."""
    from conftest import real_checkpoint

    base = real_checkpoint(name)
    adapter = _adapter(base, str(tmp_path / "adapter"), targets=("q_proj", "v_proj", "down_proj"))
    export_model(base, adapter, str(tmp_path / "hf"), "hf")
    _, tok = load_model(base)
    ids = torch.tensor([tok.encode(REAL_SNIPPET, add_special_tokens=True)])
    ours = _ours(base, adapter, ids)
    hf = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    with torch.no_grad():
        merged = hf(ids).logits
    del hf
    scale = ours.abs().max().item()
    # merged weights rounded once to bf16 (relative 2**-8 at most each): a few units through the layers
    assert (merged - ours).abs().max().item() <= 16 * BF16_EPS * scale, _report(merged, ours)
    for gguf_type, unit in (("f16", F16_EPS), ("q8_0", BLOCK_BOUNDS["Q8_0"])):
        out = str(tmp_path / gguf_type)
        export_model(base, adapter, out, "gguf", gguf_type)
        model, tokenizer = _transformers_gguf(out, "")
        with torch.no_grad():
            theirs = model(ids).logits
        del model
        assert (theirs - merged).abs().max().item() <= 16 * unit * scale, f"{gguf_type}: {_report(theirs, merged)}"
        assert (theirs.argmax(-1) == merged.argmax(-1)).float().mean() > 0.8
        assert tokenizer.encode(REAL_SNIPPET, add_special_tokens=True) == ids[0].tolist()
