"""`python -m minilora.inspect` (minilora/inspect.py): every number against a direct computation.

Tiny random checkpoints (tests/tiny.py) on CPU in fp32: parameter counts against transformers'
`num_parameters()` and our loaded model; NF4 sizes against the Linear4bit buffers; the activation
formulas against bytes autograd really saves (counted here with our own saved_tensors_hooks); the
error table against dequantizing the loaded NF4 model; adapter norms and spectra against torch.linalg
on the full B @ A. Marked `real`: the same on SmolLM2-135M.
"""
import copy
import json
import math

import pytest
import torch

from conftest import real_checkpoint
from minilora import inspect as ins
from minilora.config import load_config
from minilora.loading import load_model
from minilora.lora import apply_lora, save_adapter
from minilora.nf4 import Linear4bit
from tiny import make_checkpoint

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (directory, transformers model) for all six families."""
    out = {}
    for family in ("llama", "qwen2", "gemma", "gemma2", "gemma3_text", "phi3"):
        directory = tmp_path_factory.mktemp(family)
        out[family] = (str(directory), make_checkpoint(family, directory))
    return out


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_parameter_counts_match_transformers_and_loaded_model(checkpoints, family):
    directory, hf = checkpoints[family]
    config = load_config(directory)
    counts = ins.count_parameters(ins.meta_model(config, 4, 8, ("q_proj", "v_proj", "down_proj")))
    assert counts["total"] == hf.num_parameters()  # phi3: untied head, fused q/k/v split at load
    model, _ = load_model(directory)
    linears = {n: p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.") and
               n.endswith("_proj.weight")}
    assert counts["quantized"] == sum(linears.values())
    assert counts["float"] == sum(p.numel() for p in model.parameters()) - counts["quantized"]
    apply_lora(model, 4, 8, targets=("q_proj", "v_proj", "down_proj"))
    assert counts["lora"] == _trainable(model)
    by_part = counts["by_part"]
    assert by_part["embeddings"] == model.model.embed_tokens.weight.numel()
    assert by_part["head"] == (0 if config.tie_word_embeddings else model.lm_head.weight.numel())


def test_nf4_sizes_match_the_loaded_buffers(checkpoints):
    directory, _ = checkpoints["phi3"]
    model, _ = load_model(directory, quantize="nf4")
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    packed = sum(m.weight_packed.nbytes for m in layers)
    stats = sum(b.nbytes for m in layers for n, b in m.named_buffers() if n != "weight_packed")
    est = ins.estimate_memory(ins.meta_model(model.config, 4, 8, ALL), 4, 0.0, 2, 8, torch.float32, CPU)
    assert (est["nf4_packed"], est["nf4_stats"]) == (packed, stats)
    assert est["float_weights"] == sum(p.nbytes for p in model.parameters())  # all float once NF4 is in


def _saved_bytes(model, batch):
    """Bytes autograd keeps for one forward, counted here independently of SavedTensorsMeter: every
    storage once, parameters and buffers excluded."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept, seen = [], {}

    def pack(t):
        kept.append(t)
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            seen[s.data_ptr()] = s.nbytes()
        return t

    from minilora.trainer import token_loss_sum

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = token_loss_sum(model, batch, packed=False)
    return sum(seen.values()), loss


@pytest.mark.parametrize("family,targets,dropout", [
    ("llama", ALL, 0.0), ("llama", ("v_proj", "down_proj"), 0.1), ("llama", ("up_proj", "lm_head"), 0.1),
    ("qwen2", ALL, 0.1),
    ("gemma", ("q_proj", "up_proj"), 0.0), ("gemma2", ALL, 0.1),
    ("gemma2", ("v_proj",), 0.0), ("gemma3_text", ("o_proj", "up_proj"), 0.0), ("phi3", ALL, 0.1)])
