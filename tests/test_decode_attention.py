"""Decode-step kernels (minilora/kernels/decode_attention.py) against float64 evaluations of their torch references.

CPU: Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), fp32, bf16 and fp16, caches of 40-300
slots: ragged rows (left padding), unfilled slots, GQA groups 1, 3, 4, 20, head dims 64, 96, 128, 256, soft-capping,
sliding windows, one and several key splits, q/k/v as column views of one projection; and one decode step
against model.py's own path (apply_rope, StaticKVCache, SDPA under build_mask).
GPU (`-m gpu`): compiled, at model shapes, and captured in a CUDA graph that is replayed with new slots.

The exact answer is each reference evaluated on float64 copies of the inputs (`compute` is then float64, and
rounding P to the cache dtype is a no-op), so kernel and reference in a low precision are held to one bound.
"""
import types

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from minilora.kernels.decode_attention import (decode_attention, decode_attention_reference,  # noqa: E402
                                      keys_per_block, plan_splits, rope_cache_write, rope_cache_write_reference)
from minilora import model  # noqa: E402
from minilora.generate import StaticKVCache  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps


def _eps(dtype):
    return torch.finfo(dtype).eps


def _report(err, bound, what):
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {err.numel()} elements outside the bound; max diff "
                           f"{err.max().item():.3g}, mean diff {err.mean().item():.3g}, "
                           f"max of diff / bound {(err / bound).max().item():.3g}")


# ---------------------------------------------------------------------------------------------- RoPE + cache write

def _subnormal_spacing(dtype):
    """The absolute rounding error of a value below the dtype's normal range (fp16 results that cancel)."""
    return torch.finfo(dtype).tiny * _eps(dtype)


