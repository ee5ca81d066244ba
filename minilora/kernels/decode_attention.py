"""Attention of one new token per row against a preallocated KV cache (a decode step), in two Triton launches.

1. `rope_cache_write(q, k, v, cos, sin, k_cache, v_cache, slot) -> q_rot`: RoPE of q and k in HF's
   "rotate_half" layout (as `model.apply_rope`: dim j pairs with j + Dh/2; transformers' apply_rotary_pos_emb),
       y[:Dh/2] = x1 c1 - x2 s1,   y[Dh/2:] = x2 c2 + x1 s2      (x1, x2 = x[:Dh/2], x[Dh/2:]; c, s likewise)
   in fp32, rounded once; rotated k and plain v go to cache index `slot`, rotated q is returned (B, H, Dh).
   Grid (B, H + Hkv): a program rotates one head of q, or one kv head of k and copies that head of v.
2. `decode_attention(q, k_cache, v_cache, key_positions, key_segments, slot, scale, softcap, window) -> out`:
       s_j = scale q.k_j,   s_j = softcap tanh(s_j / softcap) (Gemma 2, before the mask),   out = softmax(s) @ V
   over the keys visible by model.py's one masking rule, read at the query's own cache slot: key j is visible
   iff seg[j] == seg[slot] and pos[j] <= pos[slot] and pos[slot] - pos[j] < window, and j <= slot (a cache
   fills in slot order: what lies after the query's slot is not part of its past, and is never read, so a
   long cache costs only its filled part). Unfilled slots (segment -1)
   are never visible and the query sees its own slot, so no row is empty (a row with none gives NaN, as torch's
   softmax over all -inf does). GQA: head h reads kv head h // (H / Hkv). Softmax in fp32; P is rounded to the
   cache dtype for P @ V (as model.py's softcapped path and SDPA's fused kernels do), which sums in fp32; the
   output is rounded once.

Design (flash-decoding, Dao et al. 2023): a decode step reads all of K and V once and does little arithmetic per
byte, so it is bound by memory and needs many programs in flight even at batch 1. Grid (B * Hkv, SPLITS): a
program takes the G = H / Hkv query heads that share one kv head (their rows padded to 16, tl.dot's minimum), so
K and V are read once for all G, over one chunk of the S keys in BLOCK_S blocks, with an online softmax. With
SPLITS > 1 each program writes fp32 (max, sum, unnormalised output) partials and `_combine_splits_kernel` merges
them. The K/V loads are bounded by the slot, not by each key's visibility, so they do not wait for the
positions and segments (invisible rows' V is zeroed after the load: no NaN from stale padding). `plan_splits`
picks SPLITS from shapes alone. Nothing reads a device value on the host and every buffer's
shape is known there, so both launches can be captured in a CUDA graph; the kernels read `slot` from memory, so a
replay sees its new value.

Memory layout: q (B, H*Dh), k and v (B, Hkv*Dh), cos and sin (B or 1, Dh): any row stride (column slices of one
joined q/k/v projection go in without a copy), contiguous last dim. k_cache, v_cache (B, Hkv, S, Dh) with a
contiguous last dim (the model's KVCache is contiguous); key_positions, key_segments (B, S) integers; slot a
one-element integer tensor in [0, S), not checked (that would read the device): outside it rope_cache_write writes
nothing and decode_attention's output is undefined. decode_attention's q is (B, H, Dh) with a contiguous last dim,
as rope_cache_write returns it. Neither function changes an input other than rope_cache_write's two caches.

References: `rope_cache_write_reference`, `decode_attention_reference` (plain torch; given float64 inputs they
compute the exact maths the tests measure against). Test: tests/test_decode_attention.py.
Benchmark: benchmarks/decode_attention.py (beside the torch path it replaces; results in benchmarks/RESULTS.md).

decode_attention_fused.py does the same in one launch (RoPE, cache write, attention and the split combine)
and is what model.py calls; it shares this file's references, checks and helpers. The two or three launches here
stay as the benchmark's baseline: alone they are faster per call (H100: 7.4 vs 8.3 µs at batch 1, S = 256), but a
graphed decode step ran 2% faster with the one launch (benchmarks/RESULTS.md).
"""
import os

