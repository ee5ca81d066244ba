"""Fused LoRA linear: y = x W^T + bias + s (u A^T) B^T as one autograd node, u = dropout(x).

Formula (LoRA, Hu et al. 2021; QLoRA keeps W frozen in NF4): W (N, K) frozen, A (r, K), B (N, r) trained,
s = alpha / r. Backward with g = dL/dy (M, N) and xa = u A^T (M, r):

    dB = s g^T xa                      (N, r)
    dxa = s g B                        (M, r)
    dA = dxa^T u                       (r, K)
    dx = g W + (dxa A) * mask / (1 - p)     (the dropout mask; p = 0 means u = x)

Why fused: built from autograd ops, the base matmul and the LoRA branch keep extra (M, N) tensors and run
separate elementwise passes to add the branch in and to cast; here the branch is accumulated straight into
the base GEMM's output with `addmm_` (beta = 1), the input gradient likewise, and the only activations saved
are u (M, K) and xa (M, r). The frozen W is re-materialised in the backward from its packed NF4 form (a
dequant is ~4x cheaper than keeping a bf16 copy around), or used as it is for a float base.

Merged weight (no dropout, NF4 base on the Triton backend, at least MERGE_MIN_ROWS rows): since the base
weight is dequantized for every use anyway, the dequantization adds the update in the same pass
(`minilora/kernels/nf4_dequant.py` `dequantize_nf4_lora`), W' = W + s B A, and

    y = x W'^T,    dx = g W'                (xa = x A^T is made in the backward, only for dB)

so the forward has no LoRA GEMM at all and neither pass reads or writes the (M, N) / (M, K) output a
second time; only x is saved. A recomputation (checkpointing) then costs just the base GEMM. dA and dB come
from two Triton launches (`minilora/kernels/lora_backward.py`) instead of skinny cuBLAS GEMMs, casts and scalings.

Apart from those kernels, everything here is cuBLAS through torch. The reference is the composition
`lora_linear_torch`. Test: tests/test_lora_fused.py. Used by minilora/lora.py on CUDA.
"""
import torch

from minilora.kernels.lora_backward import lora_grads

# Below this many rows (decoding an adapter) the LoRA branch is cheaper than dequantizing a merged weight:
# the base then takes the 4-bit decode kernels (minilora/kernels/nf4_matmul.py: GEMV at 1 row, few-rows kernel to 64).
MERGE_MIN_ROWS = 64


def _merges(base, rows, dropout_mask, device):
    """Does the node fold B A into the dequantized weight? (see the module docstring)"""
    if dropout_mask is not None or rows < MERGE_MIN_ROWS or not hasattr(base, "weight_packed"):
        return False
    from minilora.kernels.backend import resolve_backend

    return resolve_backend(base.backend, device) == "triton" and base.in_features % 64 == 0


def _base_matmul(x2, base, dtype):
    """x2 @ W^T for the frozen base: the 4-bit matmul (its decode kernels for few rows) or a cast float weight."""
    if hasattr(base, "weight_packed"):
        from minilora.kernels.backend import matmul

        return matmul(x2, base.state, base.backend)
    return torch.mm(x2, base.weight.to(dtype).t())


def _merged_weight(base, lora_A, lora_B, scaling, dtype):
    """W + s B A in `dtype`, from the packed NF4 weight in one Triton pass."""
    from minilora.kernels.nf4_dequant import dequantize_nf4_lora

    return dequantize_nf4_lora(base.state, lora_A.float().contiguous(), lora_B.float().contiguous(), scaling, dtype)


def _base_weight(base, dtype):
    """The frozen base weight (N, K) in `dtype`: dequantized for a 4-bit layer, cast for an nn.Linear."""
    if hasattr(base, "weight_packed"):
        from minilora.kernels.backend import dequantize

        return dequantize(base.state, dtype, base.backend)
    return base.weight.to(dtype)


