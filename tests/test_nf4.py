"""NF4 reference (minilora/nf4.py) against bitsandbytes 0.50: bytes bit-identical, dequantization equal,
error within bitsandbytes' own envelope, Linear4bit and the HF/bitsandbytes checkpoint layout.

On CPU these compare with bitsandbytes' CPU code; the `gpu` copies compare with its CUDA kernels.
"""
import json
import os

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402

from minilora import nf4  # noqa: E402
from minilora.errors import WeightsError  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# odd numel, one element, short last block, rows not a multiple of 64, more than 256 blocks (two nested groups)
SHAPES = [(1,), (3, 5), (64, 64), (37, 129), (68, 16), (300, 70)]


def _weight(shape, dtype, device="cpu"):
    w = torch.randn(shape, device=device) * torch.rand((), device=device) * 3
    if w.numel() > 128:
        w.view(-1)[64:128] = 0  # an all-zero block: absmax 0, a corner both libraries treat specially
    return w.to(dtype)


def _assert_equal(ours, theirs, what):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, \
        f"{what}: ours {ours.dtype} {tuple(ours.shape)}, bitsandbytes {theirs.dtype} {tuple(theirs.shape)}"
    if not torch.equal(ours, theirs):
        diff = ours.float() != theirs.float()
        raise AssertionError(f"{what}: {int(diff.sum())} of {ours.numel()} values differ, first at "
                             f"{diff.nonzero()[0].tolist()}: ours {ours[diff][0]}, bitsandbytes {theirs[diff][0]}")


def _bnb_dequantize(q, state):
    # bitsandbytes 0.50.2's CPU dequantize_4bit kernel is wrong when the last dim is not a multiple of
    # 64 (element 64 of a (68, 16) weight is scaled by block 0's absmax); its flat-vector path is right.
    flat = bnbf.QuantState(absmax=state.absmax, shape=torch.Size([state.shape.numel()]), code=state.code,
                           blocksize=state.blocksize, quant_type="nf4", dtype=state.dtype, offset=state.offset,
                           state2=state.state2)
    return bnbf.dequantize_4bit(q, flat, quant_type="nf4").reshape(state.shape)


def _check_against_bnb(w, compress_statistics):
    q, s = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=compress_statistics, blocksize=64)
    ours = nf4.quantize_nf4(w, compress_statistics)
    _assert_equal(ours.packed, q, "packed bytes")
    _assert_equal(ours.absmax, s.absmax, "absmax")
    _assert_equal(ours.code, s.code, "code")
    if compress_statistics:
        _assert_equal(ours.nested_absmax, s.state2.absmax, "nested absmax")
        _assert_equal(ours.offset, s.offset, "offset")
        _assert_equal(ours.nested_code, s.state2.code, "nested code")
    else:
        assert ours.nested_absmax is None and s.state2 is None
    _assert_equal(nf4.dequantize_nf4(ours), _bnb_dequantize(q, s), "dequantized weight")


def test_dynamic_code_matches_bitsandbytes():
    _assert_equal(nf4.dynamic_code(), bnbf.create_dynamic_map(), "8-bit dynamic code")
    _assert_equal(nf4.nf4_code(), bnbf.get_4bit_type("nf4", device="cpu"), "NF4 code")


@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_bit_identical_to_bitsandbytes(shape, dtype, compress_statistics):
    _check_against_bnb(_weight(shape, dtype), compress_statistics)


def test_nested_quantization_on_many_blocks():
    # 200k absmax values: the 8-bit step of the double quantization meets many near-ties
    _check_against_bnb(torch.randn(3000, 4096) * 0.02, True)