def test_memory_estimate_equals_measurement(checkpoints, family, targets, dropout):
    directory, _ = checkpoints[family]
    B, T, r = 2, 12, 4
    config = load_config(directory)
    est = ins.estimate_memory(ins.meta_model(config, r, 8, targets, dropout), r, dropout, B, T, torch.float32, CPU)
    got = ins.measure_training_step(directory, r, 8, dropout, targets, B, T, torch.float32, "cpu")
    for key in ("nf4_packed", "nf4_stats", "float_weights", "lora_weights", "gradients", "adamw_state",
                "activations", "activations_checkpointed"):
        assert est[key] == got[key], f"{family} {targets}: {key} estimated {est[key]}, measured {got[key]}"
    detail = est["activation_detail"]
    assert [sum(b.values()) for b in detail["blocks"]] == got["activation_blocks"]
    assert (detail["head"], detail["inputs"]) == (got["activation_head"], got["activation_inputs"])
    assert est["activations_checkpointed"] < est["activations"]

    # the measurement itself, against a direct count and the parameter counts
    model, _ = load_model(directory, quantize="nf4")
    apply_lora(model, r, 8, dropout, targets)
    model.train()
    ids = torch.randint(0, config.vocab_size, (B, T))
    batch = {"input_ids": ids, "labels": torch.cat([ids[:, 1:], torch.full((B, 1), -100)], 1)}
    saved, loss = _saved_bytes(model, batch)
    assert got["activations"] == saved
    n_lora, n_tensors = _trainable(model), sum(1 for p in model.parameters() if p.requires_grad)
    assert got["lora_weights"] == got["gradients"] == 4 * n_lora
    assert got["adamw_state"] == 8 * n_lora + 4 * n_tensors
    # the head keeps the fp32 log-softmax of the (B*T, V) logits at least
    assert detail["head"] >= B * T * config.vocab_size * 4


@pytest.mark.gpu
@pytest.mark.parametrize("family,targets,dropout,B,T", [
    ("llama", ALL, 0.1, 2, 12), ("gemma2", ("v_proj", "down_proj"), 0.0, 2, 12), ("gemma3_text", ALL, 0.0, 2, 12),
    ("phi3", ("o_proj", "up_proj"), 0.1, 2, 12),
    ("llama", ALL, 0.0, 4, 32)])  # >= kernels/lora.py MERGE_MIN_ROWS: merged-weight nodes (in % 64 == 0: not down_proj)
def test_memory_estimate_equals_measurement_on_cuda(checkpoints, device, family, targets, dropout, B, T):
    """bf16 autocast, fp32 LoRA and the Triton training kernels, as trainer.py runs on a GPU."""
    directory, _ = checkpoints[family]
    config = load_config(directory)
    est = ins.estimate_memory(ins.meta_model(config, 4, 8, targets, dropout), 4, dropout, B, T, torch.bfloat16, device)
    got = ins.measure_training_step(directory, 4, 8, dropout, targets, B, T, torch.bfloat16, device)
    for key in ("nf4_packed", "nf4_stats", "float_weights", "adamw_state", "activations", "activations_checkpointed"):
        assert est[key] == got[key], f"{family} {targets}: {key} estimated {est[key]}, measured {got[key]}"
    assert [sum(b.values()) for b in est["activation_detail"]["blocks"]] == got["activation_blocks"]
    assert 0 < got["cuda_peak_activations_checkpointed"] < got["cuda_peak_activations"]

def test_quantization_errors_match_the_loaded_nf4_model(checkpoints):
    directory, _ = checkpoints["phi3"]  # fused qkv / gate_up: the streamed rows must be the split ones
    config = load_config(directory)
    rows = ins.quantization_errors(directory, config, torch.float32)
    floats = dict(load_model(directory)[0].named_parameters())
    nf4 = {n: m for n, m in load_model(directory, quantize="nf4")[0].named_modules() if isinstance(m, Linear4bit)}
    assert sorted(r["name"] for r in rows) == sorted(nf4)
    for row in rows:
        w = floats[row["name"] + ".weight"].detach()
        err = nf4[row["name"]].dequantize() - w
        assert row["shape"] == list(w.shape)
        assert row["rel_fro"] == pytest.approx((err.norm() / w.norm()).item(), rel=1e-6)
        assert row["max_abs"] == pytest.approx(err.abs().max().item(), rel=1e-6)
        assert row["max_weight"] == w.abs().max().item()
    assert [r["rel_fro"] for r in rows] == sorted((r["rel_fro"] for r in rows), reverse=True)
    only = ins.quantization_errors(directory, config, torch.float32, blocks={1})
    assert {r["name"] for r in only} == {n for n in nf4 if n.startswith("model.layers.1.")}


