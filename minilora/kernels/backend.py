"""The one setting that picks who does the 4-bit work, and the autograd function built on it.

Backends, all with the same three functions (dequantize, matmul = x @ W^T, matmul_t = g @ W):
  "torch"  - the plain-torch reference (minilora/nf4.py, minilora/kernels/nf4_matmul.py *_reference)
  "triton" - our kernels (minilora/kernels/nf4_dequant.py, minilora/kernels/nf4_matmul.py)
  "bnb"    - bitsandbytes 0.50 (`dequantize_4bit`, `matmul_4bit`), for comparison
  "auto"   - the setting: `set_backend(name)` or env MINILORA_BACKEND, else "triton" on CUDA and
             "torch" on CPU (the Triton CPU interpreter is for tests, far too slow to train with).
`linear_nf4(x, state, bias, backend)` is what `Linear4bit.forward` calls.
"""
from __future__ import annotations

import os

import torch

from minilora.nf4 import NF4State, dequantize_nf4 as _dequantize_torch

BACKENDS = ("torch", "triton", "bnb")
_setting = os.environ.get("MINILORA_BACKEND", "auto")


def set_backend(name: str) -> None:
    """Choose the backend every `Linear4bit(backend="auto")` uses from now on."""
    global _setting
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"backend {name!r}; expected one of {BACKENDS + ('auto',)}")
    _setting = name


def get_backend() -> str:
    """The current setting ("auto" unless set_backend or MINILORA_BACKEND chose one)."""
    return _setting


def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete backend for a tensor on `device`: 'auto' falls back on the setting, then the device."""
    name = _setting if name == "auto" else name
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r}; expected one of {BACKENDS + ('auto',)} (setting MINILORA_BACKEND)")
    return name


def _bnb_quant_state(state: NF4State):
    """Our NF4State as a bitsandbytes QuantState (same tensors, no copy)."""
    import bitsandbytes.functional as bnbf

    nested = None
    if state.nested:
        nested = bnbf.QuantState(absmax=state.nested_absmax, code=state.nested_code,
                                 blocksize=state.nested_blocksize, dtype=torch.float32)
    return bnbf.QuantState(absmax=state.absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                           quant_type="nf4", dtype=state.dtype, offset=state.offset, state2=nested)


def dequantize(state: NF4State, dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """The weight as a float tensor of `state.shape` in `dtype` (default: the original dtype)."""
    backend = resolve_backend(backend, state.packed.device)
    if backend == "triton":
        from minilora.kernels.nf4_dequant import dequantize_nf4

        return dequantize_nf4(state, dtype)
    if backend == "bnb":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(state.packed, _bnb_quant_state(state), quant_type="nf4").to(dtype or state.dtype)
    return _dequantize_torch(state, dtype)


def matmul(x: torch.Tensor, state: NF4State, backend: str = "auto") -> torch.Tensor:
    """x (..., K) @ W^T -> (..., N) in x's dtype."""
    backend = resolve_backend(backend, x.device)
    if backend == "triton":
        from minilora.kernels.nf4_matmul import matmul_nf4

        return matmul_nf4(x.contiguous(), state)
    if backend == "bnb":
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, state.packed.t(), quant_state=_bnb_quant_state(state)).to(x.dtype)
    from minilora.kernels.nf4_matmul import matmul_nf4_reference

    return matmul_nf4_reference(x, state)


def matmul_t(g: torch.Tensor, state: NF4State, backend: str = "auto") -> torch.Tensor:
    """g (..., N) @ W -> (..., K) in g's dtype: the input gradient of x @ W^T."""
    backend = resolve_backend(backend, g.device)
    if backend == "triton":
        from minilora.kernels.nf4_matmul import matmul_nf4_t

        return matmul_nf4_t(g.contiguous(), state)
    # bitsandbytes' own backward dequantizes too (MatMul4Bit.backward)
    return g @ dequantize(state, g.dtype, backend)


class _MatmulNF4(torch.autograd.Function):
    """y = x @ W^T with a frozen NF4 W. Backward: dy/dx^T g = g @ W; W gets no gradient."""

    @staticmethod
    def forward(ctx, x, state, backend):
        ctx.state, ctx.backend = state, backend  # the packed weight, not a float copy
        return matmul(x, state, backend)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = matmul_t(grad_out, ctx.state, ctx.backend) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def linear_nf4(x: torch.Tensor, state: NF4State, bias: torch.Tensor | None = None,
               backend: str = "auto") -> torch.Tensor:
    """x @ dequant(W)^T + bias, differentiable in x and bias."""
    y = _MatmulNF4.apply(x, state, backend)
    return y if bias is None else y + bias
