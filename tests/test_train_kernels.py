"""The Triton training kernels (RMSNorm, RoPE, SwiGLU/GeGLU, fused linear + cross-entropy) vs torch.

CPU: the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), fp32 and fp16 (numpy, which the
interpreter computes with, has no bf16), tiny odd shapes that are no multiple of any block. `-m gpu`: the
same checks compiled on CUDA, bf16 too, at shapes near the real models'.

Each check draws fresh random inputs and compares
- the forward with the plain-torch reference in the same dtype (HF's numerics, roundings included), and
- every gradient with float64 autograd through the reference on the same inputs (the truth that both
  the kernel and a low-precision autograd approximate; it plays gradcheck's part, since the kernels
  compute in fp32 and so cannot take float64 finite differences).
"""
import pytest
import torch
import torch.nn.functional as F

from minilora.kernels.cross_entropy import linear_cross_entropy_torch, linear_cross_entropy_triton
from minilora.kernels.glu import geglu_torch, geglu_triton, swiglu_torch, swiglu_triton
from minilora.kernels.rmsnorm import rms_norm_torch, rms_norm_triton
from minilora.kernels.rope import rope_cos_sin_triton, rope_torch, rope_triton
from minilora.config import RopeConfig
from minilora.model import rope_cos_sin, rope_inverse_frequencies