import torch
import triton
import triton.language as tl

from minilora.kernels.pdl import let_dependents_start, pdl_enabled, wait_for_inputs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Measured with benchmarks/decode_attention.py on an H100 (Llama-3.2-3B heads, bf16; benchmarks/RESULTS.md): at
# batch 1 the more splits the faster down to one 64-key block per split (S = 256: 11.4 µs in 1 split, 7.4 in 4;
# S = 512: 18.9 in 1, 8.0 in 8), while at batch 64 (512 programs already) 1 split was fastest (46 µs vs 51-68).
# Then inside the graphed Llama-3.2-3B step (H100, S = 255, batch 1, same process): 2 splits of 128 keys (the
# split count rounded down) 1.631 ms a token, 4 x 64 1.627, 8 x 32 1.626, and 8 x 32 with the K/V loads bounded
# by the slot instead of waiting on each key's position and segment 1.602 ms (4 x 64 that way: 1.654).
BLOCK_S = 32  # keys per block (16 for Dh > 128: keys_per_block)
MIN_KEYS_PER_SPLIT = 32  # one block
TARGET_PROGRAMS = 256  # about two programs per SM of an H100/H200 (132 SMs)
MAX_SPLITS = 64  # the combine holds every split's (Dh,) partial of a row in registers
MAX_HEAD_DIM = 256  # Gemma 2/3; a (16, Dh) fp32 accumulator and (BLOCK_S, Dh) tiles per program
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------- references

def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rope_cache_write_reference(q, k, v, cos, sin, k_cache, v_cache, slot):
    """Plain torch: rope(k) and v into k_cache/v_cache[:, :, slot] (in place), returns rope(q) (B, H, Dh)."""
    B, Hkv, S, Dh = k_cache.shape
    compute = torch.promote_types(k_cache.dtype, torch.float32)  # fp32, or float64 for float64 inputs
    cos, sin = cos.to(compute)[:, None], sin.to(compute)[:, None]  # (B or 1, 1, Dh): one angle for every head
    q_rot = _rope(q.reshape(B, -1, Dh).to(compute), cos, sin).to(q.dtype)
    k_rot = _rope(k.reshape(B, Hkv, Dh).to(compute), cos, sin).to(k_cache.dtype)
    index = slot.reshape(1)  # a device tensor, as the kernel reads it: no host sync
    k_cache.index_copy_(2, index, k_rot[:, :, None])
    v_cache.index_copy_(2, index, v.reshape(B, Hkv, 1, Dh).to(v_cache.dtype))
    return q_rot


def decode_attention_reference(q, k_cache, v_cache, key_positions, key_segments, slot, scale, softcap=None,
                               window=None):
    """Plain torch: the attention of q (B, H, Dh) over the visible cache keys (module docstring), (B, H, Dh)."""
    B, H, Dh = q.shape
    groups = H // k_cache.shape[1]
    compute = torch.promote_types(q.dtype, torch.float32)
    k = k_cache.repeat_interleave(groups, dim=1).to(compute)  # (B, H, S, Dh): head h reads kv head h // groups
    v = v_cache.repeat_interleave(groups, dim=1).to(compute)
    scores = torch.einsum("bhd,bhsd->bhs", q.to(compute), k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)  # Gemma 2: after scaling, before the mask
    index = slot.reshape(1, 1).expand(B, 1)
    query_position, query_segment = key_positions.gather(1, index), key_segments.gather(1, index)  # (B, 1)
    visible = (key_segments == query_segment) & (key_positions <= query_position)
    visible &= torch.arange(key_segments.shape[1], device=key_segments.device) <= slot  # the query's past only
    if window is not None:
        visible &= (query_position - key_positions) < window
    p = torch.softmax(scores.masked_fill(~visible[:, None, :], float("-inf")), dim=-1)
    # P rounded to the cache dtype for the product (model.py's softcapped path, SDPA), summed in `compute`
    return torch.einsum("bhs,bhsd->bhd", p.to(v_cache.dtype).to(compute), v).to(q.dtype)


