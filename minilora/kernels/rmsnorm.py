"""RMSNorm, forward and backward in Triton, beside its plain-torch reference `rms_norm_torch`.

Formula (matches `LlamaRMSNorm` and `GemmaRMSNorm` in transformers/models/{llama,gemma}/modeling_*.py):

    r = rsqrt(mean(x.float() ** 2, over D) + eps)            fp32, one per row
    h = x.float() * r
    Llama:  y = weight * h.to(x.dtype)                       cast to x's dtype first, then scale
    Gemma:  y = (h * (1 + weight.float())).to(x.dtype)       `unit_offset=True`: scale in fp32, cast once

Memory layout: x is (..., D), contiguous, viewed as N = numel / D rows; weight is (D,). The forward
runs one program per row (a whole row fits one block) and saves x and r (N fp32) for the backward.

Backward, one row at a time, with g = dL/dy and s = weight (Llama) or 1 + weight (Gemma):

    dh = g * s
    dx = r * (dh - h * mean(dh * h))

    because h_i = x_i r and dr/dx_j = -r^3 x_j / D, so
    dx_j = sum_i dh_i (delta_ij r - x_i r^3 x_j / D) = r dh_j - r h_j mean(dh * h).

    dweight = sum over rows of g * h.to(x.dtype)   (Llama: the product autograd sees used the cast h)
            = sum over rows of g * h               (Gemma)

The casts count as the identity in the backward, as they do for autograd. The backward runs a fixed
number P of programs, each owning a contiguous range of rows; each sums its rows' dweight terms in fp32
and writes one row of a (P, D) fp32 buffer, which torch sums. A frozen weight (QLoRA) skips that work
and that buffer, and then the backward runs one program per row, as the forward does; an input that
needs no gradient skips dx.

Residual add + RMSNorm, forward only, for decoding (`add_rms_norm_triton`, reference `add_rms_norm_torch`):

    summed = x + delta                                       fp32 add, rounded once to x's dtype (as torch)
    normed = rms_norm(summed)                                the forward above, on the rounded `summed`

One launch instead of two (torch's add, then the norm): at batch 1 the launches, not the bytes, cost the
time. Both outputs are new tensors; x and delta are left unchanged. The norm is the same jitted code
(`_rms_norm_row`) at the same block size and warp count as rms_norm_triton's forward, so `normed` equals
rms_norm_triton(summed) bit for bit (tested under the interpreter; `-m gpu` tests the compiled kernels).

Tests: tests/test_train_kernels.py, tests/test_add_rms_norm.py. Benchmark: benchmarks/train_kernels.py.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from minilora.kernels.pdl import let_dependents_start, pdl_enabled, wait_for_inputs

_MAX_D = 65536  # a row must fit one block of registers


@triton.jit
def _rms_norm_row(x, weight_ptr, cols, mask, D, eps, UNIT_OFFSET: tl.constexpr):
    """One row's norm from its loaded values x (x's dtype, 0 where masked): (y in fp32, rstd).

    Shared by both forward kernels so that they compute the same roundings in the same order.
    """
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / D + eps)
    h = x32 * rstd
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        y = h * (1.0 + w)  # Gemma: scale in fp32, cast once on store
    else:
        # Llama: round h to x's dtype before the weight multiplies it. The product of two 16-bit
        # floats is exact in fp32, so rounding it on store equals torch's 16-bit multiply.
        y = w * h.to(x.dtype).to(tl.float32)
    return y, rstd


@triton.jit
def _rms_norm_forward_kernel(x_ptr, weight_ptr, y_ptr, rstd_ptr, D, eps,
                             UNIT_OFFSET: tl.constexpr, BLOCK_SIZE: tl.constexpr, PDL: tl.constexpr):
    let_dependents_start(PDL)  # minilora/kernels/pdl.py: the 4-bit matmul after the norm may start its weight reads
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0)
    y, rstd = _rms_norm_row(x, weight_ptr, cols, mask, D, eps, UNIT_OFFSET)
    tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _add_rms_norm_kernel(x_ptr, delta_ptr, weight_ptr, summed_ptr, y_ptr, D, eps,
                         UNIT_OFFSET: tl.constexpr, BLOCK_SIZE: tl.constexpr, PDL: tl.constexpr):
    let_dependents_start(PDL)
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < D
    offsets = row * D + cols
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    delta = tl.load(delta_ptr + offsets, mask=mask, other=0.0)
    # torch adds 16-bit floats in fp32 and rounds the sum to nearest even, as this cast does (fp32 in:
    # no cast). fp32's 24 bits are at least 2p + 2 for p = 8 (bf16) and 11 (fp16), so rounding twice
    # (the fp32 add, then the cast) equals rounding the exact sum once: both codes get the same bits.
    summed = (x.to(tl.float32) + delta.to(tl.float32)).to(x.dtype)
    tl.store(summed_ptr + offsets, summed, mask=mask)
    # the norm reads the rounded sum, as the unfused rms_norm_triton(x + delta) does
    y, rstd = _rms_norm_row(summed, weight_ptr, cols, mask, D, eps, UNIT_OFFSET)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(grad_y_ptr, x_ptr, weight_ptr, rstd_ptr, grad_x_ptr, grad_w_partial_ptr,
                              N, D, rows_per_program,
                              UNIT_OFFSET: tl.constexpr, COMPUTE_DX: tl.constexpr,
                              COMPUTE_DW: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < D
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        scale = 1.0 + w
    else:
        scale = w
    grad_w = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, N)
    offsets = row_start.to(tl.int64) * D + cols  # int64: N * D may pass 2**31
    for row in range(row_start, row_end):
        g = tl.load(grad_y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        h = x * rstd
        if COMPUTE_DX:
            dh = g * scale
            dx = rstd * (dh - h * (tl.sum(dh * h, axis=0) / D))
            tl.store(grad_x_ptr + offsets, dx.to(grad_x_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            if UNIT_OFFSET:
                grad_w += g * h
            else:
                grad_w += g * h.to(x_ptr.dtype.element_ty).to(tl.float32)
        offsets += D
    if COMPUTE_DW:
        tl.store(grad_w_partial_ptr + pid * D + cols, grad_w, mask=mask)


def rms_norm_torch(x, weight, eps, unit_offset=False):
    """The reference: HF's RMSNorm in plain torch; autograd gives its backward."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (h * (1.0 + weight.float())).to(x.dtype)  # Gemma: (1 + w) in fp32, cast once
    return weight * h.to(x.dtype)  # Llama: cast, then scale in the weight's dtype