def _assert_equal_except_near_ties(ours, theirs, scaled, midpoints, what):
    """Equal, except where the value being rounded lies within 2 fp32 ulps of a rounding threshold:
    there bitsandbytes' CUDA build (fast math: an approximate 1/absmax, and ties that do not always go
    the same way) may pick the neighbouring code. Measured on an H100: 5 of 100M 4-bit values
    (fp32 weights), 1 of 1.5M 8-bit absmax values."""
    diff = (ours != theirs).nonzero().flatten()
    if diff.numel() == 0:
        return
    gap = (scaled[diff, None] - midpoints[None, :]).abs().min(dim=1).values
    near = gap <= 2 * torch.finfo(torch.float32).eps * scaled[diff].abs().clamp(min=1e-30)
    step = (ours[diff].long() - theirs[diff].long()).abs()
    assert near.all() and (step == 1).all() and diff.numel() <= 1e-5 * ours.numel() + 1, (
        f"{what}: {diff.numel()} of {ours.numel()} differ; not near a threshold: {int((~near).sum())}, "
        f"more than one code apart: {int((step > 1).sum())}, first at {diff[0].item()}")


@pytest.mark.gpu
@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(3072, 8192)])
def test_quantize_matches_bitsandbytes_cuda(device, shape, dtype, compress_statistics):
    from minilora.kernels.backend import _bnb_quant_state

    w = _weight(shape, dtype, device)
    q, s = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=compress_statistics, blocksize=64)
    ours = nf4.quantize_nf4(w, compress_statistics)
    flat = w.reshape(-1).float()
    absmax = nf4._blocks_absmax(flat, 64)  # a max: exact on both sides
    code = nf4.nf4_code(device)
    scaled = flat * (1.0 / absmax.repeat_interleave(64)[: flat.numel()])
    _assert_equal_except_near_ties(nf4.unpack_nibbles(ours.packed, flat.numel()), nf4.unpack_nibbles(q, flat.numel()),
                                   scaled, (code[:-1] + code[1:]) / 2, "NF4 indices")
    if compress_statistics:
        _assert_equal(ours.offset, s.offset, "offset")
        _assert_equal(ours.nested_absmax, s.state2.absmax, "nested absmax")
        _assert_equal(ours.nested_code, s.state2.code, "nested code")
        centred = absmax - ours.offset
        scaled8 = centred * (1.0 / nf4._blocks_absmax(centred, 256).repeat_interleave(256)[: centred.numel()])
        dyn = nf4.dynamic_code(device)
        _assert_equal_except_near_ties(ours.absmax, s.absmax, scaled8, (dyn[:-1] + dyn[1:]) * 0.5, "8-bit absmax")
    else:
        _assert_equal(ours.absmax, s.absmax, "absmax")
    # dequantization of the same bytes: bitsandbytes' CUDA kernel and ours agree exactly
    theirs = bnbf.dequantize_4bit(ours.packed, _bnb_quant_state(ours), quant_type="nf4")
    _assert_equal(nf4.dequantize_nf4(ours), theirs, "dequantized weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_roundtrip_error_within_bitsandbytes_envelope(dtype):
    # bitsandbytes tests/test_functional.py, nf4 blocksize 64: mean abs 0.072798, mean rel 0.203339,
    # each with 7 standard deviations of slack (0.000074, 0.000340) over random draws
    w = torch.randn(1024, 1024).to(dtype)
    err = (nf4.dequantize_nf4(nf4.quantize_nf4(w, True)).float() - w.float()).abs()
    mean_abs, mean_rel = err.mean().item(), (err / (w.float().abs() + 1e-8)).mean().item()
    assert mean_abs < 0.072798 + 7 * 0.000074, f"mean abs error {mean_abs}"
    assert mean_rel < 0.203339 + 7 * 0.000340, f"mean rel error {mean_rel}"


def test_pack_unpack_nibbles_order():
    q = torch.tensor([1, 2, 15, 0, 9], dtype=torch.uint8)
    packed = nf4.pack_nibbles(q)
    assert packed.view(-1).tolist() == [0x12, 0xF0, 0x97]  # first element high, odd length padded with 7
    assert nf4.unpack_nibbles(packed, 5).tolist() == q.tolist()


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="int32"):
        nf4.quantize_nf4(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="0 elements"):
        nf4.quantize_nf4(torch.ones(0, 4))


