"""The 4-bit gate/up GEMV with the GLU in its epilogue (minilora/kernels/nf4_matmul.py `matmul_nf4_glu`) against the two
launches it replaces in a decode step: the joined gate/up GEMV (`_gemv`, gate and up stored in x's dtype), then
kernels/glu.py's `_glu_forward_kernel`. The claim is bit-identity (same fp32 sums, same roundings): torch.equal.

CPU: Triton's interpreter (tests/conftest.py), fp32 and fp16, with GEMV configs forced so that a thread holds 1, 2
and 4 (gate, up) pairs, with and without split K. Also a float64 reference, and greedy decoding of tiny models.
GPU (`-m gpu`): the autotuned kernels compiled, bf16 included (the 3.9 interpreter's bf16 rounding is unreliable).
"""
import pytest
import torch

from minilora.kernels import backend, nf4_matmul
from minilora.kernels.glu import geglu_triton, swiglu_triton
from minilora.kernels.nf4_matmul import matmul_nf4, matmul_nf4_glu
from minilora import load_model, model as model_module, nf4
from minilora.generate import Decoder, generate, left_pad
from tiny import make_checkpoint

ACTIVATIONS = ["silu", "gelu_tanh"]
# (BLOCK_N, GROUPS, ROWS, SPLIT_K, AHEAD): ROWS / 2 pairs a thread; K split 2 (the interpreter's config) and 3 ways
CONFIGS = [dict(**nf4_matmul.GEMV_TILE, SPLIT_K=2, AHEAD=2), dict(BLOCK_N=16, GROUPS=2, ROWS=4, SPLIT_K=1, AHEAD=1),
           dict(BLOCK_N=32, GROUPS=1, ROWS=8, SPLIT_K=3, AHEAD=2)]


def _state(n, k, nested=True, device="cpu"):
    return nf4.quantize_nf4(torch.randn(n, k, device=device), nested)


def _unfused(x, state, activation):
    """The decode MLP's two launches: the joined gate/up GEMV, then the GLU kernel on its halves."""
    F = state.shape[0] // 2
    gate, up = (part.contiguous() for part in nf4_matmul._gemv(x, state, nf4_matmul._words(state)).split(F, dim=-1))
    return (swiglu_triton if activation == "silu" else geglu_triton)(gate, up)


def _assert_equal(ours, ref, what):
    diff = (ours.double() - ref.double()).abs()
    assert torch.equal(ours, ref), f"{what}: max diff {diff.max().item():.3g}, mean diff {diff.mean().item():.3g}"


@pytest.fixture(params=CONFIGS, ids=lambda c: "n{BLOCK_N}-g{GROUPS}-rows{ROWS}-split{SPLIT_K}-ahead{AHEAD}".format(**c))
def gemv_config(request, monkeypatch):
    """The GEMV's tiling and (interpreter) plan set to one config: both paths use it, as both share one on a GPU."""
    c = request.param
    monkeypatch.setattr(nf4_matmul, "GEMV_TILE", {k: c[k] for k in ("BLOCK_N", "GROUPS", "ROWS")})
    monkeypatch.setattr(nf4_matmul, "INTERPRET_PLAN", (c["SPLIT_K"], c["AHEAD"]))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("F,k,nested", [(37, 192, True), (5, 64, False)])  # odd F, partial blocks; an empty split
