"""The one-launch decode attention (minilora/kernels/decode_attention_fused.py) against its reference,
rope_cache_write_reference then decode_attention_reference, evaluated on float64 copies of the inputs.

The cases, helpers and error bounds are tests/test_decode_attention.py's (GQA groups 1, 3, 4, 20, head dims 64, 96,
128, 256, ragged rows, windows, soft-capping, one and several key splits, q/k/v as column views of one projection,
fp32/bf16/fp16). Attention cases rotate by quarter turns (cos, sin in {0, 1, -1}, a different angle per column),
which every dtype rotates exactly, so the attention bound is the one of test_decode_attention.py with no term for
rounding q. General angles are checked on the written cache row (the same rotation code) in every dtype, on the
output in fp32, and against model.py's decode step with real RoPE angles. The cache row at `slot` is NaN before
each call: a kernel that read it back would show.
GPU (`-m gpu`): compiled, at model shapes, and captured in a CUDA graph replayed with new slots.
"""
import math

import pytest
import torch

pytest.importorskip("triton")

from minilora.kernels import decode_attention_fused as fused  # noqa: E402
from minilora.kernels.decode_attention import (decode_attention_reference, plan_splits,  # noqa: E402
                                      rope_cache_write_reference)
from minilora.kernels.decode_attention_fused import decode_attention_fused  # noqa: E402
from test_decode_attention import (CASES, GPU_CASES, _assert_attention_close, _assert_rope_close,  # noqa: E402
                                   _decode_inputs, model_decode_step)


def _quarter_turns(rows, Dh, dtype, device):
    """cos, sin (rows, Dh) of angles n pi / 2 per column (unequal halves): one of cos, sin is 0, the other +-1."""
    n = torch.randint(0, 4, (rows, Dh), device=device)
    cos = torch.tensor([1.0, 0.0, -1.0, 0.0], device=device)[n]
    sin = torch.tensor([0.0, 1.0, 0.0, -1.0], device=device)[n]
    return cos.to(dtype), sin.to(dtype)


def _projection(B, H, Hkv, Dh, dtype, device):
    """q, k, v: column views of one (B, N) projection output, as a joined q/k/v matmul returns them."""
    wide = torch.randn(B, 3 + (H + 2 * Hkv) * Dh + 2, device=device)
    wide[:, 3:3 + H * Dh] *= 2  # scores of spread ~2, as _decode_inputs: a peaked softmax
    return wide.to(dtype)[:, 3:-2].split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)


def _fused_inputs(case, dtype, device="cpu", cos_rows=None, angles="quarter"):
    """(q, k, v, cos, sin, k_cache, v_cache, positions, segments, slot): the caches laid out by _decode_inputs with
    a NaN row at `slot` (stale: the call writes it), cos/sin of cos_rows rows (default B)."""
    B, H, Hkv, S, Dh, slot, pads = case[:7]
    _, k_cache, v_cache, positions, segments, slot_tensor = _decode_inputs(B, H, Hkv, S, Dh, slot, pads, dtype, device)
    k_cache[:, :, slot], v_cache[:, :, slot] = float("nan"), float("nan")
    q, k, v = _projection(B, H, Hkv, Dh, dtype, device)
    if angles == "quarter":
        cos, sin = _quarter_turns(cos_rows or B, Dh, dtype, device)
    else:  # random cos and sin, rows strided inside one matrix (as test_decode_attention._rope_case)
        table = torch.randn(cos_rows or B, 2 * Dh + 1, device=device).to(dtype)
        cos, sin = table[:, :Dh], table[:, Dh:2 * Dh]
    return q, k, v, cos, sin, k_cache, v_cache, positions, segments, slot_tensor