# ---------------------------------------------------------------------------------------------- kernels

@triton.jit
def _rotate(x_ptr, cos1, cos2, sin1, sin2, cols, mask, HALF: tl.constexpr):
    """(x1 c1 - x2 s1, x2 c2 + x1 s2) in fp32 for the head vector at x_ptr."""
    x1 = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    return x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2


@triton.jit
def _rope_cache_write_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, q_out_ptr,
                             q_stride, k_stride, v_stride, cos_stride, sin_stride,
                             cache_stride_b, cache_stride_h, cache_stride_s, H, S,
                             HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr):
    let_dependents_start(PDL)  # minilora/kernels/pdl.py
    wait_for_inputs(PDL)
    b, head = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK_HALF)
    mask = cols < HALF
    cos1 = tl.load(cos_ptr + b * cos_stride + cols, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + b * cos_stride + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + b * sin_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + b * sin_stride + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    if head < H:  # a query head: rotate into the (B, H, Dh) output
        y1, y2 = _rotate(q_ptr + b * q_stride + head * (2 * HALF), cos1, cos2, sin1, sin2, cols, mask, HALF)
        out = q_out_ptr + (b * H + head) * (2 * HALF) + cols
        tl.store(out, y1.to(q_out_ptr.dtype.element_ty), mask=mask)
        tl.store(out + HALF, y2.to(q_out_ptr.dtype.element_ty), mask=mask)
    else:  # a kv head: rotated k and plain v into the cache slot
        h = head - H
        slot = tl.load(slot_ptr).to(tl.int64)
        # a bad slot writes nothing rather than past the cache (a where: the interpreter mis-types bool & scalar)
        in_cache = cols < tl.where((slot >= 0) & (slot < S), HALF, 0)
        row = b.to(tl.int64) * cache_stride_b + h * cache_stride_h + slot * cache_stride_s + cols
        y1, y2 = _rotate(k_ptr + b * k_stride + h * (2 * HALF), cos1, cos2, sin1, sin2, cols, mask, HALF)
        tl.store(k_cache_ptr + row, y1.to(k_cache_ptr.dtype.element_ty), mask=in_cache)
        tl.store(k_cache_ptr + row + HALF, y2.to(k_cache_ptr.dtype.element_ty), mask=in_cache)
        v_row = v_ptr + b * v_stride + h * (2 * HALF) + cols
        tl.store(v_cache_ptr + row, tl.load(v_row, mask=mask), mask=in_cache)
        tl.store(v_cache_ptr + row + HALF, tl.load(v_row + HALF, mask=mask), mask=in_cache)


@triton.jit
def _dot(a, b, IN_FP32: tl.constexpr):
    """a @ b summed in fp32: 16-bit operands on the tensor cores, or both in IEEE fp32.

    IN_FP32 for fp32 inputs (TF32 would lose 13 bits) and in Triton's CPU interpreter, whose tl.dot multiplies
    16-bit operands wrongly (as integer bit patterns); a product of two 16-bit floats is exact in fp32, so the
    upcast computes the same sum up to its order."""
    if IN_FP32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _tanh(x):
    """tanh from exp (core tl has no tanh in every Triton we support); exp(-2|x|) is in (0, 1]: no overflow."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _attend_keys(q, m, denom, acc, start, end, skip, b, query_pos, query_seg, pos_ptr, seg_ptr, pos_stride, seg_stride,
                 k_cache_ptr, v_cache_ptr, cache, cache_stride_s, d, d_mask, scale, softcap, window,
                 HEAD_DIM: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """The online softmax (m, denom, acc) of q's heads carried over the cache keys [start, end) visible under the
    masking rule, key `skip` excepted (-1: none); callers bound `end` by slot + 1. Shared by this file's kernel and
    the fused one."""
    for block in range(start, end, BLOCK_S):
        j = block + tl.arange(0, BLOCK_S)
        in_chunk = j < end
        key_pos = tl.load(pos_ptr + b * pos_stride + j, mask=in_chunk, other=0)
        key_seg = tl.load(seg_ptr + b * seg_stride + j, mask=in_chunk, other=-1)
        visible = in_chunk & (j != skip) & (key_seg == query_seg) & (key_pos <= query_pos)
        if HAS_WINDOW:
            visible = visible & (query_pos - key_pos < window)
        # K/V masked by the chunk only: these loads do not wait for the positions and segments above
        if BLOCK_D == HEAD_DIM:
            kv_mask = in_chunk[:, None]  # one value per row: the row's loads stay vectorised
        else:
            kv_mask = in_chunk[:, None] & d_mask[None, :]
        rows = cache + j[:, None] * cache_stride_s + d[None, :]  # (BLOCK_S, BLOCK_D)
        k = tl.load(k_cache_ptr + rows, mask=kv_mask, other=0.0)
        v = tl.where(visible[:, None], tl.load(v_cache_ptr + rows, mask=kv_mask, other=0.0), 0.0)  # 0 * NaN is NaN
        s = _dot(q, tl.trans(k), DOT_FP32) * scale  # (BLOCK_G, BLOCK_S)
        if HAS_SOFTCAP:
            s = softcap * _tanh(s / softcap)
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: exp(-inf - 0) = 0, no NaN
        alpha = tl.exp(m - m_safe)  # rescales what was summed under the old max
        p = tl.exp(s - m_safe[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v_cache_ptr.dtype.element_ty), v, DOT_FP32)
        m = m_new
    return m, denom, acc


@triton.jit
def _decode_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, seg_ptr, slot_ptr, out_ptr,
                             max_ptr, denom_ptr, acc_ptr, q_stride_b, q_stride_h, cache_stride_b, cache_stride_h,
                             cache_stride_s, pos_stride, seg_stride, Hkv, S, SPLITS, keys_per_split,
                             scale, softcap, window,
                             G: tl.constexpr, HEAD_DIM: tl.constexpr, WRITE_PARTIALS: tl.constexpr,
                             HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr,
                             BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    let_dependents_start(PDL)
    wait_for_inputs(PDL)
    pid, split = tl.program_id(0), tl.program_id(1)
    b, kv_head = pid // Hkv, pid % Hkv
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * G + g  # the query heads that read this kv head (GQA)
    g_mask, d_mask = g < G, d < HEAD_DIM
    q_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + b * q_stride_b + heads[:, None] * q_stride_h + d[None, :], mask=q_mask, other=0.0)
    # the query's own slot holds the position and segment every key is compared with
    slot = tl.load(slot_ptr)
    query_pos = tl.load(pos_ptr + b * pos_stride + slot)
    query_seg = tl.load(seg_ptr + b * seg_stride + slot)
    cache = b.to(tl.int64) * cache_stride_b + kv_head * cache_stride_h
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)  # running max of each head's scores
    denom = tl.zeros((BLOCK_G,), tl.float32)  # running sum of exp(s - m)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)  # running sum of exp(s - m) v
    start = split * keys_per_split
    end = tl.minimum(tl.minimum(start + keys_per_split, S), slot + 1)  # keys after the query's slot: not its past
    m, denom, acc = _attend_keys(q, m, denom, acc, start, end, -1, b, query_pos, query_seg, pos_ptr, seg_ptr,
                                 pos_stride, seg_stride, k_cache_ptr, v_cache_ptr, cache, cache_stride_s, d, d_mask,
                                 scale, softcap, window, HEAD_DIM, HAS_SOFTCAP, HAS_WINDOW, DOT_FP32, BLOCK_D, BLOCK_S)
    row = b * (Hkv * G) + heads  # (b, head) as a row of (B * H, ...)
    if WRITE_PARTIALS:  # fp32 (m, denom, acc) of this split; _combine_splits_kernel merges them
        partial = row * SPLITS + split
        tl.store(max_ptr + partial, m, mask=g_mask)
        tl.store(denom_ptr + partial, denom, mask=g_mask)
        tl.store(acc_ptr + partial[:, None] * HEAD_DIM + d[None, :], acc, mask=q_mask)
    else:
        out = acc / denom[:, None]
        tl.store(out_ptr + row[:, None] * HEAD_DIM + d[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _combine_splits_kernel(max_ptr, denom_ptr, acc_ptr, out_ptr, SPLITS,
                           HEAD_DIM: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
                           PDL: tl.constexpr):
    """out = sum_i w_i acc_i / sum_i w_i denom_i, w_i = exp(m_i - max m), for one (b, head) row."""
    let_dependents_start(PDL)
    wait_for_inputs(PDL)
    row = tl.program_id(0)
    i = tl.arange(0, BLOCK_SPLITS)
    d = tl.arange(0, BLOCK_D)
    i_mask, d_mask = i < SPLITS, d < HEAD_DIM
    m = tl.load(max_ptr + row * SPLITS + i, mask=i_mask, other=float("-inf"))
    denom = tl.load(denom_ptr + row * SPLITS + i, mask=i_mask, other=0.0)
    acc = tl.load(acc_ptr + (row * SPLITS + i)[:, None] * HEAD_DIM + d[None, :],
                  mask=i_mask[:, None] & d_mask[None, :], other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))  # a split with no visible key has m = -inf: weight 0
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * denom, axis=0)
    tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


# ---------------------------------------------------------------------------------------------- launchers

def _check_launchable(x, who):
    if not (x.is_cuda or INTERPRET):
        raise ValueError(f"{who}: tensor is on {x.device}; the Triton kernels need a CUDA tensor (or "
                         f"TRITON_INTERPRET=1 set before triton is imported); use {who}_reference")


def _check_tensors(who, dtype_names, **tensors):
    """One device; a contiguous last dim; the tensors named in dtype_names share one float dtype."""
    first = next(iter(tensors))
    for name, x in tensors.items():
        if x.device != tensors[first].device:
            raise ValueError(f"{who}: {name} is on {x.device}, {first} on {tensors[first].device}; expected one")
        if x.dim() and x.stride(-1) != 1:
            raise ValueError(f"{who}: {name} strides {x.stride()} need a contiguous last dim (stride 1)")
    dtypes = {name: tensors[name].dtype for name in dtype_names}
    if len(set(dtypes.values())) != 1 or tensors[dtype_names[0]].dtype not in _DTYPES:
        listed = ", ".join(f"{name} {dtype}" for name, dtype in dtypes.items())
        raise ValueError(f"{who}: dtypes {listed}; expected one of float16, bfloat16, float32 for all of them")


def _check_slot(slot, who):
    if not (torch.is_tensor(slot) and slot.numel() == 1 and slot.dtype in (torch.int32, torch.int64)):
        described = f"shape {tuple(slot.shape)} {slot.dtype}" if torch.is_tensor(slot) else type(slot).__name__
        raise ValueError(f"{who}: slot is {described}; expected a one-element int32/int64 tensor on the device")


def _check_caches(k_cache, v_cache, who):
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"{who}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must both be "
                         "(B, Hkv, S, Dh)")
    Dh = k_cache.shape[-1]
    if Dh % 2 or not 16 <= Dh <= MAX_HEAD_DIM or k_cache.shape[2] == 0:
        raise ValueError(f"{who}: caches {tuple(k_cache.shape)}: need an even head dim Dh in [16, {MAX_HEAD_DIM}] "
                         "and S >= 1")
    return k_cache.shape


def _check_rope_inputs(who, q, k, v, cos, sin, k_cache, v_cache, slot):
    """rope_cache_write's inputs (module docstring's layout); returns (B, Hkv, S, Dh, H)."""
    _check_launchable(q, who)
    B, Hkv, S, Dh = _check_caches(k_cache, v_cache, who)
    if q.dim() != 2 or q.shape[0] != B or q.shape[1] == 0 or q.shape[1] % Dh:
        raise ValueError(f"{who}: q {tuple(q.shape)} must be (B, H * Dh) = ({B}, H * {Dh}) for caches "
                         f"{tuple(k_cache.shape)}")
    if k.shape != (B, Hkv * Dh) or v.shape != (B, Hkv * Dh):
        raise ValueError(f"{who}: k {tuple(k.shape)} and v {tuple(v.shape)} must both be (B, Hkv * Dh) = "
                         f"({B}, {Hkv * Dh}) for caches {tuple(k_cache.shape)}")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] not in (1, B) or cos.shape[1] != Dh:
        raise ValueError(f"{who}: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be ({B} or 1, {Dh})")
    _check_slot(slot, who)
    _check_tensors(who, ["q", "k", "v", "k_cache", "v_cache"], q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache,
                   cos=cos, sin=sin, slot=slot)
    _check_tensors(who, ["cos", "sin"], cos=cos, sin=sin)
    return B, Hkv, S, Dh, q.shape[1] // Dh


def _check_masking(who, H, Hkv, key_positions, key_segments, B, S, softcap, window, splits):
    """decode_attention's GQA heads, masking inputs and options."""
    if H == 0 or H % Hkv:
        raise ValueError(f"{who}: q has H={H} heads, not a multiple of the caches' Hkv={Hkv} (GQA)")
    for name, x in (("key_positions", key_positions), ("key_segments", key_segments)):
        if x.shape != (B, S) or x.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{who}: {name} is {tuple(x.shape)} {x.dtype}; expected ({B}, {S}) int32/int64")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{who}: softcap={softcap}; expected None or a number > 0")
    if window is not None and not (int(window) == window and window >= 1):
        raise ValueError(f"{who}: window={window}; expected None or an integer >= 1")
    if splits is not None and not (int(splits) == splits and splits >= 1):
        raise ValueError(f"{who}: splits={splits}; expected None or an integer >= 1")


