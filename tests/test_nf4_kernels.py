"""Triton NF4 kernels (minilora/kernels/nf4_dequant.py, minilora/kernels/nf4_matmul.py) against their torch references.

CPU: Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), tiny odd shapes, fp32 and fp16.
GPU (`-m gpu`): the same checks compiled, bf16 included, at model-sized shapes.
"""
import pytest
import torch

from minilora.kernels import backend
from minilora.kernels.nf4_dequant import dequantize_nf4, dequantize_nf4_lora, dequantize_nf4_lora_reference
from minilora.kernels.nf4_matmul import FEW_ROWS, SMALL_M, matmul_nf4, matmul_nf4_t
from minilora import nf4

CPU_DTYPES = [torch.float32, torch.float16]
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float16: torch.finfo(torch.float16).eps,
       torch.bfloat16: torch.finfo(torch.bfloat16).eps}


def _state(n, k, dtype=torch.float32, nested=True, device="cpu"):
    return nf4.quantize_nf4(torch.randn(n, k, device=device).to(dtype), nested)


def _assert_matmul_close(out, x, w, what):
    """|out - x @ w^T| within a few roundings of the output dtype, measured against float64.

    Bound per element: 4 eps(dtype) * sum_k |x_k w_k| (the fp32 sum of products, then one cast to the
    output dtype). fp32 inputs in tl.dot stay IEEE fp32.
    """
    x64, w64 = x.double(), w.double()
    ref = x64 @ w64.transpose(-1, -2)
    scale = x64.abs() @ w64.abs().transpose(-1, -2)
    err = (out.double() - ref).abs()
    bound = 4 * EPS[out.dtype] * scale + torch.finfo(torch.float64).tiny
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {err.numel()} outside the bound; max diff "
                           f"{err.max().item():.3g}, mean diff {err.mean().item():.3g}, "
                           f"max bound {bound.max().item():.3g}")


# ---- dequantization: must be exactly the reference (same table lookup, same fp32 ops, one cast) ----

@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (37, 129), (5, 2100)])  # odd numel, > 1 program, > 256 blocks
def test_dequantize_equals_reference(shape, dtype, nested):
    state = _state(*shape, nested=nested)
    ours, ref = dequantize_nf4(state, dtype), nf4.dequantize_nf4(state, dtype)
    assert torch.equal(ours, ref), f"max diff {(ours.float() - ref.float()).abs().max().item()}"


def test_dequantize_into_out_buffer():
    state = _state(9, 64)
    out = torch.full((9, 64), float("nan"))
    assert dequantize_nf4(state, torch.float32, out=out) is out
    assert torch.equal(out, nf4.dequantize_nf4(state))


# ---- dequantization with a LoRA update folded in (W + s B A, the fused LoRA linear's merged weight) ----

def _assert_merged_close(ours, state, a, b, scaling, what):
    """Within one rounding of the output dtype of the float64 W + s B A (W the exact dequantized weight), plus the
    update's own error: its r-term fp32 sum (r + 2 roundings, s A included, at W's magnitude for half outputs,
    where W is the sum's start) and, for half outputs, tf32 operands (truncated to 10 bits: 2^-10 each)."""
    w = nf4.dequantize_nf4(state, torch.float32).double()
    exact = w + scaling * (b.double() @ a.double())
    update = scaling * (b.double().abs() @ a.double().abs())
    half = ours.dtype != torch.float32
    fp32_sum = (a.shape[0] + 2) * EPS[torch.float32] * (update + (w.abs() if half else 0))
    # fp32 output: the CPU interpreter's dot is IEEE fp32; compiled for an H100, tl.dot's fp32 path measured up to
    # 1.6e-5 (~2^-16) of the update, while W itself came out bit-identical (B = 0 below)
    fp32_dot = 2.0 ** -14 if ours.is_cuda else 0.0
    bound = EPS[ours.dtype] * exact.abs() + (2.0 ** -9 if half else fp32_dot) * update + fp32_sum + 1e-30
    err = (ours.double() - exact).abs()
    assert not (err > bound).any(), f"{what}: {int((err > bound).sum())} outside; max diff {err.max().item():.3g}"


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("n,k,r", [(37, 192, 5), (5, 64, 16), (20, 320, 1)])  # rows and ranks off the tiles
def test_dequantize_with_lora_matches_float64(n, k, r, dtype, nested):
    state = _state(n, k, nested=nested)
    a, b = torch.randn(r, k) / k ** 0.5, torch.randn(n, r)
    ours = dequantize_nf4_lora(state, a, b, 0.75, dtype)
    _assert_merged_close(ours, state, a, b, 0.75, f"W + s B A ({n}x{k}, r={r}, {dtype})")
    torch.testing.assert_close(ours, dequantize_nf4_lora_reference(state, a, b, 0.75, dtype))


