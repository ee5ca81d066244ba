"""Loader behaviour: sharded checkpoints, and a clear error naming the file/key for each bad input."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from minilora import load_model
from minilora.errors import ConfigError, HubError, TokenizerError, WeightsError
from minilora.hub import resolve_model_dir
from tiny import make_checkpoint


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    make_checkpoint("llama", directory)
    return directory


def _copy(src, dst):
    dst.mkdir(exist_ok=True)
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_sharded_checkpoint_loads_like_transformers(tmp_path):
    hf = make_checkpoint("qwen2", tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB", safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "sharded" / name).write_bytes((tmp_path / "single" / name).read_bytes())
    shards = [f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model, _ = load_model(str(tmp_path / "sharded"))
    ids = torch.randint(3, 320, (1, 9))
    with torch.no_grad():
        assert torch.allclose(model(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_truncated_file_names_the_file(llama_dir, tmp_path):
    bad = _copy(llama_dir, tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"model\.safetensors.*(truncated|corrupt)"):
        load_model(str(bad))


def test_missing_shard_is_named(tmp_path):
    hf = make_checkpoint("llama", tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB", safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "sharded" / name).write_bytes((tmp_path / "single" / name).read_bytes())
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(tmp_path / "sharded" / victim)
    with pytest.raises(WeightsError, match=victim):
        load_model(str(tmp_path / "sharded"))


def test_wrong_shape_and_extra_and_missing_keys_listed_together(llama_dir, tmp_path):
    bad = _copy(llama_dir, tmp_path / "bad")
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    tensors["model.layers.0.self_attn.rotary.weight"] = torch.zeros(3)
    del tensors["model.layers.2.input_layernorm.weight"]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError) as err:
        load_model(str(bad))
    message = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight" in message and "[95, 64]" in message and "[96, 64]" in message
    assert "model.layers.0.self_attn.rotary.weight" in message
    assert "model.layers.2.input_layernorm.weight" in message
    assert "model.safetensors" in message


def test_unknown_model_type_is_named(llama_dir, tmp_path):
    bad = _copy(llama_dir, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "mamba"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config\.json.*'mamba'"):
        load_model(str(bad))


def test_unknown_rope_scaling_is_an_error(llama_dir, tmp_path):
    bad = _copy(llama_dir, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    config["rope_theta"] = 10000.0
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="yarn"):
        load_model(str(bad))


def test_pickle_weights_are_refused(llama_dir, tmp_path):
    bad = _copy(llama_dir, tmp_path / "bad")
    os.rename(bad / "model.safetensors", bad / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"pytorch_model\.bin.*safetensors"):
        load_model(str(bad))


def test_integer_tensor_is_refused(llama_dir, tmp_path):
    bad = _copy(llama_dir, tmp_path / "bad")
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"model\.norm\.weight.*int32"):
        load_model(str(bad))


def test_tokenizer_special_ids_match_transformers(llama_dir):
    from transformers import AutoTokenizer

    _, tok = load_model(str(llama_dir))
    ref = AutoTokenizer.from_pretrained(str(llama_dir))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    text = "def add(a, b):\n    return a + b  # ünïcode"
    assert tok.encode(text, add_special_tokens=True) == ref(text)["input_ids"]
    assert tok.decode(tok.encode(text)) == text


def test_missing_tokenizer_is_named(llama_dir, tmp_path):
    bad = _copy(llama_dir, tmp_path / "bad")
    os.remove(bad / "tokenizer.json")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        load_model(str(bad))


def test_offline_hub_error_says_how_to_pass_a_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="local directory"):
        resolve_model_dir("llama3-1b", cache_dir=str(tmp_path))


def test_not_a_name_or_directory():
    with pytest.raises(HubError, match="no such directory"):
        resolve_model_dir("./no/such/dir")


_PEAK_SCRIPT = """
import sys, torch
from minilora import load_model
def status(key):
    return int(open('/proc/self/status').read().split(key + ':')[1].split()[0]) * 1024
model, _ = load_model(sys.argv[1], dtype=torch.float32)  # warm-up: first-call set-up of torch and tokenizers
del model
before = status('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS
model, _ = load_model(sys.argv[1], dtype=torch.float32)
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(status('VmHWM') - before, size)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_loading_streams_tensor_by_tensor(tmp_path):
    """A bf16 checkpoint loaded in fp32: host memory peaks near one fp32 copy, not fp32 + the whole file."""
    import subprocess
    import sys

    make_checkpoint("llama", tmp_path, dtype=torch.bfloat16, hidden_size=512, intermediate_size=1536,
                    num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64)
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         check=True).stdout.split()
    peak, size = int(out[0]), int(out[1])
    # one fp32 copy plus a few tensors in flight (the largest is 3 MiB) and allocator slack
    assert peak <= 1.25 * size, f"peak {peak / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB model"


def test_non_finite_weight_is_refused(llama_dir, tmp_path):
    bad = _copy(llama_dir, tmp_path / "bad")
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"][0, :3] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*3 non-finite"):
        load_model(str(bad))


@pytest.mark.parametrize("shard", ["../../etc/passwd", "/etc/passwd"])
def test_shard_path_outside_the_directory_is_refused(llama_dir, tmp_path, shard):
    bad = _copy(llama_dir, tmp_path / "bad")
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": shard}}))
    with pytest.raises(WeightsError, match="escapes the checkpoint directory"):
        load_model(str(bad))


def test_unknown_architecture_is_named(llama_dir, tmp_path):
    bad = _copy(llama_dir, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="MambaForCausalLM"):
        load_model(str(bad))


@pytest.mark.parametrize("damage", ["empty", "short", "huge_header", "not_json", "junk_appended"])
def test_damaged_safetensors_headers(llama_dir, tmp_path, damage):
    bad = _copy(llama_dir, tmp_path / "bad")
    path = bad / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    damaged = {"empty": b"", "short": data[:5], "huge_header": (2**40).to_bytes(8, "little") + data[8:],
               "not_json": data[:8] + b"{" * n + data[8 + n:], "junk_appended": data + b"junk"}[damage]
    path.write_bytes(damaged)
    with pytest.raises(WeightsError, match=r"model\.safetensors"):
        load_model(str(bad))


def test_model_with_adapter_is_in_eval_mode(llama_dir, tmp_path):
    """load_model(adapter=...) returns a deterministic model: LoRA dropout off."""
    from minilora.lora import apply_lora, save_adapter

    model, _ = load_model(str(llama_dir))
    apply_lora(model, r=4, alpha=8, dropout=0.5)
    save_adapter(model, str(tmp_path / "adapter"))
    loaded, _ = load_model(str(llama_dir), adapter=str(tmp_path / "adapter"))
    assert not any(m.training for m in loaded.modules())