def test_effective_rank():
    assert ins.effective_rank(torch.tensor([2.0, 2.0, 2.0])) == (pytest.approx(3.0), 3)
    assert ins.effective_rank(torch.tensor([5.0, 0.0, 0.0])) == (pytest.approx(1.0), 1)
    assert ins.effective_rank(torch.zeros(4)) == (0.0, 0)
    s = torch.tensor([1.0, 0.5, 0.005])
    p = s / s.sum()
    assert ins.effective_rank(s) == (pytest.approx(math.exp(-(p * p.log()).sum().item())), 2)


def test_adapter_updates_against_full_svd(checkpoints, tmp_path):
    directory, _ = checkpoints["llama"]
    model, _ = load_model(directory)
    floats = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, 4, 6.0, targets=("q_proj", "down_proj", "lm_head"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
                if "layers.1." in name:
                    p[:, 2:] = 0  # a rank-2 update: effective rank must see it
    save_adapter(model, tmp_path / "adapter")
    rep = ins.adapter_updates(directory, load_config(directory), str(tmp_path / "adapter"))
    assert rep["scaling"] == 6.0 / 4
    modules = dict(model.named_modules())
    assert {u["name"] for u in rep["layers"]} == {n for n in modules if n.endswith(("q_proj", "down_proj", "lm_head"))}
    for u in rep["layers"]:
        m = modules[u["name"]]
        delta = (m.lora_B.double() @ m.lora_A.double()) * 1.5
        s = torch.linalg.svdvals(delta)
        w = floats["model.embed_tokens.weight" if u["name"] == "lm_head" else u["name"] + ".weight"]  # tied head
        assert u["update_fro"] == pytest.approx(delta.norm().item(), rel=1e-9)
        assert u["weight_fro"] == pytest.approx(w.norm().item(), rel=1e-6)
        assert u["relative"] == pytest.approx(delta.norm().item() / w.norm().item(), rel=1e-6)
        assert torch.allclose(torch.tensor(u["singular_values"], dtype=torch.float64), s[:4], rtol=1e-9, atol=1e-12)
        erank, rank_1pct = ins.effective_rank(s[:4])
        assert (u["erank"], u["rank_1pct"]) == (pytest.approx(erank, rel=1e-9), rank_1pct)
        assert u["rank_1pct"] == (2 if "layers.1." in u["name"] else 4)
    assert [u["relative"] for u in rep["layers"]] == sorted((u["relative"] for u in rep["layers"]), reverse=True)


def test_cli_text_json_and_plot(checkpoints, tmp_path, capsys):
    directory, _ = checkpoints["gemma3_text"]
    args = ["--model", directory, "--rank", "4", "--batch", "2", "--seq-len", "8", "--device", "cpu", "--measure"]
    assert ins.main(args + ["--json", "--plot", str(tmp_path / "out.png")]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    est, got = rep["memory"]["estimated"], rep["memory"]["measured"]
    assert est["activations"] == got["activations"] and rep["settings"]["r"] == 4
    assert len(rep["nf4_error"]) == 7 * load_config(directory).num_hidden_layers
    assert ins.main(args + ["--top", "3"]) == 0
    text = capsys.readouterr().out
    for heading in ("Parameters", "Memory of one training step", "NF4 quantization error, worst 3 of"):
        assert heading in text
    assert f"{rep['parameters']['total']:,}" in text


def test_cli_errors_name_the_problem(checkpoints, capsys):
    directory, _ = checkpoints["llama"]
    assert ins.main(["--model", directory, "--targets", "qkv_proj", "--no-errors"]) == 1
    err = capsys.readouterr().err
    assert "qkv_proj" in err and "q_proj" in err  # the bad target and the names that exist
    assert ins.main(["--model", directory, "--batch", "0", "--no-errors"]) == 1
    assert "--batch 0" in capsys.readouterr().err


@pytest.mark.real
def test_smollm2_135m():
    directory = real_checkpoint("smollm2-135m-instruct")
    config = load_config(directory)
    model, _ = load_model(directory)
    counts = ins.count_parameters(ins.meta_model(config, 8, 16, ALL))
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    rows = ins.quantization_errors(directory, config, torch.float32, blocks={0})
    from minilora.nf4 import dequantize_nf4, quantize_nf4

    params = dict(model.named_parameters())
    for row in rows:
        w = params[row["name"] + ".weight"].detach()
        err = dequantize_nf4(quantize_nf4(w), torch.float32) - w
        assert row["rel_fro"] == pytest.approx((err.norm() / w.norm()).item(), rel=1e-6)
        assert row["max_abs"] == pytest.approx(err.abs().max().item(), rel=1e-6)
        assert 0.05 < row["rel_fro"] < 0.15  # NF4 on a trained bf16 weight: about 10% relative error
    del model, params
    est = ins.estimate_memory(ins.meta_model(config, 8, 16, ALL, 0.1), 8, 0.1, 1, 16, torch.float32, CPU)
    got = ins.measure_training_step(directory, 8, 16, 0.1, ALL, 1, 16, torch.float32, "cpu")
    for key in ("nf4_packed", "nf4_stats", "float_weights", "lora_weights", "adamw_state", "activations",
                "activations_checkpointed"):
        assert est[key] == got[key], f"{key}: estimated {est[key]}, measured {got[key]}"


def test_prequantized_checkpoint_has_no_float_original(checkpoints, tmp_path, capsys):
    from minilora.weights import save_quantized

    directory, _ = checkpoints["llama"]
    save_quantized(load_model(directory, quantize="nf4")[0], tmp_path / "q4")
    args = ["--model", str(tmp_path / "q4"), "--rank", "4", "--batch", "1", "--seq-len", "8"]
    assert ins.main(args) == 1
    assert "pre-quantized" in capsys.readouterr().err
    assert ins.main(args + ["--no-errors", "--json"]) == 0  # counts and estimates need only config.json
    rep = json.loads(capsys.readouterr().out)
    expected = ins.count_parameters(ins.meta_model(load_config(directory), 4, 8, ALL))
    assert rep["parameters"]["total"] == expected["total"]


def test_peft_adapter_on_phi3_fused_layers(checkpoints, tmp_path):
    """peft names Phi-3's fused qkv_proj / gate_up_proj: ||W|| is the fused weight's, B A spans its rows."""
    from peft import LoraConfig, get_peft_model

    directory, hf = checkpoints["phi3"]
    fused = {n: p.detach().clone() for n, p in hf.named_parameters()}
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"])
    peft_model = get_peft_model(copy.deepcopy(hf), lora_config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    peft_model.save_pretrained(tmp_path / "adapter")
    rep = ins.inspect_model(directory, adapter=str(tmp_path / "adapter"), batch=1, seq_len=4, errors=False)
    modules = dict(peft_model.named_modules())
    assert len(rep["adapter"]["layers"]) == 2 * load_config(directory).num_hidden_layers
    for u in rep["adapter"]["layers"]:
        m = modules["base_model.model." + u["name"]]
        delta = (m.lora_B.default.weight.double() @ m.lora_A.default.weight.double()) * 2.0
        assert u["update_fro"] == pytest.approx(delta.norm().item(), rel=1e-9)
        assert u["weight_fro"] == pytest.approx(fused[u["name"] + ".weight"].norm().item(), rel=1e-6)
    # the memory estimate is for our split layers: q, k, v, gate, up each get their own A
    split = ins.meta_model(load_config(directory), 4, 8, ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
    assert rep["parameters"]["lora"] == ins.count_parameters(split)["lora"]


def test_uncheckpointed_blocks_keep_their_activations_and_change_no_gradient(checkpoints):
    """model.uncheckpointed_blocks = n: the last n blocks keep exactly their activations (the no-checkpointing
    bytes of those blocks), every gradient is unchanged, and the estimate's peak follows."""
    directory, _ = checkpoints["llama"]
    config = load_config(directory)
    L, B, T, r = config.num_hidden_layers, 2, 12, 4
    model, _ = load_model(directory, quantize="nf4")
    apply_lora(model, r, 8, 0.0, ALL)
    for m in model.modules():  # B starts at zero; random values make every gradient non-trivial
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B, std=0.1)
    model.train()
    ids = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "labels": torch.cat([ids[:, 1:], torch.full((B, 1), -100)], 1)}
    params = [p for p in model.parameters() if p.requires_grad]

    def run(checkpointing, n):
        model.gradient_checkpointing, model.uncheckpointed_blocks = checkpointing, n
        model.zero_grad(set_to_none=True)
        saved, loss = _saved_bytes(model, batch)
        loss.backward()
        return saved, [p.grad.clone() for p in params]

    everything, reference = run(False, 0)
    blocks = [sum(b.values()) for b in
              ins.estimate_memory(ins.meta_model(config, r, 8, ALL), r, 0.0, B, T, torch.float32, CPU)
              ["activation_detail"]["blocks"]]
    kept, _ = run(True, 0)
    for n in range(1, L + 1):
        saved, grads = run(True, n)
        for p, g, want in zip(params, grads, reference):
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6)
        est = ins.estimate_memory(ins.meta_model(config, r, 8, ALL), r, 0.0, B, T, torch.float32, CPU, n)
        if n == L:  # nothing checkpointed: exactly the plain step (the first block's input is then not kept)
            assert saved == everything == est["activations_checkpointed"] == est["activations"]
            continue
        assert saved == kept + sum(blocks[L - n:]), n
        assert est["activations_checkpointed"] == kept + max(sum(blocks[L - n:]), max(blocks[:L - n]))


def test_estimate_counts_the_merged_weights_a_recomputation_keeps(checkpoints):
    """kernels/lora.py hands a recomputed block's W + s B A to its backward: one block's merged layers in the compute
    dtype, on the CUDA Triton path only, without dropout, from MERGE_MIN_ROWS rows; preflight adds it under
    checkpointing. Tiny Llama (width 64, 2 kv heads of 16, MLP 96): q, o 64x64, k, v 32x64, gate, up 96x64 merge;
    down_proj (in 96) and everything on the CPU do not."""
    directory, _ = checkpoints["llama"]
    config = load_config(directory)
    meta = ins.meta_model(config, 4, 8, ALL, 0.0)
    cuda = torch.device("cuda")
    est = ins.estimate_memory(meta, 4, 0.0, 4, 32, torch.bfloat16, cuda)
    assert est["recompute_weights"] == 2 * (64 * 64 * 2 + 32 * 64 * 2 + 96 * 64 * 2)
    assert ins.estimate_memory(meta, 4, 0.0, 4, 32, torch.bfloat16, torch.device("cpu"))["recompute_weights"] == 0
    assert ins.estimate_memory(meta, 4, 0.0, 2, 12, torch.bfloat16, cuda)["recompute_weights"] == 0  # 24 rows
    assert ins.estimate_memory(meta, 4, 0.0, 4, 32, torch.bfloat16, cuda, 3)["recompute_weights"] == 0  # none recompute
    dropped = ins.meta_model(config, 4, 8, ALL, 0.1)
    assert ins.estimate_memory(dropped, 4, 0.1, 4, 32, torch.bfloat16, cuda)["recompute_weights"] == 0
    with_head = ins.meta_model(config, 4, 8, ALL + ("lm_head",), 0.0)  # a LoRA head is no block layer
    assert ins.estimate_memory(with_head, 4, 0.0, 4, 32, torch.bfloat16, cuda)["recompute_weights"] == est["recompute_weights"]