def test_dequantize_with_zero_lora_is_the_dequantization():
    state = _state(33, 256)
    ours = dequantize_nf4_lora(state, torch.randn(8, 256), torch.zeros(33, 8), 2.0, torch.float16)
    assert torch.equal(ours, dequantize_nf4(state, torch.float16))


def test_dequantize_with_lora_validates_inputs():
    state = _state(8, 96)
    with pytest.raises(ValueError, match=r"\[8, 96\]; needs 2-D with K % 64 == 0"):
        dequantize_nf4_lora(state, torch.randn(4, 96), torch.randn(8, 4), 1.0, torch.float32)
    state = _state(8, 128)
    with pytest.raises(ValueError, match=r"lora_A is torch.float16 \[4, 128\]"):
        dequantize_nf4_lora(state, torch.randn(4, 128).half(), torch.randn(8, 4), 1.0, torch.float32)
    with pytest.raises(ValueError, match=r"lora_B is torch.float32 \[8, 3\].*expected contiguous float32 \[8, 4\]"):
        dequantize_nf4_lora(state, torch.randn(4, 128), torch.randn(8, 3), 1.0, torch.float32)


# ---- matmuls: GEMV (M <= SMALL_M), tensor-core kernel (M <= FEW_ROWS, 16-bit x), dequant + matmul otherwise ----
# (K % 64 != 0 always takes dequant + matmul)

@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m", [SMALL_M, 2, 5, 17, 100, FEW_ROWS + 1])  # M_PAD 16, 32, 128 for the few-row kernel
@pytest.mark.parametrize("n,k", [(37, 192), (20, 70)])  # K not a multiple of BLOCK_K; K % 64 != 0 falls back
def test_matmul_matches_reference(n, k, m, dtype, nested):
    state = _state(n, k, nested=nested)
    w = nf4.dequantize_nf4(state, dtype)
    x = torch.randn(m, k).to(dtype)
    _assert_matmul_close(matmul_nf4(x, state), x, w, f"x @ W^T, M={m}")
    g = torch.randn(m, n).to(dtype)
    _assert_matmul_close(matmul_nf4_t(g, state), g, w.T, f"g @ W, M={m}")


@pytest.mark.parametrize("m", [1, 5])  # GEMV, few-rows kernel (both split K in the interpreter's config)
def test_split_k_leaves_counters_at_zero_and_repeats_exactly(m):
    """The last program of a split resets its arrival counter, so a second call (a CUDA-graph replay) is identical."""
    from minilora.kernels import nf4_matmul

    state = _state(40, 192)
    x = torch.randn(m, 192).half()
    first, second = matmul_nf4(x, state), matmul_nf4(x, state)
    assert torch.equal(first, second)
    _assert_matmul_close(first, x, nf4.dequantize_nf4(state, torch.float16), f"split K, M={m}")
    _, counts = nf4_matmul._split_k_workspace(m, 40, x.device)
    assert not counts.any(), f"arrival counters left at {counts.unique().tolist()}"


@pytest.mark.parametrize("plan", [(1, 1), (3, 1), (2, 2), (8, 2)])  # (SPLIT_K, AHEAD); 8 splits leave some empty
def test_gemv_plans_match_reference(plan):
    from minilora.kernels import nf4_matmul

    state = _state(40, 640, nested=True)
    x = torch.randn(1, 640).to(torch.bfloat16)
    out = nf4_matmul._gemv(x, state, nf4_matmul._words(state), plan=plan)
    _assert_matmul_close(out, x, nf4.dequantize_nf4(state, torch.bfloat16), f"GEMV, plan {plan}")


@pytest.mark.parametrize("nested, plan", [(False, (1, 1)), (False, (2, 2)), (False, (3, 1)), (True, (2, 2)),
                                          (True, (3, 2))])
