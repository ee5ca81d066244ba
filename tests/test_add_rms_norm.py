"""The fused residual add + RMSNorm of decoding (minilora/kernels/rmsnorm.py `add_rms_norm_triton`) vs the unfused code.

The fused op replaces `x = x + delta; h = rms_norm_triton(x, ...)`, so each check draws fresh random
inputs and asks for
- `summed` bit for bit equal to torch's `x + delta` (the residual stream must not drift from the unfused model),
- `normed` bit for bit equal to `rms_norm_triton(x + delta, ...)` (the same jitted norm code), and
- `normed` within a few roundings of the float64 reference (the truth both approximate).

CPU: the Triton interpreter, fp32 and fp16. Its fp32 -> bf16 cast truncates instead of rounding to
nearest even (triton 3.9 `interpreter.cast_impl` passes no rounding mode), so a random bf16 sum would round
differently from torch's there: the CPU bf16 test uses sums that bf16 holds exactly, and random bf16 is
`-m gpu`, with the model sizes (Gemma 2B: 2048, Phi-3 and Llama 3B: 3072, the 8192 limit asked for).
"""
import pytest
import torch

from minilora.kernels.rmsnorm import add_rms_norm_torch, add_rms_norm_triton, rms_norm_torch, rms_norm_triton

EPS = 1e-6
_SAME_SIZE_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_same_bits(actual, expected, name):
    """Bit for bit (so -0.0 vs 0.0 counts), with the max and mean difference when not."""
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype}, expected {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    same = actual.view(_SAME_SIZE_INT[actual.dtype]) == expected.view(_SAME_SIZE_INT[expected.dtype])
    if not same.all():
        diff = (actual.double() - expected.double()).abs()
        raise AssertionError(f"{name} ({actual.dtype}): {int((~same).sum())} of {same.numel()} elements differ; "
                             f"max diff {diff.max().item():.3g}, mean diff {diff.mean().item():.3g}")


def assert_close_to_float64(normed, summed, weight, unit_offset, dtype, roundings=1.0):
    """|normed - ref| <= (roundings * eps(dtype) + 2 sqrt(D) eps(fp32)) |ref| + tiny(dtype), ref in float64.

    Every step after the fp32 statistics is a product, so the error is relative to each element:
    - the roundings to dtype: Llama rounds h, then the product w * h, half an eps each; Gemma rounds once;
      `roundings` = 1 eps covers both (2 where the interpreter truncates, a whole eps a rounding);
    - the fp32 sum of D squares, in the kernel's tree order, grows like sqrt(D) (as in test_train_kernels'
      assert_close), and the few other fp32 roundings (rsqrt, x * rstd, 1 + w) fit in the same term;
    - tiny(dtype), the smallest normal number, bounds the absolute error of results that round to a
      subnormal (fp16 below 6e-5), where a relative bound does not hold.
    The reference reads the rounded sum, as the kernel does: the sum itself is checked bit for bit.
    """
    D = summed.shape[-1]
    ref = rms_norm_torch(summed.double(), weight.double(), EPS, unit_offset)
    rel = roundings * torch.finfo(dtype).eps + 2 * D ** 0.5 * torch.finfo(torch.float32).eps
    diff = (normed.double() - ref).abs()
    bad = diff > rel * ref.abs() + torch.finfo(dtype).tiny
    assert not bad.any(), (f"normed vs float64 ({dtype}, D={D}, unit_offset={unit_offset}): {int(bad.sum())} of "
                           f"{bad.numel()} off; max diff {diff.max().item():.3g}, mean diff {diff.mean().item():.3g}, "
                           f"allowed {rel:.3g} * |ref| + {torch.finfo(dtype).tiny:.3g}")


def _inputs(shape, dtype, unit_offset, device="cpu", weight_dtype=None):
    """A residual stream x, a smaller update delta (sums that really round), a weight near its trained size."""
    x = (2 * torch.randn(shape, device=device)).to(dtype)
    delta = torch.randn(shape, device=device).to(dtype)
    # Gemma stores w and scales by (1 + w), Llama scales by w itself
    w = 0.1 * torch.randn(shape[-1], device=device) + (0.0 if unit_offset else 1.0)
    return x, delta, w.to(weight_dtype or dtype)


def check_fused(x, delta, weight, unit_offset, roundings=1.0):
    x_before, delta_before = x.clone(), delta.clone()
    with torch.inference_mode():
        summed, normed = add_rms_norm_triton(x, delta, weight, EPS, unit_offset)
        expected_summed, _ = add_rms_norm_torch(x, delta, weight, EPS, unit_offset)
        unfused = rms_norm_triton(expected_summed, weight, EPS, unit_offset)
    assert_same_bits(summed, expected_summed, "summed vs x + delta")
    assert_same_bits(normed, unfused, "normed vs rms_norm_triton(x + delta)")
    assert_close_to_float64(normed, summed, weight, unit_offset, x.dtype, roundings)
    assert_same_bits(x, x_before, "x after the call")  # no in-place update of either input
    assert_same_bits(delta, delta_before, "delta after the call")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("D", [64, 96, 3072])
@pytest.mark.parametrize("shape", [(1, 1), (5,)], ids=["decode_1x1", "rows_5"])
def test_add_rms_norm(shape, D, unit_offset, dtype):
    check_fused(*_inputs(shape + (D,), dtype, unit_offset), unit_offset)


def test_add_rms_norm_fp32_weight_on_fp16_input():
    """Llama with an fp32 weight: normed is fp32 (torch promotes), summed stays fp16."""
    x, delta, weight = _inputs((3, 96), torch.float16, False, weight_dtype=torch.float32)
    check_fused(x, delta, weight, False)


@pytest.mark.parametrize("unit_offset", [False, True])
def test_add_rms_norm_bf16_exact_sums(unit_offset):
    """bf16 on the interpreter: multiples of 1/16 below 16 in magnitude have at most 8 significant bits, so
    bf16 holds their sums exactly and the interpreter's truncating cast cannot change `summed`."""
    shape = (5, 96)
    x = (torch.randint(-128, 128, shape) / 16).to(torch.bfloat16)
    delta = (torch.randint(-127, 128, shape) / 16).to(torch.bfloat16)
    weight = (0.1 * torch.randn(96) + (0.0 if unit_offset else 1.0)).to(torch.bfloat16)
    check_fused(x, delta, weight, unit_offset, roundings=2.0)


def test_add_rms_norm_no_rows():
    x = torch.randn(0, 64)
    summed, normed = add_rms_norm_triton(x, x.clone(), torch.ones(64), EPS)
    assert summed.shape == normed.shape == (0, 64)


@pytest.mark.parametrize("call, message", [
    (lambda: add_rms_norm_triton(torch.randn(3, 40), torch.randn(3, 41), torch.randn(40), EPS),
     r"add_rms_norm_triton: delta is \(3, 41\) torch.float32 on cpu, x is \(3, 40\)"),
    (lambda: add_rms_norm_triton(torch.randn(3, 40), torch.randn(3, 40).half(), torch.randn(40), EPS),
     r"delta is \(3, 40\) torch.float16.*x is \(3, 40\) torch.float32"),
    (lambda: add_rms_norm_triton(torch.randn(3, 40), torch.randn(3, 40, device="meta"), torch.randn(40), EPS),
     r"delta .* on meta, x .* on cpu"),
    (lambda: add_rms_norm_triton(torch.randn(3, 40), torch.randn(40, 3).T, torch.randn(40), EPS),
     r"delta \(strides \(1, 3\)\) must be contiguous"),
    (lambda: add_rms_norm_triton(torch.randn(3, 40), torch.randn(3, 40), torch.randn(41), EPS),
     r"add_rms_norm_triton: weight shape \(41,\).*\(3, 40\)"),
    (lambda: add_rms_norm_triton(torch.randn(3, 40).long(), torch.randn(3, 40).long(), torch.randn(40), EPS),
     r"add_rms_norm_triton: x dtype torch.int64"),
    (lambda: add_rms_norm_triton(torch.randn(3, 40, requires_grad=True), torch.randn(3, 40), torch.randn(40), EPS),
     r"no backward.*torch.no_grad"),
])
def test_add_rms_norm_rejects(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- compiled on the GPU, bf16 included, the models' sizes ----

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("D", [96, 2048, 3072, 8192])
@pytest.mark.parametrize("shape", [(1, 1), (5,)], ids=["decode_1x1", "rows_5"])
def test_add_rms_norm_gpu(device, shape, D, unit_offset, dtype):
    check_fused(*_inputs(shape + (D,), dtype, unit_offset, device=device), unit_offset)