# ---- Linear4bit ----

def _float64_linear(lin, x):
    return x.double() @ nf4.dequantize_nf4(lin.state, torch.float64).T + (0 if lin.bias is None else lin.bias.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear4bit_forward_and_input_gradient(dtype):
    w, b = torch.randn(37, 130), torch.randn(37)
    lin = nf4.Linear4bit.from_weight(w.to(dtype), b.to(dtype), backend="torch")
    assert lin.in_features == 130 and lin.out_features == 37 and lin.weight_dtype == dtype
    assert lin.bias.dtype == dtype and not lin.bias.requires_grad  # the base model is frozen
    assert [n for n, p in lin.named_parameters() if p.requires_grad] == []
    # the float weight is not kept: the only (37, 130)-sized state would be it
    assert all(t.numel() < w.numel() for t in lin.state_dict().values())
    x = torch.randn(2, 3, 130, dtype=dtype, requires_grad=True)
    y = lin(x)
    ref = _float64_linear(lin, x.detach())
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]  # fp16: a few output ulps over a 130-term sum
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    g = torch.randn_like(y)
    y.backward(g)
    ref_grad = g.double() @ nf4.dequantize_nf4(lin.state, torch.float64)
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=tol, atol=tol * ref_grad.abs().max().item())
    assert lin.weight_packed.grad is None


def test_linear4bit_dequantize_matches_reference():
    w = torch.randn(33, 64)
    lin = nf4.Linear4bit.from_weight(w, None, compress_statistics=False, dtype=torch.float16)
    assert torch.equal(lin.dequantize(), nf4.dequantize_nf4(nf4.quantize_nf4(w, False), torch.float16))


@pytest.mark.parametrize("storage, shape, held_as", [(torch.bfloat16, (24, 40), torch.bfloat16),
                                                     (torch.float32, (24, 40), torch.float32),
                                                     (torch.float32, (5, 7), torch.uint8)])  # 18 bytes: not 4 | 18
def test_packed_bytes_held_as_a_float_parameter(storage, shape, held_as):
    """FSDP2 storage (distributed.shard_base): the same bytes as a frozen Parameter; same state and outputs."""
    w = torch.randn(shape)
    lin = nf4.Linear4bit.from_weight(w, None, backend="torch")
    before, x = lin.state, torch.randn(3, shape[1])
    y = lin(x)
    lin.hold_packed_as_parameter(storage)
    held = dict(lin.named_parameters())["weight_packed"]
    assert held.dtype == held_as and not held.requires_grad and "weight_packed" not in dict(lin.named_buffers())
    assert torch.equal(lin.state.packed, before.packed) and lin.state.packed.shape == before.packed.shape
    assert torch.equal(lin(x), y)
    assert torch.equal(nf4.to_hf_state(lin, "p")["p.weight"], before.packed)  # saving writes bitsandbytes' bytes


# ---- Hugging Face + bitsandbytes checkpoint layout ----