def _reference(q, k, v, cos, sin, k_cache, v_cache, positions, segments, slot, scale, softcap, window):
    """The two references composed in q's dtype: (q_rot, k_cache, v_cache as written, out)."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    q_rot = rope_cache_write_reference(q, k, v, cos, sin, k_cache, v_cache, slot)
    out = decode_attention_reference(q_rot, k_cache, v_cache, positions, segments, slot, scale, softcap, window)
    return q_rot, k_cache, v_cache, out


def _fused_case(case, dtype, splits, device="cpu", cos_rows=None):
    """One call against the composed references; the counters are back at zero and a repeat call is bit-identical."""
    softcap, window = case[7:]
    inputs = _fused_inputs(case, dtype, device, cos_rows)
    q, k, v, cos, sin, k_cache, v_cache, positions, segments, slot = inputs
    scale = k_cache.shape[-1] ** -0.5
    q_rot, k_written, v_written, _ = _reference(*inputs, scale, softcap, window)
    before = [x.clone() for x in (q, k, v, cos, sin, positions, segments, slot)]

    out = decode_attention_fused(*inputs, scale, softcap=softcap, window=window, splits=splits)

    what = f"fused {dtype} splits={splits} {case}"
    # quarter turns are exact in every dtype: the caches hold bit for bit what the reference writes, and the
    # reference's q_rot is the kernel's, so the attention bound needs no term for rounding q
    assert torch.equal(k_cache.nan_to_num(7.0), k_written.nan_to_num(7.0)), f"{what}: k_cache differs"
    assert torch.equal(v_cache, v_written), f"{what}: v_cache differs"
    _assert_attention_close(out, q_rot, k_cache, v_cache, positions, segments, slot, scale, softcap, window, what)
    assert all(torch.equal(x, y) for x, y in zip((q, k, v, cos, sin, positions, segments, slot), before)), \
        f"{what}: an input changed"
    counters = fused._arrival_counter(k_cache.shape[0] * k_cache.shape[1], k_cache.device)
    assert not counters.any(), f"{what}: arrival counters left at {counters.tolist()}"
    again = decode_attention_fused(*inputs, scale, softcap=softcap, window=window, splits=splits)
    assert torch.equal(again, out) and torch.equal(v_cache, v_written), f"{what}: a repeat call differs"
    return out


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_attention_fused(name, dtype, splits):
    B, H, Hkv, S, Dh = CASES[name][:5]
    assert (plan_splits(B, Hkv, S, Dh, splits)[0] > 1) == (splits > 1), "the case does not split as meant"
    _fused_case(CASES[name], dtype, splits, cos_rows=1 if name == "window" else None)  # one broadcast cos/sin row


def test_decode_attention_fused_fp16():
    _fused_case(CASES["G3-Dh64-ragged"], torch.float16, splits=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("Dh,H,Hkv,cos_rows", [(64, 6, 2, 3), (96, 3, 3, 1), (128, 8, 2, 3), (256, 4, 1, 3)])
def test_fused_rope_general_angles(Dh, H, Hkv, cos_rows, dtype):
    """Random cos/sin: the slot's cache rows as test_decode_attention._rope_case bounds them, no other slot touched;
    in fp32 the output against float64 attention of the fp32 reference's q_rot (the kernel's up to an fp32
    rounding, which the bound's score term covers)."""
    case = (3, H, Hkv, 90, Dh, 70, [0, 5, 21], None, None)
    inputs = _fused_inputs(case, dtype, cos_rows=cos_rows, angles="random")
    q, k, v, cos, sin, k_cache, v_cache, positions, segments, slot = inputs
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = decode_attention_fused(*inputs, Dh ** -0.5, splits=2)

    B, s = q.shape[0], int(slot)
    k64, v64 = k_before.double(), v_before.double()
    rope_cache_write_reference(q.double(), k.double(), v.double(), cos.double(), sin.double(), k64, v64, slot)
    _assert_rope_close(k_cache[:, :, s], k.reshape(B, Hkv, Dh), cos, sin, k64[:, :, s], f"k_cache[slot] {dtype}")
    assert torch.equal(v_cache[:, :, s], v.reshape(B, Hkv, Dh)), "v_cache[slot] is not v"
    others = torch.arange(k_cache.shape[2]) != s
    assert torch.equal(k_cache[:, :, others], k_before[:, :, others]), "k_cache: another slot changed"
    assert torch.equal(v_cache[:, :, others], v_before[:, :, others]), "v_cache: another slot changed"
    if dtype == torch.float32:
        q_rot = _reference(*inputs, Dh ** -0.5, None, None)[0]
        _assert_attention_close(out, q_rot, k_cache, v_cache, positions, segments, slot, Dh ** -0.5, None, None,
                                "fused, general angles")