def _row_stride(x, B):
    """Row stride of cos or sin: a broadcast (1, Dh) row is read by every b with stride 0."""
    return x.stride(0) if x.shape[0] == B else 0


def rope_cache_write(q, k, v, cos, sin, k_cache, v_cache, slot):
    """rope(k), v into k_cache/v_cache[:, :, slot] (in place); returns rope(q) as a new (B, H, Dh) tensor."""
    B, Hkv, S, Dh, H = _check_rope_inputs("rope_cache_write", q, k, v, cos, sin, k_cache, v_cache, slot)
    q_rot = torch.empty((B, H, Dh), dtype=q.dtype, device=q.device)
    if B > 0:
        cos_stride, sin_stride = _row_stride(cos, B), _row_stride(sin, B)
        pdl = pdl_enabled(q.device)
        _rope_cache_write_kernel[(B, H + Hkv)](
            q, k, v, cos, sin, k_cache, v_cache, slot, q_rot, q.stride(0), k.stride(0), v.stride(0), cos_stride,
            sin_stride, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), H, S,
            HALF=Dh // 2, BLOCK_HALF=triton.next_power_of_2(Dh // 2), PDL=pdl, num_warps=1, launch_pdl=pdl)
    return q_rot


def keys_per_block(Dh):
    """BLOCK_S for head dim Dh: halved above 128, so a block's K and V tiles stay in registers."""
    return BLOCK_S if Dh <= 128 else BLOCK_S // 2


