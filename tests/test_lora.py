"""LoRA against peft 0.21 + transformers on tiny random checkpoints, and the LoRA invariants (STYLE.md).

- an adapter saved by minilora, loaded by peft onto the transformers model, gives our logits;
- an adapter made by peft (random A and B, rsLoRA, a subset of targets) loads into minilora with peft's logits;
- zero B leaves the output unchanged (also with dropout on, in training mode);
- merged equals unmerged, unmerge restores the weights; base weights bit-identical after AdamW steps;
- merged weights exported as a HF checkpoint load in transformers with the same logits (tied, biased, fused);
- bad adapters fail with CheckpointError naming the tensor; a non-finite adapter is never written.
Tolerance: fp32 everywhere; 1e-4 for minilora vs transformers (different op order through 3 layers,
the bound the model parity tests use), 1e-5 where only the summation order of one weight changes.
"""
import importlib.util
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minilora import load_model
from minilora.errors import CheckpointError, ConfigError, NonFiniteError
from minilora.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, DEFAULT_TARGETS, apply_lora, load_adapter,
                           lora_modules, merge_lora, save_adapter, save_merged, unmerge_lora)
from tiny import make_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_NF4_FORWARD = importlib.util.find_spec("minilora.kernels.backend") is not None




def assert_close(actual, expected, atol, rtol, what):
    diff = (actual.double() - expected.double()).abs()
    assert torch.allclose(actual.double(), expected.double(), atol=atol, rtol=rtol), (
        f"{what}: max diff {diff.max().item():.3e}, mean diff {diff.mean().item():.3e} (atol {atol}, rtol {rtol})")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """family -> checkpoint directory (written once per module)."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for family in ("llama", "qwen2", "phi3"):
        make_checkpoint(family, str(root / family), seed=1)
        out[family] = str(root / family)
    return out


def _ids(batch=2, length=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (batch, length), generator=g)


def _randomize_b(model, std=0.2, seed=3):
    """B != 0 so the adapter actually changes the output (a zero B would make every parity test vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


def _hf(directory):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager",
                                                             dtype=torch.float32).eval()


def test_zero_b_leaves_output_unchanged_even_with_dropout(ckpts):
    model, _ = load_model(ckpts["llama"])
    ids = _ids()
    with torch.no_grad():
        base = model(ids)
    apply_lora(model, r=4, alpha=8, dropout=0.5)
    assert len(lora_modules(model)) == 3 * len(DEFAULT_TARGETS)
    model.train()  # dropout active: it must touch only the LoRA branch, whose B is zero
    with torch.no_grad():
        out = model(ids)
    assert torch.equal(out, base), f"max diff {(out - base).abs().max().item():.3e}"


def test_lora_a_init_matches_peft_bound(ckpts):
    """Kaiming-uniform with a=sqrt(5) on an (r, in) tensor is U(-1/sqrt(in), 1/sqrt(in)), as nn.Linear and peft."""
    model, _ = load_model(ckpts["llama"])
    apply_lora(model, r=16, alpha=16)
    m = lora_modules(model)["model.layers.0.mlp.down_proj"]
    bound = 1 / m.in_features ** 0.5
    a = m.lora_A.detach()
    assert a.abs().max() <= bound
    # 16 x 96 uniform samples: std bound/sqrt(3) within 10% (std error ~2%), so a wrong fan (out or r) shows up
    assert abs(a.std().item() - bound / 3 ** 0.5) < 0.1 * bound / 3 ** 0.5, (a.std().item(), bound / 3 ** 0.5)
    assert torch.count_nonzero(m.lora_B) == 0