CPU_DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(actual, expected, dtype, name, ulps=4, sum_length=1):
    """|actual - expected| <= tol * (|expected| + max|expected|),
    tol = ulps * eps(dtype) + 2 sqrt(sum_length) * eps(fp32).

    PyTorch's per-dtype defaults are about one rounding; these kernels round once in fp32 where torch
    rounds after every 16-bit op, and sum in another order, so a few roundings are allowed. The term in
    max|expected| is there because a rounding error scales with the operands, not with a result that
    cancels (x1 c1 - x2 s1, dh - h mean(dh h)). A value that is an fp32 sum of `sum_length` terms (the
    V-long dot products of grad_hidden) carries a rounding error that grows like sqrt(sum_length).
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.double(), expected.double()
    tol = ulps * torch.finfo(dtype).eps + 2 * sum_length ** 0.5 * torch.finfo(torch.float32).eps
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual - expected).abs()
    bad = diff > tol * (expected.abs() + scale)
    assert not bad.any(), (f"{name} ({dtype}): {int(bad.sum())} of {diff.numel()} elements off; max diff "
                           f"{diff.max().item():.3g}, mean diff {diff.mean().item():.3g}, max |expected| "
                           f"{scale:.3g}, allowed {tol:.3g} * (|expected| + {scale:.3g})")


def _leaf(tensor, requires_grad=True):
    return tensor.detach().clone().requires_grad_(requires_grad)


def check_gradients(triton_fn, torch_fn, inputs, dtype, name, grad_ulps=8, torch_fn64=None, sum_length=1):
    """Forward vs torch_fn in dtype; every gradient vs float64 autograd of torch_fn64 (default torch_fn).

    Each floating input's requires_grad says whether its gradient is checked.
    """
    ours = [_leaf(x, x.requires_grad) if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs]
    ref64 = [_leaf(x.double(), x.requires_grad) if torch.is_tensor(x) and x.is_floating_point() else x
             for x in inputs]
    plain = [x.detach() if torch.is_tensor(x) else x for x in inputs]

    out = triton_fn(*ours)
    expected = torch_fn(*plain)
    outs, expecteds = (out, expected) if isinstance(out, tuple) else ((out,), (expected,))
    for i, (o, e) in enumerate(zip(outs, expecteds)):
        assert o.dtype == e.dtype, f"{name} output {i}: dtype {o.dtype}, reference {e.dtype}"
        assert_close(o, e, dtype, f"{name} output {i}")

    out64 = (torch_fn64 or torch_fn)(*ref64)
    outs64 = out64 if isinstance(out64, tuple) else (out64,)
    grad_outs = [torch.randn(o.shape, dtype=torch.float64, device=o.device) for o in outs]
    torch.autograd.backward([o.float() for o in outs], [g.to(o.dtype).float() for g, o in zip(grad_outs, outs)])
    torch.autograd.backward(outs64, [g.to(o.dtype).double() for g, o in zip(grad_outs, outs)])
    checked = 0
    for i, (x, x64) in enumerate(zip(ours, ref64)):
        if torch.is_tensor(x) and x.requires_grad:
            assert x.grad is not None, f"{name}: no gradient for input {i}"
            assert x.grad.dtype == x.dtype, f"{name}: gradient {i} dtype {x.grad.dtype}, input {x.dtype}"
            assert_close(x.grad, x64.grad, dtype, f"{name} grad of input {i}", ulps=grad_ulps,
                         sum_length=sum_length)
            checked += 1
        elif torch.is_tensor(x) and x.is_floating_point():
            assert x.grad is None, f"{name}: input {i} needs no gradient but got one"
    return checked


# ---------------------------------------------------------------- RMSNorm
def _rms_norm_case(device, dtype, shape, unit_offset, weight_grad, weight_dtype=None):
    D = shape[-1]
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(D, device=device) * 0.2 + (0.0 if unit_offset else 1.0)).to(weight_dtype or dtype)
    weight.requires_grad_(weight_grad)
    fn = lambda x, w: rms_norm_triton(x, w, 1e-6, unit_offset)  # noqa: E731
    ref = lambda x, w: rms_norm_torch(x, w, 1e-6, unit_offset)  # noqa: E731
    assert check_gradients(fn, ref, [x, weight], dtype, "rms_norm") == 1 + weight_grad


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_rms_norm(dtype, unit_offset, weight_grad):
    _rms_norm_case("cpu", dtype, (2, 13, 40), unit_offset, weight_grad)


def test_rms_norm_fp32_weight_on_fp16_input():
    # Llama with an fp32 weight: y is fp32 (torch's type promotion), h still rounded to fp16 first
    _rms_norm_case("cpu", torch.float16, (13, 40), False, True, weight_dtype=torch.float32)


def test_rms_norm_frozen_weight_and_input():
    # only the weight needs a gradient: dx is skipped, dweight still right
    x = torch.randn(7, 40)
    weight = torch.randn(40, requires_grad=True)
    rms_norm_triton(x, weight, 1e-5).sum().backward()
    weight64 = _leaf(weight.double())
    rms_norm_torch(x.double(), weight64, 1e-5).sum().backward()
    assert_close(weight.grad, weight64.grad, torch.float32, "rms_norm dweight")


# ---------------------------------------------------------------- RoPE
def _rope_case(device, dtype, B, Hq, Hk, T, Dh, cos_batch, transposed_q):
    if transposed_q:  # what view(B, T, H, Dh).transpose(1, 2) of a projection gives: not contiguous
        q = torch.randn(B, T, Hq, Dh, device=device).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, T, Dh, device=device).to(dtype)
    k = torch.randn(B, Hk, T, Dh, device=device).to(dtype)
    # random cos and sin, halves unequal: checks the kernel for any values, not only HF's cat(f, f)
    cos = torch.randn(cos_batch, T, Dh, device=device).to(dtype)
    sin = torch.randn(cos_batch, T, Dh, device=device).to(dtype)
    q.requires_grad_(), k.requires_grad_()
    assert check_gradients(rope_triton, rope_torch, [q, k, cos, sin], dtype, "rope") == 2


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("cos_batch,transposed_q", [(2, True), (1, False)])
def test_rope(dtype, cos_batch, transposed_q):
    _rope_case("cpu", dtype, B=2, Hq=3, Hk=1, T=13, Dh=10, cos_batch=cos_batch, transposed_q=transposed_q)


def test_rope_keeps_strides_and_inverts_hf_rotation():
    # with HF's cos = cat(f, f), sin = cat(f, f) the backward is the inverse rotation: grad of <q', q'>
    # w.r.t. q is 2 q, as a rotation keeps norms
    T, Dh = 11, 12
    freqs = torch.randn(1, T, Dh // 2)
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    q = torch.randn(1, T, 3, Dh).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 1, T, Dh, requires_grad=True)
    q_out, k_out = rope_triton(q, k, cos, sin)
    assert q_out.stride() == q.stride(), f"q' strides {q_out.stride()}, q strides {q.stride()}"
    ((q_out ** 2).sum() + (k_out ** 2).sum()).backward()
    assert_close(q.grad, 2 * q.detach(), torch.float32, "rope grad of |q'|^2")
    assert_close(k.grad, 2 * k.detach(), torch.float32, "rope grad of |k'|^2")


def _cos_sin_case(device, dtype, exact):
    """rope_cos_sin_triton vs model.rope_cos_sin on Llama 3's rescaled frequencies, positions up to 10^5 (where
    the fp32 angle's rounding matters most), a strided (B, T) view, and one row. exact: the GPU, where both call the
    same CUDA math functions and round to nearest; the interpreter's numpy cos/sin and its truncating cast to 16
    bits may differ by an ulp of fp32 and one of the dtype."""
    rope = RopeConfig(kind="llama3", theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)
    inv_freq = rope_inverse_frequencies(rope, 128).to(device)
    wide = torch.randint(0, 100_000, (3, 41), device=device)
    for positions in (wide[:, 1:40:2], wide[:1, :1], torch.arange(257, device=device)[None]):
        ours, expected = rope_cos_sin_triton(inv_freq, positions, dtype), rope_cos_sin(inv_freq, positions, dtype)
        for got, want, name in zip(ours, expected, ("cos", "sin")):
            assert got.shape == want.shape and got.dtype == dtype
            if exact:
                assert torch.equal(got, want), f"{name} {dtype} {tuple(positions.shape)}"
            else:
                ulp = torch.finfo(dtype).eps * want.abs().float().clamp_min(2 ** -14) + 2 ** -23
                assert ((got.float() - want.float()).abs() <= ulp).all(), f"{name} {dtype} {tuple(positions.shape)}"


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_rope_cos_sin(dtype):
    _cos_sin_case("cpu", dtype, exact=False)


def test_rope_cos_sin_rejects_bad_input():
    with pytest.raises(ValueError, match="positions"):
        rope_cos_sin_triton(torch.ones(4), torch.zeros(2, 3), torch.float32)
    with pytest.raises(ValueError, match="inv_freq"):
        rope_cos_sin_triton(torch.ones(2, 4), torch.zeros(2, 3, dtype=torch.long), torch.float32)


# ---------------------------------------------------------------- SwiGLU / GeGLU
GLU = {"swiglu": (swiglu_triton, swiglu_torch), "geglu": (geglu_triton, geglu_torch)}


def _glu_case(device, dtype, name, shape):
    triton_fn, torch_fn = GLU[name]
    gate = (torch.randn(shape, device=device) * 3).to(dtype).requires_grad_()  # reaches both tails
    up = torch.randn(shape, device=device).to(dtype).requires_grad_()
    assert check_gradients(triton_fn, torch_fn, [gate, up], dtype, name) == 2


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy's exp(-x) = inf: sigmoid is 0
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("name", sorted(GLU))
def test_glu(dtype, name):
    _glu_case("cpu", dtype, name, (2, 13, 37))


# ---------------------------------------------------------------- fused linear + cross-entropy
def _cross_entropy_case(device, dtype, N, D, V, softcap, weight_grad, chunk_size, ignored=3):
    hidden = torch.randn(2, N, D, device=device).to(dtype).requires_grad_()
    # logits of size ~5 so that a soft-cap of 3 bends them hard
    weight = (torch.randn(V, D, device=device) * 5 / D ** 0.5).to(dtype).requires_grad_(weight_grad)
    labels = torch.randint(0, V, (2, N), device=device)
    labels.view(-1)[torch.randperm(2 * N, device=device)[:ignored]] = -100
    grad_scale = torch.rand((), device=device).item() + 0.5  # backward must scale by the incoming gradient

    def fn(h, w):
        return linear_cross_entropy_triton(h, w, labels, softcap, chunk_size=chunk_size) * grad_scale

    def ref(h, w):
        return linear_cross_entropy_torch(h, w, labels, softcap) * grad_scale

    def ref64(h, w):
        # the float64 truth for the gradient, except that the logits are rounded to dtype as HF's
        # lm_head rounds them (straight through): in bf16 that rounding moves a logit of 10 by 0.04,
        # which the kernel, like HF, sees, and which no fp32 work after it can undo
        logits = F.linear(h, w)
        logits = logits + (logits.to(dtype).double() - logits).detach()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits.view(-1, V), labels.view(-1), reduction="sum") * grad_scale

    checked = check_gradients(fn, ref, [hidden, weight], dtype, "linear_cross_entropy", torch_fn64=ref64,
                              sum_length=max(V, 2 * N))  # grad_hidden sums V terms, grad_weight 2 N
    assert checked == 1 + weight_grad


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("weight_grad,chunk_size", [(True, 5), (False, None)])
def test_linear_cross_entropy(dtype, softcap, weight_grad, chunk_size):
    # chunk_size 5 over 26 rows: several chunks and a short last one
    _cross_entropy_case("cpu", dtype, N=13, D=40, V=77, softcap=softcap, weight_grad=weight_grad,
                        chunk_size=chunk_size)


def test_linear_cross_entropy_all_ignored_is_zero():
    hidden = torch.randn(5, 40, requires_grad=True)
    weight = torch.randn(77, 40, requires_grad=True)
    labels = torch.full((5,), -100)
    loss = linear_cross_entropy_triton(hidden, weight, labels, chunk_size=2)
    expected = linear_cross_entropy_torch(hidden, weight, labels)
    assert loss.item() == expected.item() == 0.0, f"loss {loss.item()}, reference {expected.item()}"
    loss.backward()
    assert hidden.grad.abs().max().item() == 0.0 and weight.grad.abs().max().item() == 0.0


def test_linear_cross_entropy_does_not_touch_inputs():
    hidden, weight = torch.randn(6, 40), torch.randn(77, 40)
    labels = torch.randint(0, 77, (6,))
    before = hidden.clone(), weight.clone(), labels.clone()
    linear_cross_entropy_triton(hidden, weight, labels, 2.0, chunk_size=4)
    for name, a, b in zip(("hidden", "weight", "labels"), before, (hidden, weight, labels)):
        assert torch.equal(a, b), f"{name} changed"


# ---------------------------------------------------------------- bad input: ValueError with the numbers
@pytest.mark.parametrize("call,match", [
    (lambda: rms_norm_triton(torch.randn(3, 40), torch.randn(41), 1e-6), r"weight shape \(41,\).*\(3, 40\)"),
    (lambda: rms_norm_triton(torch.randn(40, 3).T, torch.randn(40), 1e-6), "contiguous"),
    (lambda: rms_norm_triton(torch.randn(3, 40).long(), torch.randn(40), 1e-6), "torch.int64"),
    (lambda: rope_triton(torch.randn(1, 2, 5, 9), torch.randn(1, 1, 5, 9), torch.randn(1, 5, 9),
                         torch.randn(1, 5, 9)), "Dh=9 must be even"),
    (lambda: rope_triton(torch.randn(1, 2, 5, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 5, 8),
                         torch.randn(1, 5, 8)), r"k \(1, 1, 6, 8\) does not match q"),
    (lambda: rope_triton(torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 5, 8).double(),
                         torch.randn(1, 5, 8).double()), "cast cos and sin"),
    (lambda: swiglu_triton(torch.randn(3, 4), torch.randn(3, 5)), r"gate shape \(3, 4\) != up shape \(3, 5\)"),
    (lambda: geglu_triton(torch.randn(3, 4), torch.randn(3, 4).half()), "gate dtype torch.float32"),
    (lambda: linear_cross_entropy_triton(torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 3, 10, -100])),
     r"labels\[2\] = 10 is outside \[0, 10\)"),
    (lambda: linear_cross_entropy_triton(torch.randn(4, 8), torch.randn(10, 9), torch.zeros(4).long()),
     r"hidden \(4, 8\) and weight \(10, 9\)"),
    (lambda: linear_cross_entropy_triton(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5).long()),
     r"labels shape \(5,\), expected \(4,\)"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- the same on the GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("unit_offset", [False, True])
def test_rms_norm_gpu(device, dtype, unit_offset):
    _rms_norm_case(device, dtype, (3, 333, 3072), unit_offset, True)
    _rms_norm_case(device, dtype, (2, 13, 40), unit_offset, False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_rope_gpu(device, dtype):
    _rope_case(device, dtype, B=2, Hq=24, Hk=8, T=257, Dh=128, cos_batch=2, transposed_q=True)
    _rope_case(device, dtype, B=2, Hq=3, Hk=1, T=13, Dh=10, cos_batch=1, transposed_q=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_rope_cos_sin_gpu(device, dtype):
    _cos_sin_case(device, dtype, exact=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("name", sorted(GLU))
def test_glu_gpu(device, dtype, name):
    _glu_case(device, dtype, name, (3, 129, 8191))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_linear_cross_entropy_gpu(device, dtype, softcap):
    _cross_entropy_case(device, dtype, N=517, D=256, V=32011, softcap=softcap, weight_grad=True,
                        chunk_size=200)
    _cross_entropy_case(device, dtype, N=13, D=40, V=77, softcap=softcap, weight_grad=False, chunk_size=None)