def test_gemv_x_a_step_ahead_changes_no_bit(plan, nested, monkeypatch):
    """16-bit x loaded a step ahead (X_AHEAD) or in the step: the same values in the same sums. (Not with a
    double-quantized absmax at AHEAD 1, where `_x_ahead` leaves it off.)"""
    from minilora.kernels import nf4_matmul

    assert nf4_matmul._x_ahead(2, nested, plan[1])
    state = _state(40, 640, nested=nested)
    x = torch.randn(1, 640).to(torch.float16)
    outs = []
    for on in (True, False):
        monkeypatch.setattr(nf4_matmul, "X_AHEAD", on)
        outs.append(nf4_matmul._gemv(x, state, nf4_matmul._words(state), plan=plan))
    assert torch.equal(outs[0], outs[1])
    _assert_matmul_close(outs[0], x, nf4.dequantize_nf4(state, torch.float16), f"GEMV, plan {plan}")


def test_gemv_plan_fits_one_wave_when_a_split_can():
    from minilora.kernels.nf4_matmul import GEMV_PROGRAMS_PER_SM, GEMV_TILE, MAX_SPLIT_K, gemv_plan

    def used_splits(k_groups, split):
        per_split = -(-(-(-k_groups // split)) // GEMV_TILE["GROUPS"]) * GEMV_TILE["GROUPS"]
        return -(-k_groups // per_split)

    for sms in (1, 16, 108, 132):
        for n in (64, 3072, 5120, 16384, 128256):
            for k_groups in (1, 12, 48, 128, 172):
                split, ahead = gemv_plan(1, n, k_groups, sms)
                assert 1 <= split <= MAX_SPLIT_K and ahead in (1, 2)
                assert used_splits(k_groups, split) == split, (sms, n, k_groups, split)  # no program without work
                blocks = -(-n // GEMV_TILE["BLOCK_N"])
                fitting = [s for s in range(1, MAX_SPLIT_K + 1) for a in (1, 2)
                           if used_splits(k_groups, s) == s and blocks * s <= sms * GEMV_PROGRAMS_PER_SM[a]]
                if fitting:
                    assert blocks * split <= sms * GEMV_PROGRAMS_PER_SM[ahead], (sms, n, k_groups, split, ahead)


def test_matmul_reads_misaligned_packed_through_dequant():
    """A `packed` view not on a 16-byte boundary cannot be read as int32 words: the dequant path takes it."""
    state = _state(8, 128)
    storage = torch.zeros(state.packed.numel() + 3, dtype=torch.uint8)
    shifted = storage[3:].view_as(state.packed)
    shifted.copy_(state.packed)
    moved = nf4.NF4State(shifted, state.absmax, state.code, state.shape, state.dtype, state.nested_absmax,
                         state.nested_code, state.offset)
    x = torch.randn(1, 128)
    _assert_matmul_close(matmul_nf4(x, moved), x, nf4.dequantize_nf4(state), "misaligned packed")


def test_gemv_reads_a_16_bit_row_starting_mid_pair():
    """x as a contiguous view one fp16 element into its storage: not readable as int32 pairs in place."""
    state = _state(24, 128)
    storage = torch.randn(129).half()
    x = storage[1:].view(1, 128)
    assert x.data_ptr() % 4 != 0
    _assert_matmul_close(matmul_nf4(x, state), x, nf4.dequantize_nf4(state, torch.float16), "mid-pair x")


def test_matmul_keeps_leading_dims():
    state = _state(24, 128)
    x = torch.randn(2, 3, 128)
    out = matmul_nf4(x, state)
    assert out.shape == (2, 3, 24)
    _assert_matmul_close(out, x, nf4.dequantize_nf4(state), "batched x @ W^T")


@pytest.mark.parametrize("m", [2, 24])
def test_linear_gradients_triton_vs_torch_backend(m):
    lin = nf4.Linear4bit.from_weight(torch.randn(40, 128), torch.randn(40), backend="triton")
    lin.bias.requires_grad_(True)
    grads = {}
    x0 = torch.randn(m, 128)
    for name in ("triton", "torch"):
        lin.backend = name
        x = x0.clone().requires_grad_(True)
        lin.bias.grad = None
        y = lin(x)
        (y.square().sum()).backward()
        grads[name] = (y.detach(), x.grad, lin.bias.grad)
    w = nf4.dequantize_nf4(lin.state)
    _assert_matmul_close(grads["triton"][0] - lin.bias.detach(), x0, w, "forward")
    if m > SMALL_M:  # dequant + F.linear in both backends: the same numbers exactly
        for a, b in zip(grads["triton"], grads["torch"]):
            assert torch.equal(a, b), f"triton vs torch: max diff {(a - b).abs().max().item()}"
    torch.testing.assert_close(grads["triton"][1], grads["torch"][1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads["triton"][2], grads["torch"][2], rtol=1e-5, atol=1e-4)


def test_backends_agree_on_cpu():
    state = _state(24, 128)
    x = torch.randn(5, 128)
    outs = {name: backend.matmul(x, state, name) for name in backend.BACKENDS}
    for name, out in outs.items():
        _assert_matmul_close(out, x, nf4.dequantize_nf4(state), f"backend {name}")
    assert torch.equal(backend.dequantize(state, backend="triton"), backend.dequantize(state, backend="bnb"))
    assert backend.resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="'cuda_magic'"):
        backend.resolve_backend("cuda_magic", torch.device("cpu"))


# ---- launchers reject bad input before launching, with the numbers ----

def test_launchers_validate_inputs():
    state = _state(8, 128)
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 128\)"):
        matmul_nf4(torch.randn(2, 64), state)
    with pytest.raises(ValueError, match="not contiguous"):
        matmul_nf4(torch.randn(128, 2).T, state)
    with pytest.raises(ValueError, match="int64"):
        matmul_nf4(torch.ones(2, 128, dtype=torch.int64), state)
    with pytest.raises(ValueError, match="is on meta"):
        matmul_nf4(torch.randn(2, 128, device="meta"), state)
    short = nf4.NF4State(state.packed, state.absmax[:3], state.code, state.shape, state.dtype,
                         state.nested_absmax, state.nested_code, state.offset)
    with pytest.raises(ValueError, match=r"absmax has 3 values; expected ceil\(1024 / 64\) = 16"):
        dequantize_nf4(short)
    huge = nf4.NF4State(state.packed, state.absmax, state.code, torch.Size((2**16, 2**15)), state.dtype)
    with pytest.raises(ValueError, match="2147483648 elements"):
        dequantize_nf4(huge)
    with pytest.raises(ValueError, match="expected contiguous"):
        dequantize_nf4(state, torch.float32, out=torch.empty(128, 8).T)


# ---- the same, compiled on the GPU, bf16 included, model-sized ----

@pytest.mark.gpu
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 129), (3072, 8192), (1, 1)])
def test_dequantize_equals_reference_gpu(device, shape, dtype, nested):
    state = _state(*shape, nested=nested, device=device)
    ours, ref = dequantize_nf4(state, dtype), nf4.dequantize_nf4(state, dtype)
    assert torch.equal(ours, ref), f"max diff {(ours.float() - ref.float()).abs().max().item()}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,r", [(3072, 8192, 16), (1024, 3072, 16), (37, 192, 5), (8192, 3072, 64)])