@pytest.mark.parametrize("use_rslora", [False, True])
def test_our_adapter_gives_our_logits_in_peft(ckpts, tmp_path, use_rslora):
    from peft import PeftModel

    model, _ = load_model(ckpts["llama"])
    ids = _ids()
    with torch.no_grad():
        base = model(ids)
    apply_lora(model, r=4, alpha=8, dropout=0.1, use_rslora=use_rslora)
    _randomize_b(model)
    model.eval()
    with torch.no_grad():
        ours = model(ids)
    assert (ours - base).abs().max() > 1e-2, "the adapter should change the logits, else the test proves nothing"
    save_adapter(model, str(tmp_path / "adapter"), base_model_name_or_path=ckpts["llama"])
    cfg = json.load(open(tmp_path / "adapter" / ADAPTER_CONFIG))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_rslora"] == use_rslora
    keys = set(load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS)))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    peft_model = PeftModel.from_pretrained(_hf(ckpts["llama"]), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits.float()
    assert_close(ours, theirs, 1e-4, 1e-4, "minilora adapter: minilora vs peft logits")


def test_peft_adapter_loads_into_minilora(ckpts, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                     use_rslora=True, init_lora_weights=False, task_type="CAUSAL_LM")  # random A and B
    peft_model = get_peft_model(_hf(ckpts["qwen2"]), cfg).eval()
    peft_model.save_pretrained(str(tmp_path / "peft_adapter"))
    ids = _ids(seed=1)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits.float()
        plain = peft_model.get_base_model()
        with peft_model.disable_adapter():
            base = plain(input_ids=ids).logits.float()
    assert (theirs - base).abs().max() > 1e-2
    model, _ = load_model(ckpts["qwen2"], adapter=str(tmp_path / "peft_adapter"))
    names = {n.rsplit(".", 1)[-1] for n in lora_modules(model)}
    assert names == {"q_proj", "v_proj", "down_proj"}
    with torch.no_grad():
        ours = model(ids)
    assert_close(ours, theirs, 1e-4, 1e-4, "peft adapter: minilora vs peft logits")


def test_peft_adapter_on_fused_phi3_projections_loads_exactly(ckpts, tmp_path):
    """Phi-3's qkv_proj / gate_up_proj are split in minilora: A is shared, B is cut by rows."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(6)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj", "o_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(_hf(ckpts["phi3"]), cfg).eval()
    peft_model.save_pretrained(str(tmp_path / "phi3_adapter"))
    ids = _ids(seed=2)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits.float()
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits.float()
    assert (theirs - base).abs().max() > 1e-2
    model, _ = load_model(ckpts["phi3"], adapter=str(tmp_path / "phi3_adapter"))
    names = {n.rsplit(".", 1)[-1] for n in lora_modules(model)}
    assert names == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj"}
    with torch.no_grad():
        ours = model(ids)
    assert_close(ours, theirs, 1e-4, 1e-4, "phi3 fused peft adapter: minilora vs peft logits")


def test_merged_equals_unmerged_and_unmerge_restores(ckpts):
    model, _ = load_model(ckpts["llama"])
    apply_lora(model, r=4, alpha=16)
    _randomize_b(model)
    before = {n: m.base_layer.weight.detach().clone() for n, m in lora_modules(model).items()}
    ids = _ids()
    with torch.no_grad():
        unmerged = model(ids)
        merge_lora(model)
        merged = model(ids)
        changed = max((m.base_layer.weight - before[n]).abs().max().item() for n, m in lora_modules(model).items())
        unmerge_lora(model)
        again = model(ids)
    assert changed > 1e-3, "merging should change the base weights"
    # fp32: W + BA rounds once per weight; through 3 layers that stays well inside 1e-5
    assert_close(merged, unmerged, 1e-5, 1e-5, "merged vs unmerged logits")
    for n, m in lora_modules(model).items():
        assert_close(m.base_layer.weight, before[n], 1e-6, 0, f"{n} weight after merge + unmerge")
    assert_close(again, unmerged, 1e-5, 1e-5, "unmerged again vs unmerged logits")


def test_only_lora_trains_and_base_stays_bit_identical(ckpts):
    model, _ = load_model(ckpts["qwen2"])  # qwen2: q/k/v biases must stay frozen too
    apply_lora(model, r=4, alpha=8, dropout=0.1)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable), trainable
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    lora_before = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    ids = _ids(length=16)
    for _ in range(2):
        logits = model(ids[:, :-1])
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    changed = [k for k, v in frozen.items() if not torch.equal(after[k], v)]
    assert not changed, f"frozen tensors changed: {changed}"
    assert all(not torch.equal(after[k], v) for k, v in lora_before.items()), "every LoRA tensor should train"


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_save_merged_loads_in_transformers(ckpts, tmp_path, family):
    model, tok = load_model(ckpts[family])
    apply_lora(model, r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"))
    _randomize_b(model)
    ids = _ids()
    with torch.no_grad():
        ours = model(ids)
    save_merged(model, str(tmp_path / "merged"), base_dir=ckpts[family])
    keys = set(load_file(str(tmp_path / "merged" / "model.safetensors")))
    assert not any("lora" in k or "base_layer" in k for k in keys)
    if family == "llama":  # tied: one copy, as save_pretrained writes it
        assert "lm_head.weight" not in keys
    if family == "phi3":  # re-fused as the HF checkpoint stores it
        assert "model.layers.0.self_attn.qkv_proj.weight" in keys and "model.layers.0.mlp.gate_up_proj.weight" in keys
    assert not lora_modules(model)[next(iter(lora_modules(model)))].merged, "save_merged must not merge in place"
    with torch.no_grad():
        theirs = _hf(str(tmp_path / "merged"))(input_ids=ids).logits.float()
    assert_close(ours, theirs, 1e-4, 1e-4, f"{family}: merged checkpoint in transformers vs minilora with LoRA")
    reloaded, _ = load_model(str(tmp_path / "merged"))  # and our own loader reads it back
    with torch.no_grad():
        assert_close(reloaded(ids), ours, 1e-5, 1e-5, f"{family}: merged checkpoint in minilora")


def _saved_adapter(ckpt, directory):
    model, _ = load_model(ckpt)
    apply_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj"))
    save_adapter(model, directory)
    return directory


def test_bad_adapters_fail_clearly(ckpts, tmp_path):
    good = _saved_adapter(ckpts["llama"], str(tmp_path / "good"))
    tensors = load_file(os.path.join(good, ADAPTER_WEIGHTS))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def variant(name, change_tensors=None, change_config=None):
        d = tmp_path / name
        d.mkdir()
        t = dict(tensors)
        cfg = json.load(open(os.path.join(good, ADAPTER_CONFIG)))
        if change_tensors:
            change_tensors(t)
        if change_config:
            change_config(cfg)
        save_file(t, str(d / ADAPTER_WEIGHTS))
        json.dump(cfg, open(d / ADAPTER_CONFIG, "w"))
        return str(d)

    cases = {
        "missing": (variant("missing", lambda t: t.pop(key)), ["missing tensors", key]),
        "extra": (variant("extra", lambda t: t.update({"base_model.model.foo.lora_A.weight": torch.zeros(2, 2)})),
                  ["unexpected tensor", "foo.lora_A"]),
        "shape": (variant("shape", lambda t: t.update({key: torch.zeros(7, 4)})), [key, "[7, 4]", "expected"]),
        "dora": (variant("dora", change_config=lambda c: c.update(use_dora=True)), ["use_dora=True"]),
        "target": (variant("target", change_config=lambda c: c.update(target_modules=["qkv_proj"])),
                   ["qkv_proj", "match no linear layer"]),
    }
    for name, (directory, words) in cases.items():
        model, _ = load_model(ckpts["llama"])
        with pytest.raises(CheckpointError) as e:
            load_adapter(model, directory)
        assert all(w in str(e.value) for w in words), (name, str(e.value))


def test_bad_settings_and_non_finite_save_refused(ckpts, tmp_path):
    model, _ = load_model(ckpts["llama"])
    with pytest.raises(ConfigError, match="qproj.*gate_proj"):
        apply_lora(model, r=4, alpha=8, targets=("qproj",))
    with pytest.raises(ConfigError, match="r=0"):
        apply_lora(model, r=0, alpha=8)
    apply_lora(model, r=4, alpha=8)
    with pytest.raises(ConfigError, match="already has LoRA"):
        apply_lora(model, r=4, alpha=8)
    with torch.no_grad():
        lora_modules(model)["model.layers.1.mlp.up_proj"].lora_B[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="model.layers.1.mlp.up_proj.lora_B"):
        save_adapter(model, str(tmp_path / "nan"))
    assert not os.path.exists(tmp_path / "nan" / ADAPTER_WEIGHTS)


@pytest.mark.skipif(not HAS_NF4_FORWARD, reason="minilora.kernels.backend (the Linear4bit forward) is missing")
def test_nf4_base_lora_invariants_and_adapter_round_trip(ckpts, tmp_path):
    model, _ = load_model(ckpts["llama"], quantize="nf4", backend="torch")
    ids = _ids()
    with torch.no_grad():
        base = model(ids)
    apply_lora(model, r=4, alpha=8)
    layer = lora_modules(model)["model.layers.0.self_attn.q_proj"]
    assert type(layer.base_layer).__name__ == "Linear4bit"
    with torch.no_grad():
        assert torch.equal(model(ids), base), "zero B must leave the NF4 model's output unchanged"
    buffers = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    logits = model(ids[:, :-1])
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in buffers.items()), "NF4 bytes / frozen tensors changed"
    _randomize_b(model)
    model.eval()
    with torch.no_grad():
        unmerged = model(ids)
    save_adapter(model, str(tmp_path / "adapter"))
    again, _ = load_model(ckpts["llama"], quantize="nf4", backend="torch", adapter=str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(again(ids), unmerged), "adapter round trip on the NF4 model"
        merge_lora(model)  # NF4 base -> float weight dequant(W) + BA
        assert isinstance(layer.base_layer, torch.nn.Linear)
        assert_close(model(ids), unmerged, 1e-5, 1e-5, "NF4: merged (float) vs unmerged logits")