@pytest.mark.parametrize("splits", [1, 2])
def test_decode_attention_fused_random_masks(splits):
    # the rule on arbitrary segments and positions (packed examples, gaps), as test_decode_attention_random_masks
    B, H, Hkv, S, Dh, slot = 4, 4, 2, 90, 64, 37
    segments = torch.randint(-1, 3, (B, S))
    segments[:, slot] = torch.randint(0, 3, (B,))
    positions = torch.randint(0, 60, (B, S))
    k_cache, v_cache = torch.randn(B, Hkv, S, Dh), torch.randn(B, Hkv, S, Dh)
    k_cache[:, :, slot], v_cache[:, :, slot] = float("nan"), float("nan")
    q, k, v = _projection(B, H, Hkv, Dh, torch.float32, "cpu")
    cos, sin = _quarter_turns(B, Dh, torch.float32, "cpu")
    slot_tensor = torch.tensor(slot)
    for window in (None, 9):
        args = (q, k, v, cos, sin, k_cache, v_cache, positions, segments, slot_tensor)
        q_rot, k_written, v_written, _ = _reference(*args, 0.3, None, window)
        out = decode_attention_fused(*args, 0.3, window=window, splits=splits)
        _assert_attention_close(out, q_rot, k_written, v_written, positions, segments, slot_tensor, 0.3, None, window,
                                f"fused, random masks, window={window}")


@pytest.mark.parametrize("window", [None, 5])
def test_fused_decode_step_matches_model(window):
    """The fused call gives model.py's decode step (test_decode_attention.model_decode_step: ragged left-padded
    prompts, real RoPE angles), fp32, torch's default tolerances."""
    (q, k, v, cos, sin, k_cache, v_cache), cache, (keys, values, expected) = model_decode_step(window)
    out = decode_attention_fused(q, k, v, cos, sin, k_cache, v_cache, cache.key_positions, cache.key_segments,
                                 cache.slot, k_cache.shape[-1] ** -0.5, window=window)
    torch.testing.assert_close(k_cache, keys)
    assert torch.equal(v_cache, values)
    torch.testing.assert_close(out, expected)


def test_fused_out_of_range_slot_writes_nothing():
    B, H, Hkv, S, Dh = 2, 4, 2, 70, 64
    q, k, v, cos, sin, k_cache, v_cache, positions, segments, _ = _fused_inputs((B, H, Hkv, S, Dh, 5, [0, 0]),
                                                                                torch.float32)
    before = k_cache.nan_to_num(7.0), v_cache.nan_to_num(7.0)
    for slot in (S, -1):  # the output is undefined; the kernel reads positions/segments at the clamped slot
        decode_attention_fused(q, k, v, cos, sin, k_cache, v_cache, positions, segments, torch.tensor(slot),
                               Dh ** -0.5, splits=2)
        assert torch.equal(k_cache.nan_to_num(7.0), before[0]) and torch.equal(v_cache.nan_to_num(7.0), before[1]), \
            f"slot {slot} wrote into the caches"


def _bad_fused(**changes):
    args = dict(q=torch.randn(2, 256), k=torch.randn(2, 128), v=torch.randn(2, 128), cos=torch.randn(2, 64),
                sin=torch.randn(2, 64), k_cache=torch.randn(2, 2, 16, 64), v_cache=torch.randn(2, 2, 16, 64),
                key_positions=torch.zeros(2, 16, dtype=torch.long), key_segments=torch.zeros(2, 16, dtype=torch.long),
                slot=torch.tensor(3), scale=0.125)
    args.update(changes)
    return lambda: decode_attention_fused(**args)