def lora_linear_torch(x, base, lora_A, lora_B, scaling, dropout_mask=None, dropout_p=0.0):
    """Reference: base(x) + s * (dropout(x) @ A^T) @ B^T with plain autograd ops, in x's dtype."""
    u = x if dropout_mask is None else x * dropout_mask / (1 - dropout_p)
    w = _base_weight(base, x.dtype)
    y = x @ w.t() + (u @ lora_A.to(x.dtype).t()) @ lora_B.to(x.dtype).t() * scaling
    return y if base.bias is None else y + base.bias.to(x.dtype)


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_A, lora_B, base, scaling, dropout_mask, dropout_p, output, keep_weight):
        # Under autocast every matmul here would run in the autocast dtype anyway; casting once up front lets
        # the ops below run with plain dtypes (no per-op autocast casts, no context-manager overhead).
        dtype = torch.get_autocast_dtype("cuda") if x.is_cuda and torch.is_autocast_enabled("cuda") else x.dtype
        x_dtype, shape = x.dtype, x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        ctx.base, ctx.scaling, ctx.dropout_p = base, scaling, dropout_p
        ctx.dtypes = x_dtype, lora_A.dtype, lora_B.dtype
        ctx.merged = _merges(base, x2.shape[0], dropout_mask, x.device)
        if ctx.merged:
            y = x2.new_empty(x2.shape[0], lora_B.shape[0])  # a recomputation's output is discarded: no GEMM
            if output:
                w = _merged_weight(base, lora_A, lora_B, scaling, dtype)
                y = torch.mm(x2, w.t())
                if keep_weight:  # a recomputation, right before this layer's backward: keep W' for its dx
                    base.kept_merged_weight = (lora_A._version, lora_B._version, w)
                if base.bias is not None:
                    y += base.bias.to(dtype)
            ctx.save_for_backward(x2, lora_A, lora_B)
            return y.view(*shape[:-1], y.shape[-1])
        a, b = lora_A.to(dtype), lora_B.to(dtype)
        u = x2 if dropout_mask is None else x2 * dropout_mask.reshape(x2.shape).to(dtype) / (1 - dropout_p)
        xa = torch.mm(u, a.t())
        if output:
            y = _base_matmul(x2, base, dtype)
            y.addmm_(xa, b.t(), alpha=scaling)
            if base.bias is not None:
                y += base.bias.to(dtype)
        else:  # a recomputation that only needs what is saved for backward (u, xa): no base GEMM
            y = x2.new_empty(x2.shape[0], b.shape[0])
        ctx.save_for_backward(u, xa, a, b, dropout_mask)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        if ctx.merged:
            return _LoRALinear.merged_backward(ctx, grad_y)
        u, xa, a, b, mask = ctx.saved_tensors
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(u.dtype)
        grad_B = torch.mm(g.t(), xa).mul_(ctx.scaling)
        dxa = torch.mm(g, b).mul_(ctx.scaling)
        grad_A = torch.mm(dxa.t(), u)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, _base_weight(ctx.base, u.dtype))
            if mask is None:
                grad_x.addmm_(dxa, a)
            else:
                grad_x += torch.mm(dxa, a) * mask.reshape(grad_x.shape).to(u.dtype) / (1 - ctx.dropout_p)
            grad_x = grad_x.view(*grad_y.shape[:-1], grad_x.shape[-1]).to(x_dtype)
        return grad_x, grad_A.to(a_dtype), grad_B.to(b_dtype), None, None, None, None, None, None

    @staticmethod
    def merged_backward(ctx, grad_y):
        """The same gradients with the merged weight: dx = g (W + s B A) in one GEMM."""
        x2, lora_A, lora_B = ctx.saved_tensors
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        # A checkpoint recomputation ran the forward again just now, on other autograd nodes (non-reentrant
        # checkpointing keeps only their saved tensors), so its W' is handed over on the layer, checked against
        # the versions of A and B it was made from (an optimizer step in between would make it stale).
        kept, w = getattr(ctx.base, "kept_merged_weight", None), None
        if kept is not None:
            ctx.base.kept_merged_weight = None
            if kept[:2] == (lora_A._version, lora_B._version) and kept[2].dtype == x2.dtype:
                w = kept[2]
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(x2.dtype).contiguous()
        # dA and dB in two Triton launches (lora_backward.py) instead of ~12 small cuBLAS and cast kernels
        grad_A, grad_B = lora_grads(x2.contiguous(), g, lora_A.float(), lora_B.float(), ctx.scaling)
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = w if w is not None else _merged_weight(ctx.base, lora_A, lora_B, ctx.scaling, x2.dtype)
            grad_x = torch.mm(g, w)
            grad_x = grad_x.view(*grad_y.shape[:-1], grad_x.shape[-1]).to(x_dtype)
        return grad_x, grad_A.to(a_dtype), grad_B.to(b_dtype), None, None, None, None, None, None


def lora_linear(x, base, lora_A, lora_B, scaling, dropout_mask=None, dropout_p=0.0, output=True, keep_weight=False):
    """Fused base(x) + s * (dropout(x) @ A^T) @ B^T. `base` is a frozen nn.Linear or minilora Linear4bit;
    `dropout_mask` (x's shape, bool) or None. Under CUDA autocast everything runs in the autocast dtype.
    output=False returns an uninitialised tensor of the output's shape and skips the base GEMM, for a
    gradient-checkpoint recomputation whose output is discarded: the backward is unchanged. keep_weight=True (a
    recomputation, whose backward follows at once) keeps a merged W' from the forward for the backward's dx
    instead of dequantizing it again: one layer's weights in the compute dtype, briefly."""
    if x.shape[-1] != lora_A.shape[1] or lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(f"lora_linear: x (..., {x.shape[-1]}), lora_A {tuple(lora_A.shape)}, lora_B "
                         f"{tuple(lora_B.shape)} do not chain (need A (r, K), B (N, r), x (..., K))")
    if dropout_mask is not None and dropout_mask.shape != x.shape:
        raise ValueError(f"lora_linear: dropout_mask {tuple(dropout_mask.shape)} must have x's shape {tuple(x.shape)}")
    if not 0 <= dropout_p < 1:
        raise ValueError(f"lora_linear: dropout_p={dropout_p}, expected 0 <= p < 1")
    return _LoRALinear.apply(x, lora_A, lora_B, base, scaling, dropout_mask, dropout_p, output, keep_weight)
