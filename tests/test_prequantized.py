"""Pre-quantized bitsandbytes 4-bit checkpoints in the HF layout, both directions, on a tiny model.

transformers + bitsandbytes (CPU backend) write one that minilora loads, and minilora writes one that
transformers + bitsandbytes load: every 4-bit weight dequantizes to the same floats bit for bit (through
bitsandbytes' own dequantize_4bit), and the logits agree. Hidden and MLP widths are multiples of 64 because
bitsandbytes 0.50's CPU 4-bit matmul mis-reads blocks that straddle rows otherwise.
"""
import pytest
import torch

from minilora import load_model
from minilora.nf4 import Linear4bit
from minilora.weights import save_quantized
from tiny import make_checkpoint

pytest.importorskip("bitsandbytes")
# bitsandbytes' CPU 4-bit matmul is not fp32-exact: on one layer it differed from x @ (its own dequantized
# weight)^T by 2e-3 (measured), so logits are compared at 1e-2; the weights themselves are compared exactly.
ATOL = 1e-2


def _assert_same_weights(ref, model):
    import bitsandbytes.functional as bnbf

    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            theirs = ref.get_submodule(name).weight
            expected = bnbf.dequantize_4bit(theirs.data, theirs.quant_state, quant_type="nf4").reshape(-1)
            assert torch.equal(module.dequantize().reshape(-1), expected.to(module.weight_dtype)), name


def _bnb_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_minilora_saves_what_transformers_bitsandbytes_loads(family, tmp_path):
    from transformers import AutoModelForCausalLM

    make_checkpoint(family, tmp_path / "float", intermediate_size=128)
    model, _ = load_model(str(tmp_path / "float"), quantize="nf4")
    save_quantized(model, str(tmp_path / "nf4"), compute_dtype="float32")
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "nf4"), dtype=torch.float32).eval()
    assert type(ref.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    _assert_same_weights(ref, model)  # before any forward: bitsandbytes repacks its CPU weights on the first call
    ids = torch.randint(3, 320, (2, 11))
    with torch.no_grad():
        diff = (ref(ids).logits - model(ids)).abs()
    assert diff.max() <= ATOL, f"max abs diff {diff.max():.3e}, mean {diff.mean():.3e}"
    again, _ = load_model(str(tmp_path / "nf4"), quantize="nf4")  # and it reads back bit for bit
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_minilora_loads_what_transformers_bitsandbytes_saves(tmp_path):
    from transformers import AutoModelForCausalLM

    make_checkpoint("llama", tmp_path / "float", intermediate_size=128)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "float"), quantization_config=_bnb_config(),
                                               dtype=torch.float32).eval()
    ref.save_pretrained(tmp_path / "nf4")
    (tmp_path / "nf4" / "tokenizer.json").write_bytes((tmp_path / "float" / "tokenizer.json").read_bytes())
    model, _ = load_model(str(tmp_path / "nf4"), quantize="nf4")
    assert isinstance(model.model.layers[1].self_attn.q_proj, Linear4bit)
    _assert_same_weights(ref, model)
    ids = torch.randint(3, 320, (2, 11))
    with torch.no_grad():
        diff = (ref(ids).logits - model(ids)).abs()
    assert diff.max() <= ATOL, f"max abs diff {diff.max():.3e}, mean {diff.mean():.3e}"
    dense, _ = load_model(str(tmp_path / "nf4"))  # without quantize the 4-bit weights are dequantized
    with torch.no_grad():
        assert torch.allclose(dense(ids), model(ids), atol=1e-5, rtol=0)


def test_saving_after_decoding_writes_each_layers_own_bytes(tmp_path):
    """A Decoder joins q/k/v and gate/up into one buffer that the layers view (generate.join_projections);
    saving afterwards still writes every layer's own tensors, the same as before the joining."""
    from safetensors.torch import load_file

    from minilora.generate import join_projections

    make_checkpoint("llama", tmp_path / "float", intermediate_size=128)
    model, _ = load_model(str(tmp_path / "float"), quantize="nf4")
    save_quantized(model, str(tmp_path / "before"), compute_dtype="float32")
    join_projections(model)
    assert model.model.layers[0].self_attn.joined_qkv is not None
    save_quantized(model, str(tmp_path / "after"), compute_dtype="float32")
    before, after = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("before", "after"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
