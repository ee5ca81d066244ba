"""Rotary position embedding (RoPE) of q and k in one Triton launch, beside the reference `rope_torch`.

Formula (HF's `apply_rotary_pos_emb`, transformers/models/llama/modeling_llama.py, "rotate_half" layout):

    rotate_half(x) = cat(-x[..., Dh/2:], x[..., :Dh/2])
    q' = q * cos + rotate_half(q) * sin,   k' = k * cos + rotate_half(k) * sin

Split each head vector into halves x1 = x[:Dh/2], x2 = x[Dh/2:] (and cos, sin likewise into c1 c2, s1 s2):

    y1 = x1 c1 - x2 s1
    y2 = x2 c2 + x1 s2

Backward: the map is linear in x, so dx is its transpose applied to dy:

    dx1 = dy1 c1 + dy2 s2
    dx2 = dy2 c2 - dy1 s1

which is the forward formula with (s1, s2) replaced by (-s2, -s1). With HF's cos = cat(freqs, freqs)
(c1 = c2, s1 = s2) that is the inverse rotation, the rotation by -angle. The kernel keeps the halves of
cos and sin apart, so it is exact for any cos and sin. cos and sin are constants: no gradient for them.

Memory layout: q (B, H, T, Dh) and k (B, Hkv, T, Dh) with any strides except a contiguous last dim, so
the usual `view(B, T, H, Dh).transpose(1, 2)` of a projection goes in without a copy. Outputs are new
tensors with the inputs' strides (no in-place update). cos and sin are (B, T, Dh) or (1, T, Dh), in
q's dtype, as HF's rotary embedding returns them. One program owns one (b, t): it loads cos and sin once
and rotates all heads of q and of k as (heads x Dh/2) blocks; the maths runs in fp32, rounding once.

`rope_cos_sin_triton(inv_freq, positions, dtype)` makes those cos and sin tables, (B, T, Dh) each, in one launch:
what `minilora.model.rope_cos_sin` (its reference) computes in seven torch kernels at 16 bits (cast, multiply,
concatenate, cos, sin, two casts), with the same arithmetic: the angle position * inv_freq[j] in fp32, its cos and
sin in fp32 (the CUDA math library's, as torch's kernels call it), rounded once to `dtype`. A batch-1 decode step
is bound by its launches, ~1.5 µs each, so the six saved there count.

Test: tests/test_train_kernels.py. Benchmark: benchmarks/train_kernels.py.
"""
import os

import torch
import triton
import triton.language as tl

from minilora.kernels.pdl import let_dependents_start, pdl_enabled, wait_for_inputs


