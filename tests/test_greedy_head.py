"""The screened greedy head (minilora/kernels/greedy_head.py) vs the plain argmax `greedy_tokens_reference`.

The kernel must give exactly the reference's tokens: fresh random inputs on odd shapes (V, D not multiples of
the blocks), integer-valued inputs whose fp32 logits are exact in any summation order (so planted ties and
near ties after rounding to the logits dtype have one right answer), weights whose int8 copy ranks rows wrongly,
and logits that overflow fp16. The bound c_r is checked on its own, in float64 and in fp32, and the screen must
leave few candidate rows on Gaussian data (the point of the method). CPU: the Triton interpreter (bf16
included: the kernel rounds bf16 on the bits); `-m gpu`: the Llama-3.2-3B head shape and a CUDA graph.
"""
import pytest
import torch
import triton

from minilora.kernels import greedy_head
from minilora.kernels.greedy_head import (ScreenedHead, count_candidates, greedy_tokens, greedy_tokens_reference,
                                          pack_words, screen_head, unpack_words)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check_tokens(hidden, weight, logits_dtype=None, screened=None):
    """Kernel tokens == reference tokens; on a mismatch print both tokens' fp32 logits. Returns the tokens."""
    screened = screened or screen_head(weight)
    tokens = greedy_tokens(hidden, weight, screened, logits_dtype)
    expected = greedy_tokens_reference(hidden, weight, logits_dtype)
    assert tokens.dtype == torch.int64 and tokens.shape == (hidden.shape[0],)
    if not torch.equal(tokens.cpu(), expected.cpu()):
        logits = hidden.float() @ weight.float().T
        bad = (tokens != expected).nonzero().flatten().tolist()
        raise AssertionError(f"{weight.dtype} V, D = {tuple(weight.shape)}, logits {logits_dtype}: rows {bad} "
                             f"got {tokens[bad].tolist()} (logits {logits[bad, tokens[bad]].tolist()}), expected "
                             f"{expected[bad].tolist()} (logits {logits[bad, expected[bad]].tolist()})")
    return tokens


def small_blocks(monkeypatch, block_v=16, block_d=32):
    """Several D chunks with a tail and many row blocks on the small test shapes."""
    monkeypatch.setattr(greedy_head, "_config", lambda B, V, D: (triton.next_power_of_2(B), block_v, block_d, 4))


# ---- screen_head: the int8 copy and its bound ----