def _check_launchable(x, name):
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(f"{name}: tensor is on {x.device}; the Triton kernels need a CUDA tensor "
                         "(or TRITON_INTERPRET=1 set before triton is imported); use the *_torch reference")


def _validate(x, weight, eps, name="rms_norm_triton"):
    _check_launchable(x, name)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name}: x dtype {x.dtype}, expected float16, bfloat16 or float32")
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name}: weight dtype {weight.dtype}, expected a float dtype")
    if weight.device != x.device:
        raise ValueError(f"{name}: x on {x.device}, weight on {weight.device}")
    if weight.dim() != 1 or x.dim() == 0 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{name}: weight shape {tuple(weight.shape)} does not match "
                         f"x shape {tuple(x.shape)}; expected weight ({x.shape[-1] if x.dim() else '?'},)")
    if x.shape[-1] > _MAX_D:
        raise ValueError(f"{name}: row length {x.shape[-1]} > {_MAX_D}, the most one block holds")
    if not (x.is_contiguous() and weight.is_contiguous()):
        raise ValueError(f"{name}: x (strides {x.stride()}) and weight must be contiguous; "
                         "call .contiguous() first")
    if not eps >= 0:
        raise ValueError(f"{name}: eps={eps}, expected a number >= 0")


def _num_warps(block_size):
    return 16 if block_size >= 8192 else 8 if block_size >= 2048 else 4