def test_dequantize_with_lora_matches_float64_gpu(device, n, k, r, dtype):
    state = _state(n, k, device=device)
    a, b = torch.randn(r, k, device=device) / k ** 0.5, torch.randn(n, r, device=device)
    _assert_merged_close(dequantize_nf4_lora(state, a, b, 0.75, dtype), state, a, b, 0.75, f"{n}x{k} r={r} {dtype}")
    assert torch.equal(dequantize_nf4_lora(state, a, torch.zeros_like(b), 0.75, dtype), dequantize_nf4(state, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 7, 16, 64])
@pytest.mark.parametrize("n,k", [(1024, 3072), (37, 192), (3072, 8192), (20, 70)])
def test_matmul_matches_reference_gpu(device, n, k, m, dtype):
    state = _state(n, k, device=device)
    w = nf4.dequantize_nf4(state, dtype)
    x = torch.randn(m, k, device=device).to(dtype)
    _assert_matmul_close(matmul_nf4(x, state), x, w, f"x @ W^T, M={m}")
    g = torch.randn(m, n, device=device).to(dtype)
    _assert_matmul_close(matmul_nf4_t(g, state), g, w.T, f"g @ W, M={m}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_backends_agree_gpu(device, dtype):
    lin = nf4.Linear4bit.from_weight(torch.randn(256, 512, device=device, dtype=dtype), None)
    x0 = torch.randn(4, 33, 512, device=device, dtype=dtype)
    results = {}
    for name in backend.BACKENDS:
        lin.backend = name
        x = x0.clone().requires_grad_(True)
        y = lin(x)
        y.float().square().mean().backward()
        results[name] = (y, x.grad)
    w = nf4.dequantize_nf4(lin.state, dtype)
    for name, (y, grad) in results.items():
        _assert_matmul_close(y, x0, w, f"{name} forward")
    for name in ("triton", "bnb"):
        torch.testing.assert_close(results[name][1], results["torch"][1])  # default bf16/fp16 tolerances