@pytest.mark.parametrize("dtype", DTYPES)
def test_screen_head_matches_float64(dtype):
    w = torch.randn(300, 70).to(dtype)
    w[5] = 0  # a row of zeros: scale 1, q 0
    s = screen_head(w, chunk_rows=128)  # three chunks
    w64 = w.double()
    absmax = w64.abs().amax(1)
    scale = torch.where(absmax > 0, absmax / 127, 1.0).float()
    assert torch.equal(s.scale, scale)
    q = torch.round(w64 / scale.double()[:, None]).clamp(-127, 127)
    assert s.words.dtype == torch.int32 and s.words.shape == (300, 18)  # ceil(70 / 4) words a row
    assert torch.equal(unpack_words(s.words, 70).double(), q)
    assert torch.equal(pack_words(unpack_words(s.words, 70)), s.words)  # the padding bytes are 0
    assert q.abs().amax(1)[torch.arange(300) != 5].eq(127).all()  # each row's largest entry maps to +-127
    assert s.bound.dtype == torch.float32 and (s.bound > 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_bound_holds(dtype):
    """|x.w_r - s_r (x.q_r)| <= ||x|| c_r: exactly (float64) and between the two fp32 dots, for random x and for
    x along a row's quantization residual, where Cauchy-Schwarz is tight (the bound is then nearly reached)."""
    V, D = 500, 130
    w = (0.02 * torch.randn(V, D)).to(dtype)
    s = screen_head(w)
    w64, sq64 = w.double(), s.scale.double()[:, None] * unpack_words(s.words, D).double()
    residual = (w64 - sq64)[:40].to(dtype)
    x = torch.cat([(2 * torch.randn(200, D)).to(dtype), residual])
    norm = x.double().norm(dim=1, keepdim=True)
    exact = (x.double() @ w64.T - x.double() @ sq64.T).abs()
    fp32 = (x.float() @ w.float().T - (x.float() @ unpack_words(s.words, D).float().T) * s.scale).double().abs()
    for what, err in (("float64", exact), ("fp32", fp32)):
        ratio = err / (norm * s.bound.double())
        assert ratio.max() <= 1, f"{what}: the bound fails, max error / bound {ratio.max().item():.6g}"
    tight = exact[200 + torch.arange(40), torch.arange(40)] / (norm[200:, 0] * s.bound.double()[:40])
    assert tight.min() > 0.99, f"residual directions reach only {tight.min().item():.4g} of the bound"


# ---- greedy_tokens vs the plain argmax ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, V, D", [(1, 3001, 200), (3, 2003, 130), (8, 1000, 96)])
def test_matches_reference(B, V, D, dtype):
    check_tokens(torch.randn(B, D).to(dtype), torch.randn(V, D).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_reference_small_blocks(monkeypatch, dtype):
    small_blocks(monkeypatch)
    check_tokens((2 * torch.randn(5, 200)).to(dtype), (0.02 * torch.randn(1001, 200)).to(dtype))


def exact_int8_rows(V, D):
    """Integer rows holding a 127 in the last column: scale 1, the int8 copy is exact and the bounds are tight."""
    w = torch.randint(-127, 128, (V, D)).float()
    w[:, -1] = 127
    return w


def check_planted_ties(dtype, logits_dtype):
    """Integer inputs: every fp32 logit is an exact integer whatever the summation order, and the screen's bounds
    are tight (`exact_int8_rows`). Row 0 of hidden (0 in the last column) gets logit P (a multiple of 4096, exact
    in bf16 and fp16) at rows 21, 500 and V - 1, P - 1 at row 3 and P + 1 at rows 40 and 700: fp32 logits pick row
    40; bf16 and fp16 round all seven to P and pick row 3, whose exact logit lies below the best lower bound (the
    rounding margin alone keeps it). The other rows of hidden give random exact ties and near ties."""
    V, D = 1000, 96
    w = exact_int8_rows(V, D)
    x = torch.randint(-10, 11, (3, D)).float()
    x[0, 0], x[0, -1] = 1, 0
    x[0, 1] = int(-(x[0, 2:].abs().sum() + 1)) % 64  # sum |x[0]| = 0 mod 64, P = 64 sum |x[0]|
    best = torch.where(x[0] < 0, -64.0, 64.0)
    best[-1] = 127
    for row in (3, 21, 40, 500, 700, V - 1):
        w[row] = best
    w[3, 0], w[40, 0], w[700, 0] = 63, 65, 65
    tokens = check_tokens(x.to(dtype), w.to(dtype), logits_dtype)
    assert tokens[0] == (40 if logits_dtype == torch.float32 else 3)


@pytest.mark.parametrize("logits_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_planted_ties(dtype, logits_dtype):
    check_planted_ties(dtype, logits_dtype)


@pytest.mark.parametrize("logits_dtype", DTYPES)
def test_planted_ties_small_blocks(monkeypatch, logits_dtype):
    """The tied rows now sit in different programs: the lowest index is chosen across programs."""
    small_blocks(monkeypatch)
    check_planted_ties(torch.bfloat16, logits_dtype)


@pytest.mark.parametrize("logits_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rounding_interval_edges(dtype, logits_dtype):
    """Two rows a whole rounding interval apart that round to the same R: the best P = R + ulp/2 - 4 (row 600)
    and p = R - ulp/2 (row 7, lower: a tie, to even R). Tight bounds, so only rel >= 2^-m keeps row 7 (a margin
    of half that drops it). Row 2, R - ulp/2 - 4, rounds to R - ulp. Integer logits, exact in any order."""
    V, D = 1000, 96
    w = exact_int8_rows(V, D)
    x = torch.full((1, D), 6.0)
    x[0, 0], x[0, -1] = 4, 0  # 64 * 94 * 6 = 36096 from 64s in columns 1..94; column 0 adds 4 * w[r, 0]
    ulp = 2.0 ** 15 * torch.finfo(logits_dtype).eps  # R is in [2^15, 2^16)
    R = 71 * 512  # = 36352: a multiple of 2 ulp, so even
    for row, logit in ((600, R + ulp / 2 - 4), (7, R - ulp / 2), (2, R - ulp / 2 - 4)):
        w[row, 1:-1] = 64
        w[row, 0] = (logit - 36096) / 4
    tokens = check_tokens(x.to(dtype), w.to(dtype), logits_dtype)
    assert tokens[0] == 7
    assert greedy_tokens_reference(x.to(dtype), w.to(dtype), torch.float32)[0] == 600


@pytest.mark.parametrize("outlier", [60.0, 1000.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_screen_top_is_not_the_answer(dtype, outlier):
    """One large entry per row (in a column where hidden is 0) makes the int8 copy coarse: its ranking is wrong
    (60: noisy; 1000: every other entry rounds to 0, all rows tie on the screen), the kernel still exact."""
    B, V, D = 8, 1000, 128
    w = torch.randn(V, D)
    w[:, 0] = outlier * torch.sign(torch.randn(V))
    x = torch.randn(B, D)
    x[:, 0] = 0
    x, w = x.to(dtype), w.to(dtype)
    s = screen_head(w)
    tokens = check_tokens(x, w, screened=s)
    screen_top = ((x.float() @ unpack_words(s.words, D).float().T) * s.scale).argmax(-1)
    assert (screen_top != tokens).any(), "the int8 ranking agreed everywhere: the test lost its point"
    counts = count_candidates(x, w, s)
    print(f"outlier {outlier}: candidates {counts.tolist()} of {V}")
    assert (counts > 1).all()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_fp16_overflow():
    """fp16 logits beyond 65504 round to inf and tie: the lowest such row wins, not the largest fp32 logit.
    Logits all below -65504 all round to -inf: row 0 wins."""
    w = torch.randint(0, 100, (700, 96)).half()
    w[:100] = torch.randint(0, 10, (100, 96)).half()  # finite logits (< 15360) before the overflowing rows
    x = torch.full((1, 96), 16.0).half()
    logits = x.float() @ w.float().T
    tokens = check_tokens(x, w)
    assert logits[0, tokens[0]] > 65520 and tokens[0] != logits[0].argmax() and tokens[0] >= 100
    w = torch.randint(60, 100, (700, 96)).half()  # logits <= -16 * 96 * 60 = -92160
    tokens = check_tokens(-x, w)
    assert tokens[0] == 0 and (-x.float() @ w.float().T).argmax() != 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_screen_screens(dtype):
    """Gaussian W and hidden: the exact pass reads only a few rows of W (the speed of the method)."""
    V, D = 4096, 256
    x, w = torch.randn(4, D).to(dtype), (0.02 * torch.randn(V, D)).to(dtype)
    s = screen_head(w)
    counts = count_candidates(x, w, s)
    print(f"{dtype}: candidates {counts.tolist()} of V = {V}")
    assert (counts >= 1).all() and (counts < 0.1 * V).all(), counts.tolist()
    check_tokens(x, w, screened=s)


def test_rejects():
    w = torch.randn(50, 40)
    s = screen_head(w)
    x = torch.randn(2, 40)
    cases = [
        (torch.randn(17, 40), w, s, None, r"17 rows of hidden, expected 1 to 16"),
        (torch.randn(2, 41), w, s, None, r"hidden \(2, 41\) and weight \(50, 40\)"),
        (x.half(), w, s, None, r"hidden torch.float16, weight torch.float32"),
        (x, w, s, torch.int32, r"logits_dtype torch.int32"),
        (x, w, screen_head(torch.randn(51, 40)), None, r"screened.words is \(51, 10\).*for weight \(50, 40\)"),
        (x, w, s._replace(scale=s.scale.double()), None, r"screened.scale is \(50,\) torch.float64"),
        (x, w.to("meta"), s, None, r"weight on meta, hidden on cpu"),
        (torch.randn(40, 2).T, w, s, None, r"hidden \(strides \(1, 2\)\).*contiguous"),
        (x, torch.randn(40, 50).T, s, None, r"weight \(strides \(1, 50\)\).*contiguous"),
    ]
    for hidden, weight, screened, logits_dtype, message in cases:
        with pytest.raises(ValueError, match=message):
            greedy_tokens(hidden, weight, screened, logits_dtype)
    with pytest.raises(ValueError, match="non-finite"):
        screen_head(torch.tensor([[1.0, float("nan")]]))
    assert isinstance(s, ScreenedHead)


# ---- compiled on the GPU: the Llama-3.2-3B head ----

def _llama_head(device, B):
    w = (0.02 * torch.randn(128256, 3072, device=device)).bfloat16()
    x = (2 * torch.randn(B, 3072, device=device)).bfloat16()  # RMS-normed hidden states times a ~2 norm weight
    return x, w


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 8])
def test_llama_head_gpu(device, B):
    x, w = _llama_head(device, B)
    s = screen_head(w)
    for _ in range(3):
        check_tokens(x, w, screened=s)
        print(f"B={B}: candidates {count_candidates(x, w, s).tolist()} of 128256")
        x = (2 * torch.randn_like(x, dtype=torch.float32)).bfloat16()


@pytest.mark.gpu
def test_in_cuda_graph_gpu(device):
    """No host sync, fixed shapes: captured once, replayed on new hidden states."""
    x, w = _llama_head(device, 2)
    s = screen_head(w)
    side = torch.cuda.Stream()  # compile and warm up outside the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        greedy_tokens(x, w, s)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = greedy_tokens(x, w, s)
    for _ in range(3):
        x.copy_((2 * torch.randn_like(x, dtype=torch.float32)).bfloat16())
        graph.replay()
        assert torch.equal(tokens, greedy_tokens_reference(x, w))