def test_fused_equals_gemv_then_glu_kernel(gemv_config, F, k, nested, dtype, activation):
    state = _state(2 * F, k, nested)
    x = torch.randn(1, k).to(dtype) * 2  # gates of a few units: both sides of the activation's bend
    ours = matmul_nf4_glu(x, state, activation)
    assert ours.shape == (1, F) and ours.dtype == dtype
    _assert_equal(ours, _unfused(x, state, activation), f"F={F}, K={k}, {dtype}, {activation}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_glu_mode_writes_each_row_of_x_to_its_own_output_row(gemv_config, activation):
    """The GEMV's GLU mode at M = 2 (called directly: `matmul_nf4_glu` sends M > SMALL_M elsewhere): row r's
    features land in out[r] only (a feature mask one too long would overwrite out[1, 0] from row 0's programs)."""
    F = 13
    state = _state(2 * F, 128)
    x = torch.randn(2, 128).half()
    ours = nf4_matmul._gemv(x, state, nf4_matmul._words(state), activation)
    _assert_equal(ours, _unfused(x, state, activation), f"M=2, {activation}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_matches_float64(dtype, activation):
    """Against act(x W_gate^T) * (x W_up^T) in float64 from the dequantized weight: the matmul bound of
    tests/test_nf4_kernels.py (4 eps sum |x w|) for gate and up, carried through |act'| <= 1.2 and |act| <= |g|,
    plus the two roundings of act(gate) and of the product."""
    F, k = 45, 256
    state = _state(2 * F, k)
    x = torch.randn(1, k).to(dtype)
    w = nf4.dequantize_nf4(state, dtype).double()
    x64 = x.double()
    g, u = (x64 @ w.T).split(F, dim=-1)
    s_g, s_u = (x64.abs() @ w.abs().T).split(F, dim=-1)
    act = torch.nn.functional.silu if activation == "silu" else lambda t: torch.nn.functional.gelu(t, approximate="tanh")
    ref = act(g) * u
    eps = torch.finfo(dtype).eps
    bound = 4 * eps * (1.2 * s_g * u.abs() + g.abs() * s_u) + 3 * eps * ref.abs() + 1e-30
    err = (matmul_nf4_glu(x, state, activation).double() - ref).abs()
    assert not (err > bound).any(), (f"{int((err > bound).sum())} of {F} outside; max diff {err.max().item():.3g}, "
                                     f"mean diff {err.mean().item():.3g}")


def test_split_k_leaves_counters_at_zero_and_repeats_exactly():
    """The interpreter's config splits K: the last program resets its counter, so a repeat (a graph replay) is equal."""
    state = _state(2 * 21, 192)
    x = torch.randn(1, 1, 192).half()
    first, second = matmul_nf4_glu(x, state, "silu"), matmul_nf4_glu(x, state, "silu")
    assert first.shape == (1, 1, 21)
    _assert_equal(first, second, "repeat")
    _, counts = nf4_matmul._split_k_workspace(1, 42, x.device)
    assert not counts.any(), f"arrival counters left at {counts.unique().tolist()}"


@pytest.mark.parametrize("m,k", [(3, 128), (1, 96)])  # more rows (few-rows kernel); K % 64 != 0 (dequant + matmul)
def test_other_inputs_take_matmul_then_glu_kernel(m, k):
    state = _state(2 * 11, k)
    x = torch.randn(2, m, k).half()
    gate, up = matmul_nf4(x, state).split(11, dim=-1)
    ours = matmul_nf4_glu(x, state, "gelu_tanh")
    assert ours.shape == (2, m, 11)
    _assert_equal(ours, geglu_triton(gate.contiguous(), up.contiguous()), f"M={2 * m}, K={k}")


def test_launcher_validates_inputs():
    state = _state(16, 128)
    with pytest.raises(ValueError, match=r"activation 'gelu'; expected one of \('silu', 'gelu_tanh'\)"):
        matmul_nf4_glu(torch.randn(1, 128), state, "gelu")  # exact erf GELU: not what minilora/kernels/glu.py computes
    with pytest.raises(ValueError, match=r"weight shape \[15, 128\]; expected an even number of rows"):
        matmul_nf4_glu(torch.randn(1, 128), _state(15, 128), "silu")
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 128\)"):
        matmul_nf4_glu(torch.randn(1, 64), state, "silu")
    with pytest.raises(ValueError, match="not contiguous"):
        matmul_nf4_glu(torch.randn(128, 2).T[:1], state, "silu")


# ---- the decode MLP: JoinedLinear4bit.glu in MLP.forward ----

@pytest.mark.parametrize("family", ["llama", "gemma"])  # SwiGLU; GeGLU with the tanh approximation
def test_decoding_through_the_fused_gate_up_keeps_greedy_tokens(family, tmp_path, monkeypatch):
    """On CUDA a one-row decode step runs gate/up + GLU as one launch; here the Triton path (use_triton forced, the
    4-bit layers on the "triton" backend) runs in the interpreter. Greedy tokens equal the torch path's, every
    decode step of every block took the fused launch, and a step's logits equal those with the fusion turned off."""
    make_checkpoint(family, tmp_path, seed=21)
    model, tok = load_model(str(tmp_path), dtype=torch.float32, device="cpu", quantize="nf4")
    prompts = [tok.encode("def add(a, b):", add_special_tokens=True)]
    new = 6
    expected = generate(model, prompts, new, stop_ids=[], pad_id=tok.pad_id)
    monkeypatch.setattr(model_module, "use_triton", lambda x: True)
    # the interpreter runs programs one by one: a wide config, still splitting K, takes a few of them per GEMV
    monkeypatch.setattr(nf4_matmul, "GEMV_TILE", dict(BLOCK_N=64, GROUPS=1, ROWS=8))
    monkeypatch.setattr(nf4_matmul, "INTERPRET_PLAN", (2, 1))
    monkeypatch.setattr(backend, "_setting", "triton")
    calls, fused = [], nf4.JoinedLinear4bit.glu
    monkeypatch.setattr(nf4.JoinedLinear4bit, "glu", lambda self, *args: calls.append(1) or fused(self, *args))
    assert generate(model, prompts, new, stop_ids=[], pad_id=tok.pad_id) == expected
    assert len(calls) == (new - 1) * len(model.model.layers)  # every decode step, every block

    def first_step_logits():
        with torch.inference_mode():
            decoder = Decoder(model, 1, 32)
            first = decoder.prefill(*left_pad(prompts, tok.pad_id, "cpu")).argmax(-1)
            return decoder.step(first, torch.tensor([len(prompts[0])]))

    with_fusion = first_step_logits()
    monkeypatch.setattr(nf4.JoinedLinear4bit, "fuses_glu", lambda self, x: False)
    _assert_equal(with_fusion, first_step_logits(), "decode step logits, fused vs unfused gate/up + GLU")


# ---- compiled on the GPU: the planned launches, bf16 included, model-sized ----

@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("F,k", [(8192, 3072), (37, 192), (4097, 8192)])  # Llama-3.2-3B; odd widths
def test_fused_equals_gemv_then_glu_kernel_gpu(device, F, k, dtype, activation):
    """Bit-identical as both modes of one weight shape get the same launch plan (`gemv_plan`)."""
    state = _state(2 * F, k, device=device)
    x = torch.randn(1, k, device=device).to(dtype)
    first = matmul_nf4_glu(x, state, activation)
    _assert_equal(first, _unfused(x, state, activation), f"F={F}, K={k}, {dtype}, {activation}")
    _assert_equal(matmul_nf4_glu(x, state, activation), first, "repeat")


@pytest.mark.gpu
def test_graph_decode_with_fused_gate_up_equals_unfused(device, tmp_path, monkeypatch):
    make_checkpoint("llama", tmp_path, seed=6)
    model, tok = load_model(str(tmp_path), dtype=torch.bfloat16, device=device, quantize="nf4")
    prompts = [tok.encode("def add(a, b):", add_special_tokens=True)]
    fused = generate(model, prompts, 12, stop_ids=[], pad_id=tok.pad_id, use_graph=True)
    monkeypatch.setattr(nf4.JoinedLinear4bit, "fuses_glu", lambda self, x: False)
    assert generate(model, prompts, 12, stop_ids=[], pad_id=tok.pad_id, use_graph=True) == fused
