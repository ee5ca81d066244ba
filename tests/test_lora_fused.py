"""kernels/lora.py: the fused LoRA linear vs its autograd reference, float and NF4 bases, with/without dropout."""
import pytest
import torch
from torch import nn

from minilora.kernels.lora import lora_linear, lora_linear_torch
from minilora.nf4 import Linear4bit


def _base(kind, n, k, bias, device):
    linear = nn.Linear(k, n, bias=bias, device=device)
    if kind == "nf4":
        return Linear4bit.from_weight(linear.weight.detach(), linear.bias, dtype=torch.float32, backend="torch")
    return linear.requires_grad_(False)


def _compare(x, base, a, b, mask, p, atol, rtol):
    results = []
    for fn in (lora_linear_torch, lora_linear):
        xi, ai, bi = (t.detach().clone().requires_grad_() for t in (x, a, b))
        y = fn(xi, base, ai, bi, 0.75, mask, p)
        y.backward(torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape))
        results.append((y.detach(), xi.grad, ai.grad, bi.grad))
    for name, ref, got in zip(("y", "dx", "dA", "dB"), *results):
        diff = (got.float() - ref.float()).abs()
        assert torch.allclose(got.float(), ref.float(), atol=atol, rtol=rtol), f"{name}: max {diff.max():.3e} mean {diff.mean():.3e}"


