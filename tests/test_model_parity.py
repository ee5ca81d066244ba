"""minilora's model vs transformers on tiny random checkpoints of every family (fp32).

The checkpoints are written by transformers' save_pretrained, so these also test the loader.
"""
import pytest
import torch

from minilora import load_model
from minilora.model import KVCache
from tiny import FAMILIES, make_checkpoint

ATOL = 1e-4  # fp32 end to end; the two implementations differ only in summation order


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = make_checkpoint(request.param, directory, seed=FAMILIES.index(request.param))
    model, tokenizer = load_model(str(directory), dtype=torch.float32, device="cpu")
    return request.param, hf, model, tokenizer


def _report(a, b):
    d = (a - b).abs()
    return f"max abs diff {d.max().item():.3e}, mean {d.mean().item():.3e}"


def test_logits_match_transformers(pair):
    family, hf, model, _ = pair
    ids = torch.randint(3, 320, (2, 13))  # longer than every sliding window of the tiny configs
    with torch.no_grad():
        expected, got = hf(ids).logits, model(ids)
    assert got.shape == (2, 13, 320)
    assert torch.allclose(got, expected, atol=ATOL, rtol=0), f"{family}: {_report(got, expected)}"


def test_deferred_residual_adds_give_the_same_logits(pair):
    """Without autograd each block's last residual add is done by the next norm (Block._forward_deferred); the
    adds and norms are the same operations in the same order, so the logits equal the autograd path's exactly."""
    family, _, model, _ = pair
    ids = torch.randint(3, 320, (2, 13))
    with torch.no_grad():
        deferred = model(ids)
    with torch.enable_grad():
        plain = model(ids).detach()
    assert torch.equal(deferred, plain), f"{family}: {_report(deferred, plain)}"


def _greedy_with_cache(model, prompt, new_tokens):
    cache = KVCache(model.config, 1, prompt.shape[1] + new_tokens, "cpu", torch.float32)
    out = []
    logits = model(prompt, cache=cache)
    for _ in range(new_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token.item())
        logits = model(token, cache=cache)
    return out


def test_greedy_continuation_matches_transformers(pair):
    family, hf, model, tokenizer = pair
    prompt = torch.tensor([tokenizer.encode("def add(a, b):", add_special_tokens=True)])
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        got = _greedy_with_cache(model, prompt, 8)
    assert got == expected[0, prompt.shape[1]:].tolist(), family


def test_packed_rows_do_not_see_each_other(pair):
    family, _, model, _ = pair
    a, b = torch.randint(3, 320, (1, 5)), torch.randint(3, 320, (1, 9))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(9)])[None]
    segments = torch.tensor([[1] * 5 + [2] * 9])
    with torch.no_grad():
        got = model(packed, positions=positions, segments=segments)
        expected = torch.cat([model(a), model(b)], dim=1)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), f"{family}: {_report(got, expected)}"


def test_left_padded_batch_matches_single_rows(pair):
    family, _, model, _ = pair
    short, long = torch.randint(3, 320, (1, 4)), torch.randint(3, 320, (1, 10))
    batch = torch.cat([torch.cat([torch.zeros(1, 6, dtype=torch.long), short], 1), long])
    valid = batch.ne(0) | torch.tensor([[False] * 6 + [True] * 4, [True] * 10])
    positions = (valid.cumsum(-1) - 1).clamp(min=0)
    segments = valid.long()  # padding is segment 0, so it never mixes with real tokens
    with torch.no_grad():
        got = model(batch, positions=positions, segments=segments)
        assert torch.allclose(got[0, 6:], model(short)[0], atol=1e-5, rtol=0), family
        assert torch.allclose(got[1], model(long)[0], atol=1e-5, rtol=0), family


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_triton_training_path_matches_torch_path(family, tmp_path, device):
    """On CUDA the model's Triton RMSNorm/RoPE/GLU/fused-CE path gives the torch path's loss and gradients."""
    from minilora.kernels.backend import set_backend

    make_checkpoint(family, tmp_path, seed=FAMILIES.index(family))
    model, _ = load_model(str(tmp_path), dtype=torch.float32, device=device)
    ids = torch.randint(3, 320, (2, 13), device=device)
    labels = torch.randint(3, 320, (2, 13), device=device)
    labels[:, :4] = -100
    results = {}
    try:
        for backend in ("torch", "triton"):
            set_backend(backend)
            model.zero_grad()
            loss = model.loss(ids, labels)
            loss.backward()
            results[backend] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    finally:
        set_backend("auto")
    (loss_ref, grads_ref), (loss_fast, grads_fast) = results["torch"], results["triton"]
    assert torch.allclose(loss_fast, loss_ref, rtol=1e-5, atol=1e-5), (loss_fast, loss_ref)
    for name, g in grads_ref.items():  # fp32 with different summation orders in the kernels' reductions
        assert torch.allclose(grads_fast[name], g, rtol=1e-4, atol=1e-5), f"{family} {name}: {_report(grads_fast[name], g)}"