@pytest.mark.parametrize("compress_statistics", [True, False])
def test_to_hf_state_is_what_bitsandbytes_writes(compress_statistics):
    w, b = torch.randn(40, 128, dtype=torch.bfloat16), torch.randn(40, dtype=torch.bfloat16)
    lin = nf4.Linear4bit.from_weight(w, b, compress_statistics=compress_statistics)
    ours = nf4.to_hf_state(lin, "model.layers.0.mlp.up_proj")
    q, s = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=compress_statistics, blocksize=64)
    theirs = {f"model.layers.0.mlp.up_proj.weight.{k}": v for k, v in s.as_dict(packed=True).items()}
    theirs.update({"model.layers.0.mlp.up_proj.weight": q, "model.layers.0.mlp.up_proj.bias": b})
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        _assert_equal(ours[key], theirs[key], key)
    meta = json.loads(bytes(ours["model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["shape"] == [40, 128] and meta["dtype"] == "bfloat16"


def test_hf_state_loads_in_bitsandbytes_and_back(tmp_path):
    from safetensors.torch import load_file, save_file

    w, b = torch.randn(24, 192), torch.randn(24)
    lin = nf4.Linear4bit.from_weight(w, b, backend="torch")
    save_file(nf4.to_hf_state(lin, "proj"), tmp_path / "m.safetensors")  # no shared storage
    tensors = load_file(tmp_path / "m.safetensors")
    # bitsandbytes' own loader (what transformers calls for a pre-quantized checkpoint)
    theirs = bnb.nn.Linear4bit(192, 24, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    stats = {k.removeprefix("proj.weight."): v for k, v in tensors.items() if k.startswith("proj.weight.")}
    theirs.weight = bnb.nn.Params4bit.from_prequantized(tensors["proj.weight"], stats, device="cpu", module=theirs)
    theirs.bias = torch.nn.Parameter(tensors["proj.bias"])
    x = torch.randn(3, 192)
    torch.testing.assert_close(theirs(x), lin(x), rtol=1e-5, atol=1e-5)
    # and back: our loader on the same file gives the same layer
    back = nf4.from_hf_state(tensors, "proj", torch.float32, backend="torch")
    assert torch.equal(back.dequantize(), lin.dequantize()) and torch.equal(back.bias, lin.bias)
    theirs_weight = bnbf.dequantize_4bit(theirs.weight, theirs.weight.quant_state, quant_type="nf4")
    assert torch.equal(back.dequantize(), theirs_weight)


def test_from_hf_state_errors_name_the_key():
    lin = nf4.Linear4bit.from_weight(torch.randn(8, 64), None)
    good = nf4.to_hf_state(lin, "q_proj")
    missing = {k: v for k, v in good.items() if not k.endswith("absmax") or "nested" in k}
    with pytest.raises(WeightsError, match=r"q_proj\.weight\.absmax"):
        nf4.from_hf_state(missing, "q_proj", torch.float32)
    short = dict(good, **{"q_proj.weight.absmax": good["q_proj.weight.absmax"][:1]})
    with pytest.raises(WeightsError, match="1 values; expected 8"):
        nf4.from_hf_state(short, "q_proj", torch.float32)
    fp4 = dict(good, **{"q_proj.weight.quant_state.bitsandbytes__nf4": torch.tensor(
        list(json.dumps({"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [8, 64]}).encode()),
        dtype=torch.uint8)})
    with pytest.raises(WeightsError, match="'fp4'"):
        nf4.from_hf_state(fp4, "q_proj", torch.float32)


def test_a_top_level_kernels_package_is_not_ours():
    """Hugging Face's `kernels` (imported by transformers >= 5.25) owns that import name: ours must not take it."""
    import importlib.util

    import minilora.kernels

    spec = importlib.util.find_spec("kernels")
    assert spec is None or spec.origin != minilora.kernels.__file__
    import setuptools

    packages = setuptools.find_packages(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                        include=["minilora", "minilora.*", "kernels", "kernels.*"])
    assert "minilora.kernels" in packages and "kernels" not in packages, packages


# ---- JoinedLinear4bit: several Linear4bit of one input as one matmul (decoding) ----

@pytest.mark.parametrize("backend", ["torch", "triton"])  # triton: the interpreter's GEMV / few-rows kernel
@pytest.mark.parametrize("rows", [1, 5])
def test_joined_layers_compute_each_layer_and_share_its_bytes(backend, rows):
    """Outputs equal each layer's own (float64 reference), the layers view one buffer holding their unchanged
    bytes, and a nested and a flat absmax layer join (the joined absmax is the decoded fp32 one)."""
    torch.manual_seed(0)
    layers = [nf4.Linear4bit.from_weight(torch.randn(n, 128), b, compress_statistics=nested, backend=backend,
                                         dtype=torch.float16)
              for n, b, nested in [(40, torch.randn(40), True), (24, None, False), (24, torch.randn(24), True)]]
    packed_before = [layer.weight_packed.clone() for layer in layers]
    alone_before = [layer.state for layer in layers]
    joined = nf4.JoinedLinear4bit(layers)
    x = torch.randn(rows, 128).half()
    with torch.no_grad():
        parts = joined(x)
    for layer, part, before, state in zip(layers, parts, packed_before, alone_before):
        assert torch.equal(layer.weight_packed, before)  # same bytes, now a view of the joined buffer
        assert layer.weight_packed.untyped_storage().data_ptr() == joined.state.packed.untyped_storage().data_ptr()
        w64, b64 = nf4.dequantize_nf4(state, torch.float64), 0 if layer.bias is None else layer.bias.double()
        ref = x.double() @ w64.T + b64
        # fp32 sums, a cast to fp16, then the bias added in fp16: a few fp16 roundings of the terms' magnitude
        bound = 4 * torch.finfo(torch.float16).eps * (x.double().abs() @ w64.abs().T + abs(b64))
        assert ((part.double() - ref).abs() <= bound).all()
        with torch.no_grad():
            torch.testing.assert_close(part, layer(x), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_layer_joined_keeps_its_bytes_and_reads_the_decoded_absmax(backend):
    """o_proj / down_proj alone (generate.join_projections): no copy of the packed bytes, the double-quantized
    absmax decoded to the fp32 values the layer dequantizes with, the layer's own output."""
    torch.manual_seed(1)
    layer = nf4.Linear4bit.from_weight(torch.randn(48, 256), torch.randn(48), compress_statistics=True,
                                       backend=backend, dtype=torch.float16)
    packed_at = layer.weight_packed.data_ptr()
    joined = nf4.JoinedLinear4bit([layer])
    assert joined.state.packed.data_ptr() == packed_at == layer.weight_packed.data_ptr()
    assert not joined.state.nested and torch.equal(joined.state.absmax, nf4.dequantize_absmax(layer.state))
    x = torch.randn(1, 256).half()
    with torch.no_grad():
        assert joined.applies_to(layer)
        (out,) = joined(x)
        if backend == "torch":  # the same dequantized weight, the same matmul
            assert torch.equal(out, layer(x))
        else:  # the GEMV with an in-kernel nested absmax may fuse its multiply-add: one fp16 rounding apart
            torch.testing.assert_close(out, layer(x), rtol=2e-3, atol=2e-3)


def test_joined_layers_apply_only_while_they_hold():
    layers = [nf4.Linear4bit.from_weight(torch.randn(n, 64), None, backend="torch") for n in (16, 8)]
    joined = nf4.JoinedLinear4bit(layers)
    with torch.no_grad():
        assert joined.applies_to(*layers)
        assert not joined.applies_to(layers[1], layers[0])  # another set of layers
    assert not joined.applies_to(*layers)  # autograd on: training keeps each layer's own path
    layers[0].weight_packed = layers[0].weight_packed.clone()  # moved / re-stored
    with torch.no_grad():
        assert not joined.applies_to(*layers) and not joined.holds(*layers)


def test_joining_unlike_layers_is_refused():
    a = nf4.Linear4bit.from_weight(torch.randn(8, 64), None, backend="torch")
    with pytest.raises(ValueError, match="cannot join"):
        nf4.JoinedLinear4bit([a, nf4.Linear4bit.from_weight(torch.randn(8, 128), None, backend="torch")])
    with pytest.raises(ValueError, match="cannot join"):
        nf4.JoinedLinear4bit([a, nf4.Linear4bit.from_weight(torch.randn(8, 64), None, backend="triton")])
