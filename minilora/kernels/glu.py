"""Gated MLP activations SwiGLU and GeGLU, forward and backward in Triton, beside their torch references.

Formula (the middle of HF's LlamaMLP / GemmaMLP: `down_proj(act_fn(gate_proj(x)) * up_proj(x))`):

    SwiGLU: y = silu(g) * u,       silu(g) = g * sigmoid(g)                           (Llama, Qwen2, Phi-3)
    GeGLU:  y = gelu_tanh(g) * u,  gelu_tanh(g) = 0.5 g (1 + tanh(v)),
                                   v = sqrt(2 / pi) (g + 0.044715 g^3)                (Gemma)

Since 0.5 (1 + tanh(v)) = sigmoid(2 v), the kernel writes gelu_tanh(g) = g * sigmoid(2 v), which needs no
tanh and keeps its precision for large |v|. As in HF, act(g) is rounded to the input dtype before the
product (torch's 16-bit ops round after each op); all other maths runs in fp32.

Backward, with a = act(g) and dy = dL/dy:

    du = dy * a                         (the rounded a, the value autograd saw in the product)
    dg = dy * u * act'(g)
    silu'(g)      = s (1 + g (1 - s)),                         s = sigmoid(g), 1 - s = sigmoid(-g)
    gelu_tanh'(g) = S + 2 g S (1 - S) sqrt(2/pi) (1 + 3 * 0.044715 g^2),   S = sigmoid(2 v)

(d/dg of g * sigmoid(2 v) with sigmoid' = sigmoid (1 - sigmoid) and dv/dg = sqrt(2/pi)(1 + 3*0.044715 g^2).)

The forward's arithmetic is the jitted `_gated`, which the 4-bit gate/up GEMV (minilora/kernels/nf4_matmul.py,
`matmul_nf4_glu`) also applies in its epilogue, so both give the same bits.

Memory layout: gate and up are contiguous tensors of one shape, e.g. (B, T, I), treated as flat arrays;
one program owns BLOCK_SIZE elements. The forward saves gate and up (not y); the backward recomputes a
and writes new dgate and dup tensors (no in-place reuse of the inputs).

Test: tests/test_train_kernels.py. Benchmark: benchmarks/train_kernels.py.
"""
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from minilora.kernels.pdl import let_dependents_start, pdl_enabled, wait_for_inputs

_BLOCK_SIZE = 1024  # 8 elements a thread at 4 warps: 94-98% of the copy rate on an H100 80GB (benchmark)


@triton.jit
def _gated(g, u, GELU: tl.constexpr, dtype: tl.constexpr):
    """act(g) * u in `dtype`, from g and u given as fp32 values of `dtype`: the forward's arithmetic, shared with
    the 4-bit gate/up GEMV whose epilogue applies the GLU (minilora/kernels/nf4_matmul.py), so both round alike."""
    if GELU:
        v = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2/pi) (g + 0.044715 g^3)
        a = g * tl.sigmoid(2.0 * v)
    else:
        a = g * tl.sigmoid(g)
    a = a.to(dtype).to(tl.float32)  # HF: act(gate) is a tensor of gate's dtype
    return (a * u).to(dtype)


@triton.jit
def _glu_forward_kernel(gate_ptr, up_ptr, y_ptr, N, GELU: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                        PDL: tl.constexpr):
    let_dependents_start(PDL)  # minilora/kernels/pdl.py: the 4-bit down projection may start its weight reads
    wait_for_inputs(PDL)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < N
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offsets, _gated(g, u, GELU, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_backward_kernel(grad_y_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, N,
                         GELU: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < N
    dy = tl.load(grad_y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        v = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        s = tl.sigmoid(2.0 * v)
        a = g * s
        # sigmoid(-2v) rather than 1 - s: no cancellation where s is close to 1
        da = s + 2.0 * g * s * tl.sigmoid(-2.0 * v) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        s = tl.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * tl.sigmoid(-g))
    a = a.to(gate_ptr.dtype.element_ty).to(tl.float32)
    tl.store(grad_up_ptr + offsets, (dy * a).to(grad_up_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_gate_ptr + offsets, (dy * u * da).to(grad_gate_ptr.dtype.element_ty), mask=mask)


def swiglu_torch(gate, up):
    """The reference for SwiGLU: HF's `act_fn(gate) * up` with act_fn = silu."""
    return F.silu(gate) * up


def geglu_torch(gate, up):
    """The reference for GeGLU: HF's `act_fn(gate) * up` with act_fn = gelu_pytorch_tanh (Gemma)."""
    return F.gelu(gate, approximate="tanh") * up


def _validate(gate, up, name):
    if not (gate.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(f"{name}: gate is on {gate.device}; the Triton kernels need a CUDA tensor "
                         f"(or TRITON_INTERPRET=1 set before triton is imported); use {name[:-7]}_torch")
    if gate.shape != up.shape:
        raise ValueError(f"{name}: gate shape {tuple(gate.shape)} != up shape {tuple(up.shape)}")
    if gate.dtype != up.dtype or gate.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name}: gate dtype {gate.dtype}, up dtype {up.dtype}; expected one of "
                         "float16, bfloat16, float32 for both")
    if gate.device != up.device:
        raise ValueError(f"{name}: gate on {gate.device}, up on {up.device}")
    if not (gate.is_contiguous() and up.is_contiguous()):
        raise ValueError(f"{name}: gate (strides {gate.stride()}) and up (strides {up.stride()}) must be "
                         "contiguous; call .contiguous() first")


class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, gelu):
        y = torch.empty_like(gate)
        N = gate.numel()
        if N > 0:
            pdl = pdl_enabled(gate.device)
            _glu_forward_kernel[(triton.cdiv(N, _BLOCK_SIZE),)](gate, up, y, N, GELU=gelu, BLOCK_SIZE=_BLOCK_SIZE,
                                                                PDL=pdl, num_warps=4, launch_pdl=pdl)
        ctx.save_for_backward(gate, up)
        ctx.gelu = gelu
        return y

    @staticmethod
    def backward(ctx, grad_y):
        gate, up = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        N = gate.numel()
        if N > 0:
            _glu_backward_kernel[(triton.cdiv(N, _BLOCK_SIZE),)](
                grad_y, gate, up, grad_gate, grad_up, N, GELU=ctx.gelu, BLOCK_SIZE=_BLOCK_SIZE,
                num_warps=4)
        need_gate, need_up = ctx.needs_input_grad[:2]
        return grad_gate if need_gate else None, grad_up if need_up else None, None


def swiglu_triton(gate, up):
    """silu(gate) * up with the Triton kernels; same signature and numerics as swiglu_torch."""
    _validate(gate, up, "swiglu_triton")
    return _GLU.apply(gate, up, False)


def geglu_triton(gate, up):
    """gelu_tanh(gate) * up with the Triton kernels; same signature and numerics as geglu_torch."""
    _validate(gate, up, "geglu_triton")
    return _GLU.apply(gate, up, True)