@pytest.mark.parametrize("call,match", [
    (_bad_fused(q=torch.randn(2, 320)), "H=5 heads, not a multiple of the caches' Hkv=2"),
    (_bad_fused(q=torch.randn(2, 4, 64)), r"q \(2, 4, 64\) must be \(B, H \* Dh\)"),
    (_bad_fused(k=torch.randn(2, 96)), r"k \(2, 96\) and v \(2, 128\) must both be \(B, Hkv \* Dh\)"),
    (_bad_fused(key_positions=torch.zeros(2, 15, dtype=torch.long)), r"key_positions is \(2, 15\)"),
    (_bad_fused(slot=3), "slot is int"),
    (_bad_fused(window=0), "window=0"),
    (_bad_fused(q=torch.randn(2, 256).bfloat16()), "dtypes q torch.bfloat16, k torch.float32"),
])
def test_fused_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------- the same on the GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name", sorted(GPU_CASES))
def test_decode_attention_fused_gpu(device, name, dtype):
    for splits in (None, 1):
        _fused_case(GPU_CASES[name], dtype, splits, device)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 1])
def test_decode_attention_fused_in_cuda_graph_gpu(device, splits):
    """One launch captured once, replayed with a new slot and new inputs: each replay matches the references."""
    B, H, Hkv, S, Dh, dtype = 2, 24, 8, 2048, 128, torch.bfloat16
    q, k, v, cos, sin, k_cache, v_cache, positions, segments, slot = _fused_inputs(
        (B, H, Hkv, S, Dh, 100, [0, 7]), dtype, device)

    def step():
        return decode_attention_fused(q, k, v, cos, sin, k_cache, v_cache, positions, segments, slot, Dh ** -0.5,
                                      splits=splits)

    side = torch.cuda.Stream()  # compile and warm up outside the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for new_slot, new_position in ((101, None), (102, None), (500, 400)):  # 500: a jump over unfilled slots
        slot.fill_(new_slot)
        positions[:, new_slot] = positions[:, new_slot - 1] + 1 if new_position is None else new_position
        segments[:, new_slot] = 1
        for x in (q, k, v):  # column views of one projection, refilled in place
            x.copy_(torch.randn(x.shape, device=device).to(dtype))
        new_cos, new_sin = _quarter_turns(B, Dh, dtype, device)
        cos.copy_(new_cos), sin.copy_(new_sin)
        q_rot, k_written, v_written, _ = _reference(q, k, v, cos, sin, k_cache, v_cache, positions, segments, slot,
                                                    Dh ** -0.5, None, None)
        graph.replay()
        what = f"graph replay, slot {new_slot}"
        assert torch.equal(k_cache, k_written) and torch.equal(v_cache, v_written), what
        _assert_attention_close(out, q_rot, k_cache, v_cache, positions, segments, slot, Dh ** -0.5, None, None, what)
    assert not fused._arrival_counter(B * Hkv, k_cache.device).any()
    assert math.isfinite(float(out.float().abs().max()))


def test_fused_keys_after_the_slot_and_nan_padding_are_not_read():
    """decode_attention.py's j <= slot rule and NaN padding (test_decode_attention's same-named test), in one launch."""
    from test_decode_attention import after_the_slot_inputs

    clean, dirty = after_the_slot_inputs()
    q, *_ = clean
    B, H, Dh = q.shape
    Hkv = clean[1].shape[1]
    k, v = torch.randn(B, Hkv * Dh), torch.randn(B, Hkv * Dh)
    cos, sin = _quarter_turns(B, Dh, torch.float32, "cpu")
    outs = []
    for _, k_cache, v_cache, positions, segments, slot in (clean, dirty):
        outs.append([decode_attention_fused(q.reshape(B, -1), k, v, cos, sin, k_cache.clone(), v_cache.clone(),
                                            positions, segments, slot, 0.125, splits=splits) for splits in (1, 3)])
    for a, b in zip(*outs):
        assert not a.isnan().any() and torch.equal(a, b)