@functools.lru_cache(maxsize=None)
def _num_programs(device):
    """Programs for the backward: two per SM on a GPU, so the dweight partials stay few."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one after another: fewer is faster


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, unit_offset):
        D = x.shape[-1]
        N = x.numel() // D
        out_dtype = x.dtype if unit_offset else torch.promote_types(weight.dtype, x.dtype)
        y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        rstd = torch.empty(N, dtype=torch.float32, device=x.device)
        block_size = triton.next_power_of_2(D)
        if N > 0:
            pdl = pdl_enabled(x.device)
            _rms_norm_forward_kernel[(N,)](x, weight, y, rstd, D, eps, UNIT_OFFSET=unit_offset,
                                           BLOCK_SIZE=block_size, PDL=pdl, num_warps=_num_warps(block_size),
                                           launch_pdl=pdl)
        ctx.save_for_backward(x, weight, rstd)
        ctx.unit_offset = unit_offset
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        compute_dx, compute_dw = ctx.needs_input_grad[:2]
        grad_y = grad_y.contiguous()
        D = x.shape[-1]
        N = x.numel() // D
        grad_x = torch.empty_like(x) if compute_dx else None
        # with dweight to reduce, a few programs (each one (D,) partial); without, one row a program
        num_programs = max(1, min(N, _num_programs(x.device)) if compute_dw else N)
        rows_per_program = triton.cdiv(N, num_programs)
        num_programs = max(1, triton.cdiv(N, rows_per_program))
        grad_w_partial = (torch.empty(num_programs, D, dtype=torch.float32, device=x.device)
                          if compute_dw else None)
        block_size = triton.next_power_of_2(D)
        if N > 0 and (compute_dx or compute_dw):
            _rms_norm_backward_kernel[(num_programs,)](
                grad_y, x, weight, rstd, grad_x, grad_w_partial, N, D, rows_per_program,
                UNIT_OFFSET=ctx.unit_offset, COMPUTE_DX=compute_dx, COMPUTE_DW=compute_dw,
                BLOCK_SIZE=block_size, num_warps=_num_warps(block_size))
        grad_w = None
        if compute_dw:
            grad_w = (grad_w_partial.sum(0) if N > 0 else torch.zeros(D, device=x.device)).to(weight.dtype)
        return grad_x, grad_w, None, None


def rms_norm_triton(x, weight, eps, unit_offset=False):
    """RMSNorm of x's last dim with the Triton kernels; same signature and numerics as rms_norm_torch."""
    _validate(x, weight, eps)
    return _RMSNorm.apply(x, weight, float(eps), bool(unit_offset))


def add_rms_norm_torch(x, delta, weight, eps, unit_offset=False):
    """The reference for the fused op: torch's add, then rms_norm_torch of the rounded sum."""
    summed = x + delta
    return summed, rms_norm_torch(summed, weight, eps, unit_offset)


def add_rms_norm_triton(x, delta, weight, eps, unit_offset=False):
    """(x + delta, RMSNorm(x + delta)) in one launch; forward only, for decoding without autograd.

    Same signature and numerics as add_rms_norm_torch; `normed` equals rms_norm_triton(x + delta) exactly.
    """
    name = "add_rms_norm_triton"
    _validate(x, weight, eps, name)
    if delta.shape != x.shape or delta.dtype != x.dtype or delta.device != x.device:
        raise ValueError(f"{name}: delta is {tuple(delta.shape)} {delta.dtype} on {delta.device}, x is "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}; they must match")
    if not delta.is_contiguous():
        raise ValueError(f"{name}: delta (strides {delta.stride()}) must be contiguous; call .contiguous() first")
    # no backward: refuse rather than hand back outputs that silently drop the gradient
    if torch.is_grad_enabled() and (x.requires_grad or delta.requires_grad or weight.requires_grad):
        raise ValueError(f"{name}: has no backward, but an input requires grad; call it under "
                         "torch.no_grad() or torch.inference_mode(), or use rms_norm_triton(x + delta, ...)")
    D = x.shape[-1]
    N = x.numel() // D if D else 0
    out_dtype = x.dtype if unit_offset else torch.promote_types(weight.dtype, x.dtype)  # as rms_norm_triton
    summed = torch.empty_like(x)
    normed = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    block_size = triton.next_power_of_2(D)
    if N > 0:
        # rms_norm_triton's block size and warp count: the same reduction tree, so the same fp32 sum
        pdl = pdl_enabled(x.device)
        _add_rms_norm_kernel[(N,)](x, delta, weight, summed, normed, D, float(eps), UNIT_OFFSET=bool(unit_offset),
                                   BLOCK_SIZE=block_size, PDL=pdl, num_warps=_num_warps(block_size),
                                   launch_pdl=pdl)
    return summed, normed