def _assert_rope_close(out, x, cos, sin, exact, what):
    """Below 1 eps(dtype) |exact| for the one rounding of the fp32 result (to nearest on a GPU: half that;
    Triton's CPU interpreter truncates fp32 -> bf16, a full eps) or the subnormal spacing, plus
    4 eps32 (|x| |cos| + |x rolled| |sin|) for the two fp32 products and their sum (a handful of fp32 roundings
    of the terms' size)."""
    x, cos, sin = x.double(), cos.double()[:, None], sin.double()[:, None]
    terms = x.abs() * cos.abs() + x.roll(x.shape[-1] // 2, dims=-1).abs() * sin.abs()  # roll: rotate_half's halves
    bound = _eps(out.dtype) * exact.abs() + _subnormal_spacing(out.dtype) + 4 * EPS32 * terms
    _report((out.double() - exact).abs(), bound, what)


def _rope_case(B, H, Hkv, Dh, S, slot, dtype, cos_rows, device="cpu"):
    # q, k, v: column views of one (B, N) projection output, as a joined q/k/v matmul returns them
    wide = torch.randn(B, 3 + (H + 2 * Hkv) * Dh + 2, device=device).to(dtype)
    q, k, v = wide[:, 3:-2].split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
    # random cos and sin with unequal halves (the kernel is exact for any), rows strided inside one matrix
    angles = torch.randn(cos_rows, 2 * Dh + 1, device=device).to(dtype)
    cos, sin = angles[:, :Dh], angles[:, Dh:2 * Dh]
    k_cache = torch.randn(B, Hkv, S, Dh, device=device).to(dtype)
    v_cache = torch.randn(B, Hkv, S, Dh, device=device).to(dtype)
    slot_tensor = torch.tensor(slot, device=device)
    wide_before, k_before, v_before = wide.clone(), k_cache.clone(), v_cache.clone()

    q_rot = rope_cache_write(q, k, v, cos, sin, k_cache, v_cache, slot_tensor)

    k64, v64 = k_before.double(), v_before.double()
    q_exact = rope_cache_write_reference(q.double(), k.double(), v.double(), cos.double(), sin.double(), k64, v64,
                                         slot_tensor)
    assert q_rot.shape == (B, H, Dh) and q_rot.dtype == dtype and q_rot.is_contiguous()
    _assert_rope_close(q_rot, q.reshape(B, H, Dh), cos, sin, q_exact, f"q_rot {dtype} Dh={Dh}")
    _assert_rope_close(k_cache[:, :, slot], k.reshape(B, Hkv, Dh), cos, sin, k64[:, :, slot],
                       f"k_cache[slot] {dtype} Dh={Dh}")
    assert torch.equal(v_cache[:, :, slot], v.reshape(B, Hkv, Dh)), "v_cache[slot] is not v"
    others = torch.arange(S, device=device) != slot
    assert torch.equal(k_cache[:, :, others], k_before[:, :, others]), "k_cache: another slot changed"
    assert torch.equal(v_cache[:, :, others], v_before[:, :, others]), "v_cache: another slot changed"
    assert torch.equal(wide, wide_before), "an input changed"
    # the reference in the same dtype meets the same bound
    k_ref, v_ref = k_before.clone(), v_before.clone()
    q_ref = rope_cache_write_reference(q, k, v, cos, sin, k_ref, v_ref, slot_tensor)
    _assert_rope_close(q_ref, q.reshape(B, H, Dh), cos, sin, q_exact, f"reference q_rot {dtype}")
    _assert_rope_close(k_ref[:, :, slot], k.reshape(B, Hkv, Dh), cos, sin, k64[:, :, slot], "reference k")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("Dh,H,Hkv,cos_rows", [(64, 6, 2, 3), (96, 3, 3, 1), (128, 8, 2, 3), (256, 4, 1, 3)])
def test_rope_cache_write(Dh, H, Hkv, cos_rows, dtype):
    _rope_case(B=3, H=H, Hkv=Hkv, Dh=Dh, S=9, slot=4, dtype=dtype, cos_rows=cos_rows)


def test_rope_cache_write_out_of_range_slot_writes_nothing():
    q, k, v = torch.randn(2, 128), torch.randn(2, 64), torch.randn(2, 64)
    cos, sin = torch.randn(2, 64), torch.randn(2, 64)
    k_cache, v_cache = torch.randn(2, 1, 5, 64), torch.randn(2, 1, 5, 64)
    before = k_cache.clone(), v_cache.clone()
    for slot in (5, -1):
        rope_cache_write(q, k, v, cos, sin, k_cache, v_cache, torch.tensor(slot))
        assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


# ---------------------------------------------------------------------------------------------- attention

def _decode_inputs(B, H, Hkv, S, Dh, slot, pads, dtype, device="cpu"):
    """Caches laid out as generate.py leaves them: row b has pads[b] padding slots (segment 0, position 0), then
    real tokens (segment 1, positions 0, 1, ...) up to and including `slot`, the query's; later slots are unfilled
    (segment -1). Keys and values no query may see are 100 times larger, so reading one would show."""
    positions = torch.zeros(B, S, dtype=torch.long)
    segments = torch.full((B, S), -1, dtype=torch.long)
    for b, pad in enumerate(pads):
        segments[b, :pad] = 0
        segments[b, pad:slot + 1] = 1
        positions[b, pad:slot + 1] = torch.arange(slot + 1 - pad)
    hidden = torch.where(segments != 1, 100.0, 1.0)[:, None, :, None]  # (B, 1, S, 1)
    k_cache, v_cache = torch.randn(B, Hkv, S, Dh) * hidden, torch.randn(B, Hkv, S, Dh) * hidden
    q = 2 * torch.randn(B, H, Dh)  # scores of spread ~2: a peaked softmax, not a near-uniform one
    return (q.to(device, dtype), k_cache.to(device, dtype), v_cache.to(device, dtype), positions.to(device),
            segments.to(device), torch.tensor(slot, device=device))


def _visible(positions, segments, slot, window):
    """(B, S): the masking rule, written out again independently of the reference."""
    query_position, query_segment = positions[:, slot, None], segments[:, slot, None]
    visible = (segments == query_segment) & (positions <= query_position)
    visible &= torch.arange(segments.shape[1], device=segments.device) <= slot  # slots after the query's: not its past
    return visible & (query_position - positions < window) if window is not None else visible


def _assert_attention_close(out, q, k_cache, v_cache, positions, segments, slot, scale, softcap, window, what):
    """|out - exact| <= tol * m per element, m = sum_j p_j |v_jd| (exact p; m >= |exact|, and every error below
    scales with it). tol adds up:
      2 eps(dtype): P rounded to the dtype for P @ V and the output rounded once, each below 1 eps relative
          (to nearest on a GPU is half that; Triton's CPU interpreter truncates fp32 -> bf16);
      2 sqrt(S) eps32: the fp32 sums over up to S keys (softmax denominator, P @ V); rounding errors of a sum
          grow like the square root of its length, as in test_train_kernels.assert_close;
      2 sqrt(Dh) eps32 a: a score is an fp32 sum of Dh products, error ~ sqrt(Dh) eps32 a with
          a = max over visible keys of scale sum_i |q_i k_i|, and an error ds in the scores moves the output by at
          most 2 max|ds| m;
      8 eps32 (1 + softcap): exp, the division, and tanh computed from exp (absolute error ~eps32, times softcap).
    Plus, as an absolute term, the subnormal spacing for each of the S probabilities rounded (fp16 underflows
    below 6e-8) and for the output. For fp32 the bound is a few 1e-5 relative, which a TF32 dot (operands cut to
    10 bits) or a 16-bit P fails; measured on the CPU cases, fp32 errors use ~1% of it, bf16 ~50%."""
    B, H, Dh = q.shape
    groups, S = H // k_cache.shape[1], k_cache.shape[2]
    q64, k64, v64 = q.double(), k_cache.double(), v_cache.double()
    exact = decode_attention_reference(q64, k64, v64, positions, segments, slot, scale, softcap, window)
    m = decode_attention_reference(q64, k64, v64.abs(), positions, segments, slot, scale, softcap, window)
    abs_scores = scale * torch.einsum("bhd,bhsd->bhs", q64.abs(), k64.abs().repeat_interleave(groups, dim=1))
    visible = _visible(positions, segments, int(slot), window)  # (B, S)
    a = abs_scores.masked_fill(~visible[:, None, :], 0).amax(-1, keepdim=True)  # (B, H, 1)
    v_max = v64.abs().amax(dim=(1, 3)).masked_fill(~visible, 0).amax()  # over the keys with p > 0
    tol = (2 * _eps(out.dtype) + 2 * S ** 0.5 * EPS32 + 2 * Dh ** 0.5 * EPS32 * a
           + 8 * EPS32 * (1 + (softcap or 0)))
    assert out.shape == exact.shape and out.dtype == q.dtype, f"{what}: {out.shape} {out.dtype}"
    tiny = _subnormal_spacing(out.dtype) * (S * v_max + 1)
    _report((out.double() - exact).abs(), tol * m + tiny, what)


CASES = {  # name: B, H, Hkv, S, Dh, slot, pads, softcap, window
    "G1-Dh96-phi3": (2, 2, 2, 70, 96, 60, [0, 11], None, None),
    "G3-Dh64-ragged": (3, 6, 2, 300, 64, 250, [0, 5, 37], None, None),
    "G4-Dh128-full-cache": (1, 8, 2, 200, 128, 199, [3], None, None),
    "softcap": (2, 4, 1, 150, 64, 120, [0, 9], 1.5, None),
    "window": (2, 6, 2, 160, 64, 140, [0, 30], None, 40),
    "Dh256-softcap-window-gemma2": (1, 4, 2, 100, 256, 90, [4], 3.0, 24),
    "own-key-only": (2, 4, 2, 140, 64, 0, [0, 0], None, None),
    "G20-mqa": (1, 20, 1, 140, 64, 120, [2], None, None),  # more query heads than one 16-row tile
}


def _attention_case(case, dtype, splits, device="cpu"):
    B, H, Hkv, S, Dh, slot, pads, softcap, window = case
    inputs = _decode_inputs(B, H, Hkv, S, Dh, slot, pads, dtype, device)
    before = [x.clone() for x in inputs]
    scale = Dh ** -0.5
    out = decode_attention(*inputs, scale, softcap=softcap, window=window, splits=splits)
    what = f"{dtype} splits={splits} {case}"
    _assert_attention_close(out, *inputs, scale, softcap, window, what)
    assert all(torch.equal(x, y) for x, y in zip(inputs, before)), "an input changed"
    return inputs, scale


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_attention(name, dtype, splits):
    B, H, Hkv, S, Dh = CASES[name][:5]
    assert (plan_splits(B, Hkv, S, Dh, splits)[0] > 1) == (splits > 1), "the case does not split as meant"
    inputs, scale = _attention_case(CASES[name], dtype, splits)
    # the reference in the same dtype meets the same bound
    softcap, window = CASES[name][7:]
    ref = decode_attention_reference(*inputs, scale, softcap=softcap, window=window)
    _assert_attention_close(ref, *inputs, scale, softcap, window, f"reference {dtype} {name}")


def after_the_slot_inputs(dtype=torch.float32, device="cpu"):
    """_decode_inputs where every slot after the query's holds a key that the positions and segments alone would
    make visible (segment 1, position 0), with a large score, and row 1's padding slot 3 holds a NaN value."""
    B, H, Hkv, S, Dh, slot = 2, 4, 2, 100, 64, 60
    q, k_cache, v_cache, positions, segments, slot_tensor = _decode_inputs(B, H, Hkv, S, Dh, slot, [0, 7], dtype)
    clean = [x.to(device) for x in (q, k_cache, v_cache, positions, segments, slot_tensor)]
    segments[:, slot + 1:], positions[:, slot + 1:] = 1, 0
    k_cache[:, :, slot + 1:] = q[:, :Hkv, None, :] * 10  # would dominate the softmax if it were read
    v_cache[1, :, 3] = float("nan")
    dirty = [x.to(device) for x in (q, k_cache, v_cache, positions, segments, slot_tensor)]
    return clean, dirty


def test_keys_after_the_slot_and_nan_padding_are_not_read():
    """The rule's j <= slot: a key after the query's slot is not its past, whatever its position and segment (a
    cache fills in slot order). And the K/V rows up to the slot, loaded without waiting for visibility, leave an
    invisible row's NaN value (stale padding) out of the output."""
    clean, dirty = after_the_slot_inputs()
    for splits in (1, 3):
        got, expected = decode_attention(*dirty, 0.125, splits=splits), decode_attention(*clean, 0.125, splits=splits)
        assert not expected.isnan().any() and torch.equal(got, expected)
    clean[2][1, :, 3] = 0.0  # the reference multiplies P by V: 0 * NaN would be NaN there
    dirty[2][1, :, 3] = 0.0
    assert torch.equal(decode_attention_reference(*dirty, 0.125), decode_attention_reference(*clean, 0.125))


def test_decode_attention_fp16():
    _attention_case(CASES["G3-Dh64-ragged"], torch.float16, splits=2)


@pytest.mark.parametrize("splits", [1, 2])
def test_decode_attention_random_masks(splits):
    # the rule on arbitrary segments and positions (packed examples, gaps), not only generate.py's layout
    B, H, Hkv, S, Dh, slot = 4, 4, 2, 90, 64, 37
    segments = torch.randint(-1, 3, (B, S))
    segments[:, slot] = torch.randint(0, 3, (B,))
    positions = torch.randint(0, 60, (B, S))
    q, k_cache, v_cache = torch.randn(B, H, Dh), torch.randn(B, Hkv, S, Dh), torch.randn(B, Hkv, S, Dh)
    for window in (None, 9):
        args = (q, k_cache, v_cache, positions, segments, torch.tensor(slot), 0.3)
        out = decode_attention(*args, window=window, splits=splits)
        _assert_attention_close(out, *args, None, window, f"random masks, window={window}")


def model_decode_step(window):
    """model.py's decode step on ragged left-padded prompts laid out as generate.left_pad does (apply_rope,
    StaticKVCache.update, SDPA under build_mask), fp32: the one-token q, k, v, cos, sin and a copy of the caches
    before the step (for the kernels to write), the cache, and what the step gives (keys, values, out)."""
    B, H, Hkv, Dh, S, prompt = 3, 6, 2, 64, 48, 20
    config = types.SimpleNamespace(num_key_value_heads=Hkv, head_dim=Dh, num_hidden_layers=1)
    cache = StaticKVCache(config, B, S, "cpu", torch.float32)
    lengths = torch.tensor([20, 13, 4])
    valid = torch.arange(prompt)[None, :] >= prompt - lengths[:, None]
    cache.append_positions((valid.long().cumsum(-1) - 1).clamp(min=0), valid.long())  # the prefill
    cache.update(0, torch.randn(B, Hkv, prompt, Dh), torch.randn(B, Hkv, prompt, Dh))
    cache.slot += prompt
    positions, segments = lengths[:, None], torch.ones(B, 1, dtype=torch.long)  # each row's next position
    cache.append_positions(positions, segments)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, Dh, 2).float() / Dh))
    cos, sin = model.rope_cos_sin(inv_freq, positions, torch.float32)  # (B, 1, Dh)
    q, k, v = torch.randn(B, (H + 2 * Hkv) * Dh).split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
    k_cache, v_cache = cache.keys[0].clone(), cache.values[0].clone()

    def heads(x):  # (B, n * Dh) -> (B, n, 1, Dh), as Attention.forward views a one-token projection
        return x.reshape(B, 1, -1, Dh).transpose(1, 2)

    keys, values = cache.update(0, model.apply_rope(heads(k), cos, sin), heads(v))
    mask = model.build_mask(positions, segments, window, cache)
    out = F.scaled_dot_product_attention(model.apply_rope(heads(q), cos, sin), keys, values, attn_mask=mask,
                                         scale=Dh ** -0.5, enable_gqa=True)[:, :, 0]
    return (q, k, v, cos[:, 0], sin[:, 0], k_cache, v_cache), cache, (keys, values, out)


