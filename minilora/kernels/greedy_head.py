"""Exact greedy (argmax) LM head that screens W (V, D) through an int8 copy: about half the bytes of bf16 W read.

Plain path (reference `greedy_tokens_reference`): p = hidden @ W^T with fp32 accumulation, rounded to the
logits dtype (as bf16 `F.linear` and HF's greedy do), argmax with ties to the lowest index.
`screen_head(W)` keeps, per row r, q_r = round(w_r / s_r) in [-127, 127] (int8), s_r = absmax(w_r) / 127
(fp32) and a bound c_r with |p_r - u_r| <= ||x||_2 c_r for every x, where u_r = s_r (x . q_r) in fp32:

    |p_r - u_r| <= |x.(w_r - s_r q_r)| + |p_r - x.w_r| + |u_r - s_r x.q_r|
                <= ||x|| ||w_r - s_r q_r||  +  gamma_D ||x|| ||w_r||  +  gamma_{D+1} ||x|| ||s_r q_r||

(Cauchy-Schwarz on the residual; a D-term fp32 dot in any order, FMA or not, is off by at most
gamma_D sum_k |x_k w_k| <= gamma_D ||x|| ||w||, gamma_n = n u / (1 - n u), u = 2^-24; u_r rounds once more).
c_r = (||w_r - s_r q_r|| + 2 (D + 2) u (||w_r|| + ||s_r q_r||)) (1 + 1e-6) + 1e-30, in float64 (its own
rounding is far inside the 1e-6), rounded up to fp32; 2 (D + 2) u >= gamma_{D+1} while D u < 1/4, and also
covers tensor-core sums that truncate (2u a step).

greedy_tokens (B <= 16 rows of hidden): two kernels and a mask, no host sync, capturable in a CUDA graph:
1. `_screen_kernel`, one program per BLOCK_V rows, all B rows at once (the int8 tile read once): u_r, then
   upper_r = u_r + n c_r into a (B, V) buffer and max_r (u_r - n c_r) into (B, programs), with n = ||x|| computed
   in fp32 times NORM_SLACK = (1 + 1e-6)(1 + (D + 8) 2^-23): that covers the fp32 sum of squares (gamma_D / 2),
   the sqrt and the products (a u each). Program 0 also resets the exact pass's outputs.
2. `_exact_kernel`, about four programs an SM: each reduces the screen's per-program maxima to
   L = max_r lower_r <= max_r p_r = P, keeps the rows of its range with upper_r >= T = L - rel |L| - tiny, and
   computes their exact fp32 logits one row at a time (most programs have none), rounded to the logits dtype.
   The best (value, lowest row) goes out as one int64 through `atomic_min`: high word -1 - the value's bits
   mapped to a monotone int32, low word the row; the token is its low word.

Why T keeps every row that can win: a row r can win only if round(p_r) = round(P) = R. If R is normal, p_r and
P lie in R's rounding interval, of width <= ulp(R) <= 2^-m |R| (m = stored mantissa bits: bf16 7, fp16 10,
fp32 23), so P - p_r <= 1.01 2^-m |P| = delta(P); a subnormal R puts them within finfo.tiny. y - delta(y) grows
with y and P >= L, so p_r >= L - delta(L) - tiny. We use rel = 2 * 2^-m + 2^-20 and tiny = 2 finfo.tiny:
the factor 2 leaves 2^-m |L| for the few fp32 roundings of lower, upper, L and T (each u times a value that
the same monotonicity argument ties to |L|); the 2^-20 (16 u) does that job for fp32 logits, where rounding
to the dtype is the identity and 2 * 2^-23 = 4u alone would be tight. Overflow: every p_r >= finfo.max may
round to +inf and tie, so T <= finfo.max; if T <= -finfo.max every row may round to -inf: T = -inf keeps all.
Rows with upper_r < T cannot tie or beat the winner, so the argmax over the candidates is the plain one
(modulo the fp32 summation order of the exact dots). Inputs must be finite.

bf16 rounding is done on the bits (round to nearest even), not by a cast: the CPU interpreter's fp32 -> bf16
cast truncates (see tests/test_add_rms_norm.py). Layout: hidden (B, D), W (V, D), contiguous; q is stored as
words (V, ceil(D / 4)) int32 where byte k of word j is column k * D/4 + j (`pack_words`), so each byte meets a
contiguous slice of x, and a byte becomes a float by its bits (0x4B0000uu = 2^23 + uu), not by a conversion.
Tests: tests/test_greedy_head.py (`-m gpu`: the Llama-3.2-3B head, a CUDA graph). Benchmark:
benchmarks/greedy_head.py.
"""
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from minilora.kernels.nf4_matmul import _sm_count

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_MAX_B = 16
_U = 2.0 ** -24
_MANTISSA = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _config(B, V, D):
    """(B_PAD, BLOCK_V, BLOCK_W, num_warps) of the screen; 32 x 128 words at 8 warps measured best of five at
    B = 1 on the H100 (benchmarks/RESULTS.md: 135 µs for the 3B head's 394 MB, the rate of a plain int8 read).

    At B > 1 the tile shrinks to keep B_PAD * BLOCK_V * BLOCK_W = 4096 accumulators a program.
    """
    b_pad = triton.next_power_of_2(B)
    block_w, warps = (128, 8) if b_pad == 1 else (64, 4)
    block_v = max(1, 4096 // (b_pad * block_w))
    if INTERPRET:  # it runs programs one by one, each reduction ~2 ms: fewer, larger programs
        block_v *= 8
    return b_pad, block_v, block_w, warps


class ScreenedHead(NamedTuple):
    words: torch.Tensor  # (V, D4) int32, D4 = ceil(D / 4): byte k of word j is q[:, k * D4 + j] (0 past D)
    scale: torch.Tensor  # (V,) fp32, absmax(W row) / 127 (1 for a row of zeros)
    bound: torch.Tensor  # (V,) fp32, c_r: |x.w_r - scale_r (x.q_r)| <= ||x|| c_r, both fp32 dots, any order


def pack_words(q):
    """(V, D) int8 -> (V, ceil(D / 4)) int32 words in the screen's layout (`ScreenedHead.words`)."""
    V, D = q.shape
    D4 = -(-D // 4)
    padded = torch.zeros(V, 4 * D4, dtype=torch.int8, device=q.device)
    padded[:, :D] = q
    return padded.view(V, 4, D4).transpose(1, 2).reshape(V, 4 * D4).view(torch.int32)


def unpack_words(words, D):
    """The inverse of pack_words: (V, D) int8."""
    V, D4 = words.shape
    return words.view(torch.int8).view(V, D4, 4).transpose(1, 2).reshape(V, 4 * D4)[:, :D]


@torch.no_grad()
def screen_head(weight, chunk_rows=16384):
    """The int8 copy of `weight` (V, D) and its per-row error bound, in float64 `chunk_rows` rows at a time."""
    if weight.dim() != 2 or weight.dtype not in _MANTISSA:
        raise ValueError(f"screen_head: weight {tuple(weight.shape)} {weight.dtype}, expected (V, D) float")
    V, D = weight.shape
    words = torch.empty(V, -(-D // 4), dtype=torch.int32, device=weight.device)
    scale = torch.empty(V, dtype=torch.float32, device=weight.device)
    bound = torch.empty_like(scale)
    for start in range(0, V, chunk_rows):
        w = weight[start:start + chunk_rows].double()
        s = (w.abs().amax(1) / 127).float()
        s = torch.where(s > 0, s, 1.0)  # zero (or underflowing) rows: q = 0 and the bound is ||w_r||
        qq = torch.round(w / s.double()[:, None]).clamp(-127, 127)
        sq = s.double()[:, None] * qq  # exact: 24-bit times 8-bit
        c = (w - sq).norm(dim=1) + 2 * (D + 2) * _U * (w.norm(dim=1) + sq.norm(dim=1))
        c = c * (1 + 1e-6) + 1e-30
        c32 = c.float()
        c32 = torch.where(c32.double() < c, torch.nextafter(c32, torch.full_like(c32, float("inf"))), c32)
        words[start:start + chunk_rows] = pack_words(qq.to(torch.int8))
        scale[start:start + chunk_rows] = s
        bound[start:start + chunk_rows] = c32
    if not torch.isfinite(bound).all():
        raise ValueError("screen_head: weight has non-finite values")
    return ScreenedHead(words, scale, bound)


def greedy_tokens_reference(hidden, weight, logits_dtype=None):
    """The plain path: fp32-accumulated logits rounded to logits_dtype, argmax (torch: first of equal maxima)."""
    logits = hidden.float() @ weight.float().T
    return logits.to(logits_dtype or weight.dtype).float().argmax(-1)


@triton.jit
def _byte_as_float(words, K: tl.constexpr):
    """Signed byte K of each word as fp32, exactly: the bits 0x4B0000uu are the float 2^23 + uu, where
    uu = byte + 128 (the caller flips each byte's top bit); no int -> float conversion instruction (1/4 rate)."""
    return (((words >> (8 * K)) & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _screen_kernel(hidden_ptr, words_ptr, scale_ptr, bound_ptr, upper_ptr, low_ptr, key_ptr, count_ptr,
                   B, V, D, D4, P, norm_slack, B_PAD: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_W: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    bs = tl.arange(0, B_PAD)
    cols = tl.arange(0, BLOCK_W)
    row_ok = rows < V
    if pid == 0:  # the exact pass's outputs, which it reduces into with atomics
        tl.store(key_ptr + bs, 9223372036854775807, mask=bs < B)
        tl.store(count_ptr + bs, 0, mask=bs < B)
    w_rows = words_ptr + rows.to(tl.int64)[:, None] * D4
    s = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    c = tl.load(bound_ptr + rows, mask=row_ok, other=0.0)
    if B_PAD == 1:  # decoding's batch 1: 2-D tiles, no layout change through shared memory
        acc1 = tl.zeros((BLOCK_V, BLOCK_W), tl.float32)
        squares1 = tl.zeros((BLOCK_W,), tl.float32)
        for j0 in range(0, D4, BLOCK_W):
            j = j0 + cols
            words = tl.load(w_rows + j[None, :], mask=row_ok[:, None] & (j[None, :] < D4), other=0)
            words = words ^ -2139062144  # 0x80808080: every byte b -> b + 128, unsigned
            for k in tl.static_range(4):
                x = tl.load(hidden_ptr + k * D4 + j, mask=(j < D4) & (k * D4 + j < D), other=0.0).to(tl.float32)
                acc1 += x[None, :] * _byte_as_float(words, k)
                squares1 += x * x
        u = (tl.sum(acc1, axis=1) * s)[None, :]  # (1, BLOCK_V)
        norm = tl.sqrt(tl.sum(squares1[None, :], axis=1))
    else:
        acc = tl.zeros((B_PAD, BLOCK_V, BLOCK_W), tl.float32)  # summed over D once, after the loop
        squares = tl.zeros((B_PAD, BLOCK_W), tl.float32)
        for j0 in range(0, D4, BLOCK_W):
            j = j0 + cols
            words = tl.load(w_rows + j[None, :], mask=row_ok[:, None] & (j[None, :] < D4), other=0)
            words = words ^ -2139062144
            for k in tl.static_range(4):
                x = tl.load(hidden_ptr + bs[:, None] * D + k * D4 + j[None, :],
                            mask=(bs[:, None] < B) & (j[None, :] < D4) & (k * D4 + j[None, :] < D), other=0.0)
                x = x.to(tl.float32)
                acc += x[:, None, :] * _byte_as_float(words, k)[None, :, :]
                squares += x * x
        u = tl.sum(acc, axis=2) * s[None, :]  # (B_PAD, BLOCK_V)
        norm = tl.sqrt(tl.sum(squares, axis=1))
    radius = (norm * norm_slack)[:, None] * c[None, :]
    keep = (bs[:, None] < B) & row_ok[None, :]
    tl.store(upper_ptr + bs[:, None] * V + rows[None, :], u + radius, mask=keep)
    lower = tl.max(tl.where(keep, u - radius, float("-inf")), axis=1)
    tl.store(low_ptr + bs * P + pid, lower, mask=bs < B)


@triton.jit
def _round_to_logits(x, LOGITS: tl.constexpr):
    """fp32 -> LOGITS ("bf16", "fp16", "fp32") -> fp32, round to nearest even."""
    if LOGITS == "bf16":  # on the bits: add half an ulp less one, plus the kept lowest bit (ties to even)
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif LOGITS == "fp16":
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _exact_kernel(hidden_ptr, weight_ptr, upper_ptr, low_ptr, key_ptr, count_ptr, B, V, D, P,
                  rel, tiny, biggest, LOGITS: tl.constexpr, B_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                  ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    bs = tl.arange(0, B_PAD)
    cols = tl.arange(0, BLOCK_D)
    # L = max of the screen's lower bounds, from its per-program maxima (each program reduces them: no launch)
    # (Reduced after the loop, not inside it: Triton 3.6's thread-locality pass asserts on a loop-carried
    # reduction whose result has more than one use, as L's has below.)
    lows = tl.full((B_PAD, BLOCK_P), float("-inf"), tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        lows = tl.maximum(lows, tl.load(low_ptr + bs[:, None] * P + p[None, :],
                                        mask=(bs[:, None] < B) & (p[None, :] < P), other=float("-inf")))
    L = tl.max(lows, axis=1)
    T = tl.minimum(L - rel * tl.abs(L) - tiny, biggest)  # the module docstring says why
    T = tl.where(T <= -biggest, float("-inf"), T)
    rows = pid * ROWS + tl.arange(0, ROWS)
    valid = (bs[:, None] < B) & (rows[None, :] < V)
    upper = tl.load(upper_ptr + bs[:, None] * V + rows[None, :], mask=valid, other=0.0)
    candidate = valid & (upper >= T[:, None])  # (B_PAD, ROWS)
    tl.atomic_add(count_ptr + bs, tl.sum(candidate.to(tl.int32), axis=1), mask=bs < B)
    needed = tl.max(candidate.to(tl.int32), axis=0) > 0  # (ROWS,): a candidate for some batch row
    # The best (value, lowest row) as one int64 that atomic_min orders: high word -1 - (the value's bits mapped
    # to a monotone int32), low word the row. Candidates are few (none in most programs): one row at a time.
    key = tl.full((B_PAD,), 9223372036854775807, tl.int64)
    left = tl.sum(needed.to(tl.int32), axis=0)
    while left > 0:
        row = tl.min(tl.where(needed, rows, V), axis=0)
        acc = tl.zeros((B_PAD, BLOCK_D), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + cols
            x = tl.load(hidden_ptr + bs[:, None] * D + d[None, :], mask=(bs[:, None] < B) & (d[None, :] < D),
                        other=0.0)
            w = tl.load(weight_ptr + row.to(tl.int64) * D + d, mask=d < D, other=0.0)
            acc += x.to(tl.float32) * w.to(tl.float32)[None, :]
        value = _round_to_logits(tl.sum(acc, axis=1), LOGITS)  # (B_PAD,)
        bits = value.to(tl.int32, bitcast=True)
        monotone = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        mine = tl.sum(tl.where(rows[None, :] == row, candidate.to(tl.int32), 0), axis=1) > 0  # rows it is one for
        key = tl.where(mine, tl.minimum(key, ((-1 - monotone).to(tl.int64) << 32) | row.to(tl.int64)), key)
        needed = needed & (rows != row)
        left -= 1
    tl.atomic_min(key_ptr + bs, key, mask=bs < B)


def _validate(hidden, weight, screened, logits_dtype, name):
    if not (hidden.is_cuda or INTERPRET):
        raise ValueError(f"{name}: hidden is on {hidden.device}; the Triton kernels need a CUDA tensor "
                         "(or TRITON_INTERPRET=1 set before triton is imported); use greedy_tokens_reference")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}, "
                         "expected (B, D) and (V, D)")
    B, D = hidden.shape
    V = weight.shape[0]
    if not 1 <= B <= _MAX_B:
        raise ValueError(f"{name}: {B} rows of hidden, expected 1 to {_MAX_B}")
    if weight.dtype not in _MANTISSA or hidden.dtype != weight.dtype:
        raise ValueError(f"{name}: hidden {hidden.dtype}, weight {weight.dtype}: expected the same float dtype")
    if logits_dtype not in _MANTISSA:
        raise ValueError(f"{name}: logits_dtype {logits_dtype}, expected float16, bfloat16 or float32")
    want = {"words": ((V, -(-D // 4)), torch.int32), "scale": ((V,), torch.float32),
            "bound": ((V,), torch.float32)}
    for field, (shape, dtype) in want.items():
        t = getattr(screened, field)
        if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{name}: screened.{field} is {tuple(t.shape)} {t.dtype} (strides {t.stride()}), "
                             f"expected contiguous {shape} {dtype} for weight {(V, D)}")
    for label, t in [("weight", weight)] + [(f"screened.{f}", getattr(screened, f)) for f in want]:
        if t.device != hidden.device:
            raise ValueError(f"{name}: {label} on {t.device}, hidden on {hidden.device}")
    if not (hidden.is_contiguous() and weight.is_contiguous()):
        raise ValueError(f"{name}: hidden (strides {hidden.stride()}) and weight (strides {weight.stride()}) "
                         "must be contiguous")


def _greedy(hidden, weight, screened, logits_dtype, name):
    """(tokens (B,) int64, candidate rows per batch row (B,) int32), no host sync: two launches and a mask."""
    logits_dtype = logits_dtype or weight.dtype
    _validate(hidden, weight, screened, logits_dtype, name)
    (B, D), V = hidden.shape, weight.shape[0]
    b_pad, block_v, block_w, num_warps = _config(B, V, D)
    P = triton.cdiv(V, block_v)
    upper = torch.empty(B, V, dtype=torch.float32, device=hidden.device)
    low = torch.empty(B, P, dtype=torch.float32, device=hidden.device)
    key = torch.empty(B, dtype=torch.int64, device=hidden.device)
    count = torch.empty(B, dtype=torch.int32, device=hidden.device)
    _screen_kernel[(P,)](hidden, screened.words, screened.scale, screened.bound, upper, low, key, count,
                         B, V, D, screened.words.shape[1], P, (1 + 1e-6) * (1 + (D + 8) * 2.0 ** -23),
                         B_PAD=b_pad, BLOCK_V=block_v, BLOCK_W=block_w, num_warps=num_warps)
    # The exact pass: ROWS rows a program, about four programs an SM (four in all under the interpreter).
    programs = 4 * _sm_count(hidden.device) if not INTERPRET else 4
    rows = min(triton.next_power_of_2(triton.cdiv(V, programs)), 4096)
    info = torch.finfo(logits_dtype)
    _exact_kernel[(triton.cdiv(V, rows),)](
        hidden, weight, upper, low, key, count, B, V, D, P, 2.0 * 2.0 ** -_MANTISSA[logits_dtype] + 2.0 ** -20,
        2.0 * info.tiny, info.max, LOGITS=_NAMES[logits_dtype], B_PAD=b_pad,
        BLOCK_P=min(triton.next_power_of_2(P), 4096), ROWS=rows, BLOCK_D=1024 // b_pad, num_warps=4)
    return key & 0xFFFFFFFF, count


def greedy_tokens(hidden, weight, screened, logits_dtype=None):
    """argmax of (hidden @ weight.T).to(logits_dtype) over V, exactly as `greedy_tokens_reference`: (B,) int64."""
    return _greedy(hidden, weight, screened, logits_dtype, "greedy_tokens")[0]


def count_candidates(hidden, weight, screened, logits_dtype=None):
    """How many rows of W the exact pass reads for each row of hidden: (B,) int32 (the screen's efficiency)."""
    return _greedy(hidden, weight, screened, logits_dtype, "count_candidates")[1]
