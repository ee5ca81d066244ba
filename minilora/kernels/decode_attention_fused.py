"""A decode step's attention in one Triton launch: RoPE, KV-cache write, attention and the split combine.

`decode_attention_fused(q, k, v, cos, sin, k_cache, v_cache, key_positions, key_segments, slot, scale, softcap,
window, splits) -> out (B, H, Dh)` computes what minilora/kernels/decode_attention.py computes in two or three launches,
    q_rot = rope_cache_write(q, k, v, cos, sin, k_cache, v_cache, slot)        (rope(k), v -> caches at slot)
    out = decode_attention(q_rot, k_cache, v_cache, key_positions, key_segments, slot, scale, softcap, window)
with the same formulas, masking rule, roundings (rope(q) rounded to q's dtype, rope(k) to the cache dtype, P to the
cache dtype for P @ V, the output once) and input layout (that file's docstring). Its reference is those two
references composed: `rope_cache_write_reference`, then `decode_attention_reference`.

Why: at batch 1 a decode step is ~300 kernels and each launch costs ~1.5-2 µs, so three launches per block
(RoPE + cache write, attention, split combine) become one.

Grid (B * Hkv, SPLITS), one program per kv head and key chunk, as `_decode_attention_kernel`:
  - every program rotates the raw q rows of its G query heads in registers (q is never written out);
  - the program whose chunk holds `slot` (read from memory: a CUDA graph replay sees its new value) rotates the
    kv head's new k, writes rope(k) and v to the caches at `slot`, and starts its online softmax with that key
    from registers; its loop skips the cache row at `slot`, which it would otherwise read back before its own
    write is guaranteed visible. Chunks are disjoint, so no other program reads that row. A slot outside [0, S)
    lies in no chunk: nothing is written and the output is undefined (positions and segments are read at the
    clamped slot, so nothing is read out of bounds);
  - with SPLITS > 1 each program writes fp32 (max, sum, unnormalised output) partials, then counts itself on a
    per-(b, kv head) counter; the last of the SPLITS to arrive merges the partials of its G heads (the combine
    kernel's formula, in a fixed order, so the result does not depend on which program was last) and writes
    the output. The counters are a persistent zeroed int32 workspace per (B * Hkv, device), left at zero by the
    last program (minilora/kernels/nf4_matmul.py's `_arrives_last`), so a graph replays it; one stream at a time may use
    it, as nf4_matmul's workspace.
Rounding differs from the two-launch path in one place: the own key's weight (exp(0) = 1 when it starts the
softmax) is not rounded to the cache dtype before it multiplies v, one rounding fewer.

Test: tests/test_decode_attention_fused.py. Benchmark: benchmarks/decode_attention.py (beside the torch path and
the two/three-launch path). Measured (H100, benchmarks/RESULTS.md): slower alone (8.3 vs 7.4 µs at batch 1,
S = 256), but the Llama-3.2-3B decode step's CUDA-graph replay went from 1.885 / 1.866 to 1.840 / 1.840 ms with it.
"""
import torch
import triton
import triton.language as tl

from .decode_attention import (INTERPRET, _attend_keys, _check_masking, _check_rope_inputs, _check_tensors,
                                      _row_stride, _tanh, keys_per_block, plan_splits)
from minilora.kernels.nf4_matmul import _arrives_last
from minilora.kernels.pdl import let_dependents_start, pdl_enabled, wait_for_inputs


@triton.jit
def _rope_rows(x_ptr, d, cos, sin, mask, HALF: tl.constexpr):
    """x cos + rotate_half(x) sin in fp32 for the head vectors at x_ptr + d, d the head-dim index (last axis):
    rotate_half(x)[d] = -x[d + HALF] below HALF, x[d - HALF] from HALF on."""
    x = tl.load(x_ptr + d, mask=mask, other=0.0).to(tl.float32)
    partner = tl.load(x_ptr + tl.where(d < HALF, d + HALF, d - HALF), mask=mask, other=0.0).to(tl.float32)
    return x * cos + tl.where(d < HALF, -partner, partner) * sin