@pytest.mark.parametrize("window", [None, 5])
def test_decode_step_matches_model(window):
    """rope_cache_write + decode_attention give model.py's decode step (`model_decode_step`). fp32, torch's default
    tolerances (the same fp32 roundings, summed in another order)."""
    (q, k, v, cos, sin, k_cache, v_cache), cache, (keys, values, expected) = model_decode_step(window)
    q_rot = rope_cache_write(q, k, v, cos, sin, k_cache, v_cache, cache.slot)
    out = decode_attention(q_rot, k_cache, v_cache, cache.key_positions, cache.key_segments, cache.slot,
                           k_cache.shape[-1] ** -0.5, window=window)
    torch.testing.assert_close(k_cache, keys)
    assert torch.equal(v_cache, values)
    torch.testing.assert_close(out, expected)


def test_plan_splits():
    assert plan_splits(1, 8, 4096, 128) == (32, 128)  # Llama-3.2-3B at batch 1: 8 kv heads x 32 splits
    assert plan_splits(1, 8, 256, 128) == (8, 32)  # no split under MIN_KEYS_PER_SPLIT keys: one block each
    assert plan_splits(1, 8, 255, 128) == (8, 32)  # generate's 128 + 127: the count rounds up, not down to 7 x 64
    assert plan_splits(8, 8, 512, 128) == (4, 128)
    assert plan_splits(1, 8, 40, 128) == (2, 32)
    assert plan_splits(1, 8, 20, 128) == (1, 32)
    assert plan_splits(32, 8, 4096, 128)[0] == 1  # B * Hkv programs fill the GPU already
    assert plan_splits(1, 2, 70, 64, splits=4) == (3, 32)  # forced: whole blocks, no empty split
    assert plan_splits(1, 1, 10 ** 5, 64, splits=1000)[0] <= 64  # at most MAX_SPLITS
    for B, Hkv, S, Dh, splits in [(1, 8, 4097, 128, None), (2, 4, 999, 256, None), (1, 1, 300, 64, 7),
                                  (3, 2, 65, 96, 64)]:
        n, keys = plan_splits(B, Hkv, S, Dh, splits)
        assert keys % keys_per_block(Dh) == 0 and (n - 1) * keys < S <= n * keys, (B, Hkv, S, Dh, splits, n, keys)