@triton.jit
def _rotate_heads(x_ptr, out_ptr, x_stride_b, x_stride_h, x_stride_t, out_stride_b, out_stride_h,
                  out_stride_t, b, t, n_heads, cos1, cos2, sin1, sin2, HALF,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2 for every head of one (b, t)."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (cols < HALF)
    x_row = x_ptr + b * x_stride_b + t * x_stride_t + heads * x_stride_h + cols
    x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * cos1 - x2 * sin1
    y2 = x2 * cos2 + x1 * sin2
    out_row = out_ptr + b * out_stride_b + t * out_stride_t + heads * out_stride_h + cols
    tl.store(out_row, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_row + HALF, y2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr,
                 q_stride_b, q_stride_h, q_stride_t, k_stride_b, k_stride_h, k_stride_t,
                 q_out_stride_b, q_out_stride_h, q_out_stride_t,
                 k_out_stride_b, k_out_stride_h, k_out_stride_t,
                 cos_stride_b, T, Hq, Hk, HALF,
                 BACKWARD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                 BLOCK_HALF: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    mask = cols < HALF
    cos_row = b * cos_stride_b + t * (2 * HALF) + cols  # cos and sin share one contiguous layout
    cos1 = tl.load(cos_ptr + cos_row, mask=mask, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_ptr + cos_row + HALF, mask=mask, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_ptr + cos_row, mask=mask, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_ptr + cos_row + HALF, mask=mask, other=0.0).to(tl.float32)[None, :]
    if BACKWARD:  # the transpose: (s1, s2) -> (-s2, -s1), see the module docstring
        sin1, sin2 = -sin2, -sin1
    _rotate_heads(q_ptr, q_out_ptr, q_stride_b, q_stride_h, q_stride_t, q_out_stride_b, q_out_stride_h,
                  q_out_stride_t, b, t, Hq, cos1, cos2, sin1, sin2, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, k_out_ptr, k_stride_b, k_stride_h, k_stride_t, k_out_stride_b, k_out_stride_h,
                  k_out_stride_t, b, t, Hk, cos1, cos2, sin1, sin2, HALF, BLOCK_HK, BLOCK_HALF)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_torch(q, k, cos, sin):
    """The reference: HF's apply_rotary_pos_emb (cos, sin (B, T, Dh) broadcast over heads)."""
    cos = cos.unsqueeze(1)  # (B, 1, T, Dh)
    sin = sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _launch(q, k, cos, sin, backward):
    """Rotate q and k (or, with backward=True, their gradients) into new tensors."""
    B, Hq, T, Dh = q.shape
    Hk = k.shape[1]
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)  # empty_like keeps q's strides
    cos_stride_b = cos.stride(0) if cos.shape[0] == B and B > 1 else 0  # (1, T, Dh) broadcasts
    if B * T > 0:
        _rope_kernel[(B * T,)](
            q, k, q_out, k_out, cos, sin,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            q_out.stride(0), q_out.stride(1), q_out.stride(2),
            k_out.stride(0), k_out.stride(1), k_out.stride(2),
            cos_stride_b, T, Hq, Hk, Dh // 2, BACKWARD=backward,
            BLOCK_HQ=triton.next_power_of_2(Hq), BLOCK_HK=triton.next_power_of_2(Hk),
            BLOCK_HALF=triton.next_power_of_2(Dh // 2), num_warps=4)
    return q_out, k_out


def _validate(q, k, cos, sin):
    if not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(f"rope_triton: q is on {q.device}; the Triton kernels need a CUDA tensor "
                         "(or TRITON_INTERPRET=1 set before triton is imported); use rope_torch")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rope_triton: q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, H, T, Dh)")
    B, _, T, Dh = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, T, Dh):
        raise ValueError(f"rope_triton: k {tuple(k.shape)} does not match q {tuple(q.shape)} in B, T or Dh")
    if Dh % 2:
        raise ValueError(f"rope_triton: head dim Dh={Dh} must be even")
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, B) or cos.shape[1:] != (T, Dh):
        raise ValueError(f"rope_triton: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be "
                         f"({B} or 1, {T}, {Dh})")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"rope_triton: q dtype {q.dtype}, expected float16, bfloat16 or float32")
    if not (k.dtype == cos.dtype == sin.dtype == q.dtype):
        raise ValueError(f"rope_triton: dtypes q {q.dtype}, k {k.dtype}, cos {cos.dtype}, sin {sin.dtype} "
                         "differ; cast cos and sin to q's dtype, as HF's rotary embedding does")
    if len({q.device, k.device, cos.device, sin.device}) != 1:
        raise ValueError(f"rope_triton: q on {q.device}, k on {k.device}, cos on {cos.device}, "
                         f"sin on {sin.device}; expected one device")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"rope_triton: q strides {q.stride()} and k strides {k.stride()} need a "
                         "contiguous last dim (stride 1)")
    if not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError(f"rope_triton: cos (strides {cos.stride()}) and sin ({sin.stride()}) must be "
                         "contiguous; call .contiguous() first")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rope_triton: cos and sin require grad, but the kernel treats them as constants; "
                         "detach them or use rope_torch")


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad_q_out, grad_k_out):
        cos, sin = ctx.saved_tensors
        # a gradient that does not flow arrives as zeros (autograd materialises it), never None
        grad_q_out = grad_q_out if grad_q_out.stride(-1) == 1 else grad_q_out.contiguous()
        grad_k_out = grad_k_out if grad_k_out.stride(-1) == 1 else grad_k_out.contiguous()
        grad_q, grad_k = _launch(grad_q_out, grad_k_out, cos, sin, backward=True)
        need_q, need_k = ctx.needs_input_grad[:2]
        return grad_q if need_q else None, grad_k if need_k else None, None, None