@triton.jit
def _merge_splits(max_ptr, denom_ptr, acc_ptr, out_ptr, first_row, G, HEAD_DIM: tl.constexpr,
                  SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = sum_i w_i acc_i / sum_i w_i denom_i, w_i = exp(m_i - max m), for the G (b, head) rows from first_row:
    decode_attention.py's `_combine_splits_kernel`, one head at a time. All SPLITS partials of a head are loaded
    at once (one round trip to L2 per head, not one per split) and summed in a fixed order, so the output does
    not depend on which program arrived last. Read through L2 (.cg) after _arrives_last's acquire."""
    i = tl.arange(0, BLOCK_SPLITS)
    d = tl.arange(0, BLOCK_D)
    i_mask, d_mask = i < SPLITS, d < HEAD_DIM
    for h in range(0, G):
        partial = (first_row + h) * SPLITS + i
        m = tl.load(max_ptr + partial, mask=i_mask, other=float("-inf"), cache_modifier=".cg")
        denom = tl.load(denom_ptr + partial, mask=i_mask, other=0.0, cache_modifier=".cg")
        acc = tl.load(acc_ptr + partial[:, None] * HEAD_DIM + d[None, :], mask=i_mask[:, None] & d_mask[None, :],
                      other=0.0, cache_modifier=".cg")
        w = tl.exp(m - tl.max(m, axis=0))  # a split with no visible key has m = -inf: weight 0
        out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * denom, axis=0)
        tl.store(out_ptr + (first_row + h) * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _decode_attention_fused_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, seg_ptr,
                                   slot_ptr, out_ptr, max_ptr, denom_ptr, acc_ptr, count_ptr,
                                   q_stride, k_stride, v_stride, cos_stride, sin_stride,
                                   cache_stride_b, cache_stride_h, cache_stride_s, pos_stride, seg_stride,
                                   Hkv, G, S, keys_per_split, scale, softcap, window,
                                   HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr,
                                   HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr,
                                   BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                                   BLOCK_SPLITS: tl.constexpr, PDL: tl.constexpr):
    # G is not a constexpr: with one, _merge_splits' loop over the G heads was unrolled and every head's partials
    # loaded at once (sm_90, Triton 3.6: 193 registers instead of 154 at Dh = 128)
    let_dependents_start(PDL)  # minilora/kernels/pdl.py
    wait_for_inputs(PDL)  # q, k, v, cos, sin, the slot, positions and segments all come from earlier kernels
    pid, split = tl.program_id(0), tl.program_id(1)
    b, kv_head = pid // Hkv, pid % Hkv
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * G + g  # the query heads that read this kv head (GQA)
    g_mask, d_mask = g < G, d < HEAD_DIM
    q_mask = g_mask[:, None] & d_mask[None, :]
    cos = tl.load(cos_ptr + b * cos_stride + d, mask=d_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + b * sin_stride + d, mask=d_mask, other=0.0).to(tl.float32)
    q = _rope_rows(q_ptr + b * q_stride + heads[:, None] * HEAD_DIM, d[None, :], cos[None, :], sin[None, :], q_mask,
                   HEAD_DIM // 2).to(q_ptr.dtype.element_ty)  # rounded as rope_cache_write returns it
    k_new = _rope_rows(k_ptr + b * k_stride + kv_head * HEAD_DIM, d, cos, sin, d_mask,
                       HEAD_DIM // 2).to(k_cache_ptr.dtype.element_ty)  # rounded as the cache holds it
    v_new = tl.load(v_ptr + b * v_stride + kv_head * HEAD_DIM + d, mask=d_mask, other=0.0)

    slot = tl.load(slot_ptr)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, S)
    owns = (slot >= start) & (slot < end)  # this chunk holds the query's own key (no chunk does if slot is bad)
    cache = b.to(tl.int64) * cache_stride_b + kv_head * cache_stride_h
    new_row = cache + slot.to(tl.int64) * cache_stride_s + d
    written = d < tl.where(owns, HEAD_DIM, 0)  # a where: the interpreter mis-types bool & scalar
    tl.store(k_cache_ptr + new_row, k_new, mask=written)
    tl.store(v_cache_ptr + new_row, v_new, mask=written)
    # the query's own slot holds its position and segment (clamped: a bad slot reads inside the tensors)
    query_slot = tl.minimum(tl.maximum(slot, 0), S - 1)
    query_pos = tl.load(pos_ptr + b * pos_stride + query_slot)
    query_seg = tl.load(seg_ptr + b * seg_stride + query_slot)

    # the online softmax starts from the own key (always visible: same segment, distance 0), taken from registers;
    # the loop stops at the slot (keys after it are not the query's past; decode_attention.py's docstring)
    s_own = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale  # (BLOCK_G,)
    if HAS_SOFTCAP:
        s_own = softcap * _tanh(s_own / softcap)
    m = tl.where(owns, s_own, float("-inf"))  # running max of each head's scores
    denom = tl.zeros((BLOCK_G,), tl.float32) + tl.where(owns, 1.0, 0.0)  # running sum of exp(s - m)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32) + tl.where(owns, v_new.to(tl.float32), 0.0)[None, :]
    # the own key is already in (m, denom, acc); its cache row is skipped, as it may not read back this write yet
    m, denom, acc = _attend_keys(q, m, denom, acc, start, tl.minimum(end, slot + 1), slot, b, query_pos, query_seg,
                                 pos_ptr, seg_ptr, pos_stride, seg_stride, k_cache_ptr, v_cache_ptr, cache,
                                 cache_stride_s, d, d_mask, scale, softcap, window, HEAD_DIM, HAS_SOFTCAP, HAS_WINDOW,
                                 DOT_FP32, BLOCK_D, BLOCK_S)

    row = b * (Hkv * G) + heads  # (b, head) as a row of (B * H, ...)
    if SPLITS == 1:
        out = acc / denom[:, None]
        tl.store(out_ptr + row[:, None] * HEAD_DIM + d[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        partial = row * SPLITS + split
        tl.store(max_ptr + partial, m, mask=g_mask)
        tl.store(denom_ptr + partial, denom, mask=g_mask)
        tl.store(acc_ptr + partial[:, None] * HEAD_DIM + d[None, :], acc, mask=q_mask)
        if _arrives_last(count_ptr + pid, SPLITS):  # the other SPLITS - 1 programs of this (b, kv head) are done
            _merge_splits(max_ptr, denom_ptr, acc_ptr, out_ptr, b * (Hkv * G) + kv_head * G, G, HEAD_DIM, SPLITS,
                          BLOCK_SPLITS, BLOCK_D)


_arrival_counters: dict[tuple, torch.Tensor] = {}


def _arrival_counter(programs, device):
    """Zeroed int32 counters, one per (b, kv head), reused per (B * Hkv, device): a call leaves them at zero."""
    key = (programs, device)
    if key not in _arrival_counters:
        _arrival_counters[key] = torch.zeros(programs, dtype=torch.int32, device=device)
    return _arrival_counters[key]


def decode_attention_fused(q, k, v, cos, sin, k_cache, v_cache, key_positions, key_segments, slot, scale,
                           softcap=None, window=None, splits=None):
    """rope(k), v into k_cache/v_cache[:, :, slot] (in place), then the attention of rope(q) over the visible
    cache keys; out (B, H, Dh) in q's dtype. q (B, H * Dh), k, v (B, Hkv * Dh), cos, sin (B or 1, Dh) as
    rope_cache_write takes them; `splits` forces the number of key chunks (default: `plan_splits`)."""
    who = "decode_attention_fused"
    B, Hkv, S, Dh, H = _check_rope_inputs(who, q, k, v, cos, sin, k_cache, v_cache, slot)
    _check_masking(who, H, Hkv, key_positions, key_segments, B, S, softcap, window, splits)
    _check_tensors(who, ["q"], q=q, key_positions=key_positions, key_segments=key_segments)
    n_splits, keys_per_split = plan_splits(B, Hkv, S, Dh, splits)
    out = torch.empty((B, H, Dh), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    if n_splits > 1:  # fp32 partials; shapes known on the host, so a CUDA graph can capture the allocation
        partial_max = torch.empty((B * H, n_splits), dtype=torch.float32, device=q.device)
        partial_denom = torch.empty_like(partial_max)
        partial_acc = torch.empty((B * H, n_splits, Dh), dtype=torch.float32, device=q.device)
    else:
        partial_max = partial_denom = partial_acc = out  # not written
    pdl = pdl_enabled(q.device)
    G = H // Hkv
    _decode_attention_fused_kernel[(B * Hkv, n_splits)](
        q, k, v, cos, sin, k_cache, v_cache, key_positions, key_segments, slot, out,
        partial_max, partial_denom, partial_acc, _arrival_counter(B * Hkv, q.device),
        q.stride(0), k.stride(0), v.stride(0), _row_stride(cos, B), _row_stride(sin, B),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), key_positions.stride(0), key_segments.stride(0),
        Hkv, G, S, keys_per_split, float(scale), float(softcap or 1.0), int(window or 0),
        HEAD_DIM=Dh, SPLITS=n_splits, HAS_SOFTCAP=softcap is not None, HAS_WINDOW=window is not None,
        DOT_FP32=q.dtype == torch.float32 or INTERPRET, BLOCK_G=max(16, triton.next_power_of_2(G)),
        BLOCK_D=triton.next_power_of_2(Dh), BLOCK_S=keys_per_block(Dh), BLOCK_SPLITS=triton.next_power_of_2(n_splits),
        PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out