def _bad_attention(**changes):
    args = dict(q=torch.randn(2, 4, 64), k_cache=torch.randn(2, 2, 16, 64), v_cache=torch.randn(2, 2, 16, 64),
                key_positions=torch.zeros(2, 16, dtype=torch.long), key_segments=torch.zeros(2, 16, dtype=torch.long),
                slot=torch.tensor(3), scale=0.125)
    args.update(changes)
    return lambda: decode_attention(**args)


def _bad_rope(**changes):
    args = dict(q=torch.randn(2, 256), k=torch.randn(2, 128), v=torch.randn(2, 128), cos=torch.randn(2, 64),
                sin=torch.randn(2, 64), k_cache=torch.randn(2, 2, 16, 64), v_cache=torch.randn(2, 2, 16, 64),
                slot=torch.tensor(3))
    args.update(changes)
    return lambda: rope_cache_write(**args)


@pytest.mark.parametrize("call,match", [
    (_bad_attention(q=torch.randn(4, 64)), r"q \(4, 64\) must be \(B, H, Dh\) = \(2, H, 64\)"),
    (_bad_attention(q=torch.randn(2, 4, 32)), r"q \(2, 4, 32\) must be \(B, H, Dh\) = \(2, H, 64\)"),
    (_bad_attention(q=torch.randn(2, 5, 64)), "H=5 heads, not a multiple of the caches' Hkv=2"),
    (_bad_attention(q=torch.randn(2, 4, 64).bfloat16()), "dtypes q torch.bfloat16, k_cache torch.float32"),
    (_bad_attention(v_cache=torch.randn(2, 2, 17, 64)), r"k_cache \(2, 2, 16, 64\) and v_cache \(2, 2, 17, 64\)"),
    (_bad_attention(k_cache=torch.randn(2, 16, 64), v_cache=torch.randn(2, 16, 64)), r"must both be \(B, Hkv, S, Dh\)"),
    (_bad_attention(key_positions=torch.zeros(2, 15, dtype=torch.long)), r"key_positions is \(2, 15\)"),
    (_bad_attention(key_segments=torch.zeros(2, 16)), r"key_segments is \(2, 16\) torch.float32"),
    (_bad_attention(slot=3), "slot is int"),
    (_bad_attention(slot=torch.tensor([3, 4])), r"slot is shape \(2,\)"),
    (_bad_attention(window=0), "window=0"),
    (_bad_attention(softcap=-1.0), "softcap=-1.0"),
    (_bad_attention(splits=0), "splits=0"),
    (_bad_attention(q=torch.randn(2, 4, 128)[..., ::2]), "contiguous last dim"),
    (_bad_rope(k=torch.randn(2, 96)), r"k \(2, 96\) and v \(2, 128\) must both be \(B, Hkv \* Dh\) = \(2, 128\)"),
    (_bad_rope(q=torch.randn(2, 4, 64)), r"q \(2, 4, 64\) must be \(B, H \* Dh\)"),
    (_bad_rope(q=torch.randn(2, 250)), r"q \(2, 250\) must be"),
    (_bad_rope(cos=torch.randn(2, 32), sin=torch.randn(2, 32)), r"cos \(2, 32\) and sin \(2, 32\) must both be"),
    (_bad_rope(k_cache=torch.randn(2, 2, 16, 66), v_cache=torch.randn(2, 2, 16, 66)), r"q \(2, 256\) must be"),
    (_bad_rope(k_cache=torch.randn(2, 2, 16, 63), v_cache=torch.randn(2, 2, 16, 63)), "even head dim"),
    (_bad_rope(v=torch.randn(2, 128).half()), "dtypes q torch.float32, k torch.float32, v torch.float16"),
    (_bad_rope(q=torch.randn(2, 512)[:, ::2]), "q strides"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------- the same on the GPU

GPU_CASES = {  # model shapes; name: B, H, Hkv, S, Dh, slot, pads, softcap, window
    "llama3.2-3b-bs1": (1, 24, 8, 4096, 128, 3000, [0], None, None),
    "llama3.2-3b-bs8": (8, 24, 8, 1024, 128, 1000, [0, 3, 17, 100, 0, 1, 250, 9], None, None),
    "qwen2.5-0.5b-G7": (2, 14, 2, 2048, 64, 1500, [0, 40], None, None),
    "phi3-Dh96-G1": (1, 32, 32, 2048, 96, 777, [0], None, None),
    "gemma2-local": (2, 8, 4, 4096, 256, 4000, [0, 123], 50.0, 1000),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name", sorted(GPU_CASES))
def test_decode_attention_gpu(device, name, dtype):
    for splits in (None, 1):
        _attention_case(GPU_CASES[name], dtype, splits, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("Dh", [64, 96, 128, 256])
def test_rope_cache_write_gpu(device, Dh, dtype):
    _rope_case(B=8, H=32, Hkv=8, Dh=Dh, S=300, slot=123, dtype=dtype, cos_rows=8, device=device)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 1])
def test_decode_step_in_cuda_graph_gpu(device, splits):
    """Both launches captured once, replayed with a new slot and new inputs: each replay matches the references."""
    B, H, Hkv, S, Dh, dtype = 2, 24, 8, 2048, 128, torch.bfloat16
    _, k_cache, v_cache, positions, segments, slot = _decode_inputs(B, H, Hkv, S, Dh, 100, [0, 7], dtype, device)
    wide = torch.randn(B, (H + 2 * Hkv) * Dh, device=device).to(dtype)
    q, k, v = wide.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
    cos, sin = torch.randn(B, Dh, device=device).to(dtype), torch.randn(B, Dh, device=device).to(dtype)

    def step():
        q_rot = rope_cache_write(q, k, v, cos, sin, k_cache, v_cache, slot)
        return q_rot, decode_attention(q_rot, k_cache, v_cache, positions, segments, slot, Dh ** -0.5, splits=splits)

    side = torch.cuda.Stream()  # compile and warm up outside the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_rot, out = step()
    for new_slot, new_position in ((101, None), (102, None), (500, 400)):  # 500: a jump over unfilled slots
        slot.fill_(new_slot)
        positions[:, new_slot] = positions[:, new_slot - 1] + 1 if new_position is None else new_position
        segments[:, new_slot] = 1
        for x in (wide, cos, sin):
            x.copy_(torch.randn(x.shape, device=device).to(dtype))
        k_exact, v_exact = k_cache.double(), v_cache.double()
        q_exact = rope_cache_write_reference(q.double(), k.double(), v.double(), cos.double(), sin.double(),
                                             k_exact, v_exact, slot)
        graph.replay()
        what = f"graph replay, slot {new_slot}"
        _assert_rope_close(q_rot, q.reshape(B, H, Dh), cos, sin, q_exact, what)
        _assert_rope_close(k_cache[:, :, new_slot], k.reshape(B, Hkv, Dh), cos, sin, k_exact[:, :, new_slot], what)
        assert torch.equal(v_cache.double(), v_exact), what
        _assert_attention_close(out, q_rot, k_cache, v_cache, positions, segments, slot, Dh ** -0.5, None, None, what)