def rope_triton(q, k, cos, sin):
    """Rotate q (B, H, T, Dh) and k (B, Hkv, T, Dh) with the Triton kernel; returns (q', k')."""
    _validate(q, k, cos, sin)
    return _RoPE.apply(q, k, cos, sin)


@triton.jit
def _cos_sin_kernel(positions_ptr, inv_freq_ptr, cos_ptr, sin_ptr, N, T, stride_b, stride_t, HALF,
                    ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr):
    let_dependents_start(PDL)
    wait_for_inputs(PDL)  # the positions may come from the kernel before
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # rows of (B * T, Dh)
    j = tl.arange(0, BLOCK_HALF)
    row_ok = rows < N
    mask = row_ok[:, None] & (j < HALF)[None, :]
    position = tl.load(positions_ptr + (rows // T) * stride_b + (rows % T) * stride_t, mask=row_ok, other=0)
    angle = position.to(tl.float32)[:, None] * tl.load(inv_freq_ptr + j, mask=j < HALF, other=0.0)[None, :]
    cos, sin = tl.cos(angle).to(cos_ptr.dtype.element_ty), tl.sin(angle).to(sin_ptr.dtype.element_ty)
    out = rows.to(tl.int64)[:, None] * (2 * HALF) + j[None, :]
    for offset in tl.static_range(2):  # cat(angles, angles): both halves of the head dim
        tl.store(cos_ptr + out + offset * HALF, cos, mask=mask)
        tl.store(sin_ptr + out + offset * HALF, sin, mask=mask)


def rope_cos_sin_triton(inv_freq, positions, dtype):
    """cos, sin (B, T, Dh = 2 len(inv_freq)) in `dtype` for integer positions (B, T): model.rope_cos_sin, one launch."""
    who = "rope_cos_sin_triton"
    if not (positions.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(f"{who}: positions on {positions.device}; the Triton kernel needs a CUDA tensor "
                         "(or TRITON_INTERPRET=1); use model.rope_cos_sin")
    if positions.dim() != 2 or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{who}: positions {tuple(positions.shape)} {positions.dtype}, expected (B, T) integers")
    if inv_freq.dim() != 1 or not inv_freq.is_floating_point() or inv_freq.device != positions.device:
        raise ValueError(f"{who}: inv_freq {tuple(inv_freq.shape)} {inv_freq.dtype} on {inv_freq.device}, expected "
                         f"(Dh / 2,) floats on {positions.device}")
    inv_freq = inv_freq.float().contiguous()  # as the reference: the angles in fp32
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{who}: dtype {dtype}, expected float16, bfloat16 or float32")
    (B, T), half = positions.shape, inv_freq.shape[0]
    cos = torch.empty(B, T, 2 * half, dtype=dtype, device=positions.device)
    sin = torch.empty_like(cos)
    rows = 8
    if B * T > 0:
        pdl = pdl_enabled(positions.device)
        _cos_sin_kernel[(triton.cdiv(B * T, rows),)](
            positions, inv_freq, cos, sin, B * T, T, positions.stride(0), positions.stride(1), half, ROWS=rows,
            BLOCK_HALF=triton.next_power_of_2(half), PDL=pdl, num_warps=1 if B * T <= rows else 4, launch_pdl=pdl)
    return cos, sin