def plan_splits(B, Hkv, S, Dh, splits=None):
    """(SPLITS, keys per split) for the (B * Hkv, SPLITS) grid, from shapes alone (no device read).

    Enough splits for about TARGET_PROGRAMS programs, each over ~MIN_KEYS_PER_SPLIT keys or more; 1 when B * Hkv
    programs already fill the GPU. `splits` forces a count (tests); a split is a whole number of blocks, none
    is empty and there are at most MAX_SPLITS, so the count may come out lower."""
    if splits is None:
        splits = min(triton.cdiv(TARGET_PROGRAMS, B * Hkv), triton.cdiv(S, MIN_KEYS_PER_SPLIT))
    splits = min(max(1, splits), MAX_SPLITS)
    block_s = keys_per_block(Dh)
    keys_per_split = triton.cdiv(triton.cdiv(S, splits), block_s) * block_s
    return triton.cdiv(S, keys_per_split), keys_per_split


def decode_attention(q, k_cache, v_cache, key_positions, key_segments, slot, scale, softcap=None, window=None,
                     splits=None):
    """Attention of q (B, H, Dh) (one token per row) over the visible cache keys; out (B, H, Dh) in q's dtype.

    `splits` forces the number of key chunks (default: `plan_splits`)."""
    who = "decode_attention"
    _check_launchable(q, who)
    B, Hkv, S, Dh = _check_caches(k_cache, v_cache, who)
    if q.dim() != 3 or q.shape[0] != B or q.shape[2] != Dh:
        raise ValueError(f"{who}: q {tuple(q.shape)} must be (B, H, Dh) = ({B}, H, {Dh}) for caches "
                         f"{tuple(k_cache.shape)}")
    H = q.shape[1]
    _check_masking(who, H, Hkv, key_positions, key_segments, B, S, softcap, window, splits)
    _check_slot(slot, who)
    _check_tensors(who, ["q", "k_cache", "v_cache"], q=q, k_cache=k_cache, v_cache=v_cache,
                   key_positions=key_positions, key_segments=key_segments, slot=slot)

    n_splits, keys_per_split = plan_splits(B, Hkv, S, Dh, splits)
    out = torch.empty((B, H, Dh), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    G = H // Hkv
    if n_splits > 1:  # fp32 partials; shapes known on the host, so a CUDA graph can capture the allocation
        partial_max = torch.empty((B * H, n_splits), dtype=torch.float32, device=q.device)
        partial_denom = torch.empty_like(partial_max)
        partial_acc = torch.empty((B * H, n_splits, Dh), dtype=torch.float32, device=q.device)
    else:
        partial_max = partial_denom = partial_acc = out  # not written
    block_d = triton.next_power_of_2(Dh)
    pdl = pdl_enabled(q.device)
    _decode_attention_kernel[(B * Hkv, n_splits)](
        q, k_cache, v_cache, key_positions, key_segments, slot, out, partial_max, partial_denom, partial_acc,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        key_positions.stride(0), key_segments.stride(0), Hkv, S, n_splits, keys_per_split,
        float(scale), float(softcap or 1.0), int(window or 0),
        G=G, HEAD_DIM=Dh, WRITE_PARTIALS=n_splits > 1, HAS_SOFTCAP=softcap is not None,
        HAS_WINDOW=window is not None, DOT_FP32=q.dtype == torch.float32 or INTERPRET,
        BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_D=block_d, BLOCK_S=keys_per_block(Dh), PDL=pdl,
        num_warps=4, launch_pdl=pdl)
    if n_splits > 1:
        _combine_splits_kernel[(B * H,)](partial_max, partial_denom, partial_acc, out, n_splits, HEAD_DIM=Dh,
                                         BLOCK_SPLITS=triton.next_power_of_2(n_splits), BLOCK_D=block_d, PDL=pdl,
                                         launch_pdl=pdl)
    return out