@pytest.mark.parametrize("kind", ["float", "nf4"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_matches_reference_fp32(kind, dropout):
    M, K, N, r = 13, 70, 37, 5  # odd sizes, K not a multiple of the NF4 block
    base = _base(kind, N, K, bias=True, device="cpu")
    x, a, b = torch.randn(2, M, K), torch.randn(r, K) / K ** 0.5, torch.randn(N, r)
    mask = (torch.rand(2, M, K) >= dropout) if dropout else None
    _compare(x, base, a, b, mask, dropout, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_merged_weight_path_matches_reference_fp32(monkeypatch, bias):
    """No dropout, an NF4 base on the Triton backend and >= MERGE_MIN_ROWS rows: the node multiplies by W + s B A
    (kernels/nf4_dequant.py, CPU interpreter) in the forward and the input gradient; same numbers as the reference."""
    import minilora.kernels.lora as fused
    import minilora.kernels.nf4_dequant as dequant

    calls = []
    real = dequant.dequantize_nf4_lora
    monkeypatch.setattr(dequant, "dequantize_nf4_lora", lambda *a: calls.append(a[0].shape) or real(*a))
    M, K, N, r = fused.MERGE_MIN_ROWS + 3, 192, 37, 5
    linear = nn.Linear(K, N, bias=bias)
    base = Linear4bit.from_weight(linear.weight.detach(), linear.bias, dtype=torch.float32, backend="triton")
    x, a, b = torch.randn(M, K), torch.randn(r, K) / K ** 0.5, torch.randn(N, r)
    _compare(x, base, a, b, None, 0.0, atol=1e-5, rtol=1e-5)
    assert calls == [torch.Size((N, K))] * 2  # forward and dx, nothing else dequantized the weight
    calls.clear()
    _compare(x[:fused.MERGE_MIN_ROWS - 1], base, a, b, None, 0.0, atol=1e-5, rtol=1e-5)  # few rows: LoRA branch
    _compare(x[:2], base, a, b, None, 0.0, atol=1e-5, rtol=1e-5)  # decoding: the base takes the 4-bit GEMV
    assert calls == []


def test_shapes_are_checked():
    base = _base("float", 8, 6, bias=False, device="cpu")
    with pytest.raises(ValueError, match="do not chain"):
        lora_linear(torch.randn(3, 6), base, torch.randn(2, 5), torch.randn(8, 2), 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["float", "nf4"])
def test_fused_lora_under_bf16_autocast(kind, device):
    """bf16 fused path vs an fp32 computation on the same (bf16) inputs and the same dequantized weight."""
    M, K, N, r = 257, 384, 320, 16
    if kind == "nf4":
        base = Linear4bit.from_weight(torch.randn(N, K, device=device, dtype=torch.bfloat16) / 20, None, backend="triton")
        w32 = base.dequantize().float()
    else:
        base = nn.Linear(K, N, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)
        w32 = base.weight.float()
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    a, b = torch.randn(r, K, device=device) / K ** 0.5, torch.randn(N, r, device=device) / r ** 0.5
    g = torch.randn(M, N, device=device)
    xs, As, Bs = (t.detach().clone().requires_grad_() for t in (x, a, b))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = lora_linear(xs, base, As, Bs, 0.75)
    y.backward(g.to(y.dtype))
    x32, A32, B32 = (t.detach().float().requires_grad_() for t in (x, a.to(torch.bfloat16), b.to(torch.bfloat16)))
    y32 = x32 @ w32.t() + (x32 @ A32.t()) @ B32.t() * 0.75
    y32.backward(g.to(torch.bfloat16).float())
    for name, got, ref in (("y", y, y32), ("dx", xs.grad, x32.grad), ("dA", As.grad, A32.grad), ("dB", Bs.grad, B32.grad)):
        rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        # bf16 inputs/outputs with fp32 accumulation: relative error ~ a few bf16 ulps (2^-8 = 0.4%)
        assert rel < 1e-2, f"{kind} {name}: relative Frobenius error {rel:.2e}"


def test_checkpoint_recompute_skips_the_discarded_down_proj_gemm(monkeypatch, tmp_path):
    """Under gradient checkpointing a block's recomputation calls the fused down_proj with output=False (its
    output is discarded) and every gradient equals the un-checkpointed step's, dropout included."""
    import minilora.kernels.lora as fused
    import minilora.lora as lora
    from minilora.loading import load_model
    from tiny import make_checkpoint

    make_checkpoint("llama", tmp_path)
    model, _ = load_model(str(tmp_path), quantize="nf4")
    lora.apply_lora(model, 4, 8, dropout=0.1)
    for m in lora.lora_modules(model).values():
        nn.init.normal_(m.lora_B, std=0.1)
    model.train()
    monkeypatch.setattr(lora, "_fused", lambda x: True)  # the CUDA path, in plain torch on the CPU
    calls = []

    def recording(*args, output=True, **kwargs):
        calls.append(output)
        return fused_linear(*args, output=output, **kwargs)

    fused_linear = fused.lora_linear
    monkeypatch.setattr(fused, "lora_linear", recording)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = {}
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        calls.clear()
        torch.manual_seed(1)  # the same dropout masks in both runs
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        grads[checkpointing] = [p.grad.clone() for p in params]
        skipped = calls.count(False)
        assert skipped == (model.config.num_hidden_layers if checkpointing else 0), calls
    for got, want in zip(grads[True], grads[False]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_checkpoint_recompute_hands_its_merged_weight_to_the_backward(monkeypatch, tmp_path):
    """Merged-weight nodes (NF4 on the Triton backend, CPU interpreter, no dropout, >= MERGE_MIN_ROWS rows): under
    gradient checkpointing the recomputation's W + s B A serves the backward's dx, so each merged layer dequantizes
    twice a step, as without checkpointing, not three times; the gradients equal the un-checkpointed step's. A kept
    weight made stale by an optimizer step is not used."""
    import minilora.kernels.lora as fused
    import minilora.kernels.nf4_dequant as dequant
    import minilora.lora as lora
    from minilora.loading import load_model
    from tiny import make_checkpoint

    make_checkpoint("llama", tmp_path)  # hidden 64: q/k/v/o/gate/up merge; down_proj (in 96) takes the LoRA branch
    model, _ = load_model(str(tmp_path), quantize="nf4", backend="triton")
    lora.apply_lora(model, 4, 8)
    for m in lora.lora_modules(model).values():
        nn.init.normal_(m.lora_B, std=0.1)
    model.train()
    monkeypatch.setattr(lora, "_fused", lambda x: True)
    calls = []
    real = dequant.dequantize_nf4_lora
    monkeypatch.setattr(dequant, "dequantize_nf4_lora", lambda *a: calls.append(a[0].shape) or real(*a))
    ids = torch.randint(0, model.config.vocab_size, (2, fused.MERGE_MIN_ROWS // 2 + 1),
                        generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = {}
    merged_layers = 6 * model.config.num_hidden_layers
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        calls.clear()
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        grads[checkpointing] = [p.grad.clone() for p in params]
        # forward (and recomputation) once per merged layer, dx once per merged layer but block 0's q/k/v (their
        # input, the frozen embedding's output, needs no gradient); without the hand-over: + 6 per block
        assert len(calls) == 2 * merged_layers - (0 if checkpointing else 3), (checkpointing, len(calls))
    for got, want in zip(grads[True], grads[False]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a weight kept by a recomputation whose backward never ran, then an optimizer step: made again, not reused
    q_proj = model.model.layers[0].self_attn.q_proj
    stale = torch.full((q_proj.out_features, q_proj.in_features), float("nan"))
    q_proj.base_layer.kept_merged_weight = (q_proj.lora_A._version, q_proj.lora_B._version, stale)
    with torch.no_grad():
        q_proj.lora_A.add_(0.01)
    model.gradient_checkpointing = False
    model.zero_grad(set_to_none=True)
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    assert all(torch.isfinite(p.grad).all() for p in params)
    assert q_proj.base_layer.kept_merged_weight is None
