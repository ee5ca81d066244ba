"""Fused lm_head linear + cross-entropy that never holds the (tokens x vocab) logits, beside its reference.

Formula (HF's causal-LM loss with `reduction="sum"`; the training loop divides by the token count):

    z    = hidden @ weight^T                          (N, V), in hidden's dtype, as HF's lm_head
    z    = cap * tanh(z / cap)                         optional final soft-capping (Gemma 2)
    loss = sum over rows with label != ignore_index of logsumexp(z_row) - z_row[label]     (in fp32)

Gradient, for a row with label y and p = softmax(z_row) (rows with ignored labels get zero):

    dloss/dz  = p - onehot(y)
    soft-capping multiplies it by dz/dz_raw = 1 - tanh(z_raw / cap)^2
    grad_hidden = dloss/dz_raw @ weight        grad_weight = dloss/dz_raw^T @ hidden

Since the loss is a sum, its backward only scales these by the incoming scalar gradient, so the forward
computes them and the (N, V) logits never exist whole: the rows are processed in chunks of
`chunk_size`. For each chunk, cuBLAS computes the (n, V) logits in hidden's dtype (the rounding HF's
bf16 lm_head makes), one Triton program per row reads them in fp32, does an online logsumexp, writes the
row's loss and overwrites that logits buffer with dloss/dz_raw in the same dtype (the dtype autograd
casts the gradient to before the linear backward; the buffer is ours, no caller tensor is touched), and
two matmuls add the chunk's share to grad_hidden and, only when weight requires grad, grad_weight. In
QLoRA the lm_head is frozen, so that matmul and the (V, D) buffer are skipped. grad_weight accumulates in
weight's dtype through addmm (fp32 inside cuBLAS, rounded once per chunk).

Memory: one chunk of logits (n x V in hidden's dtype) plus grad_hidden (N x D) instead of N x V logits
in hidden's dtype and in fp32 and their gradients. The default chunk keeps the buffer near 256 MiB.

Test: tests/test_train_kernels.py. Benchmark: benchmarks/train_kernels.py.
"""
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_CHUNK_BYTES = 256 * 2**20  # logits buffer per chunk; at V=128256 in bf16, 1046 rows
_BLOCK_SIZE = 4096  # vocabulary entries per step of a row's loop


@triton.jit
def _tanh(x):
    """tanh in fp32 from exp (the interpreter has no libdevice): odd series near 0, else (1-e)/(1+e)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0, -t, t)
    x2 = x * x
    series = x * (1.0 - x2 * (1.0 / 3.0 - x2 * (2.0 / 15.0)))  # error < |x|^7 / 18 for |x| < 0.05
    return tl.where(tl.abs(x) < 0.05, series, t)


@triton.jit
def _cross_entropy_kernel(logits_ptr, labels_ptr, loss_ptr, V, ignore_index, softcap,
                          HAS_SOFTCAP: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """One row: loss = logsumexp(z) - z[label]; logits row overwritten with dloss/dlogits."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * V
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        for start in range(0, V, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            tl.store(row_ptr + cols, tl.zeros((BLOCK_SIZE,), tl.float32).to(logits_ptr.dtype.element_ty),
                     mask=cols < V)
        tl.store(loss_ptr + row, 0.0)
        return

    # pass 1: running max m and running sum s of exp(z - m) (online logsumexp), all in fp32
    m = -float("inf")
    s = 0.0
    for start in range(0, V, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = cols < V
        z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = tl.where(mask, z, -float("inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    z_label = tl.load(row_ptr + label).to(tl.float32)
    if HAS_SOFTCAP:
        z_label = softcap * _tanh(z_label / softcap)
    tl.store(loss_ptr + row, lse - z_label)

    # pass 2: dloss/dz = softmax(z) - onehot(label), through the soft-cap's derivative 1 - tanh^2
    for start in range(0, V, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = cols < V
        z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            t = _tanh(z / softcap)
            z = softcap * t
        grad = tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)
        if HAS_SOFTCAP:
            grad = grad * ((1.0 - t) * (1.0 + t))  # 1 - t^2 without cancellation near |t| = 1
        tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def linear_cross_entropy_torch(hidden, weight, labels, softcap=None, ignore_index=-100):
    """The reference: full logits (as HF's lm_head and soft-capping make them), fp32 cross-entropy sum."""
    logits = F.linear(hidden, weight)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap  # Gemma 2: final_logit_softcapping
    return F.cross_entropy(logits.float().reshape(-1, weight.shape[0]), labels.reshape(-1),
                           ignore_index=ignore_index, reduction="sum")


def _validate(hidden, weight, labels, softcap, ignore_index, chunk_size):
    name = "linear_cross_entropy_triton"
    if not (hidden.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(f"{name}: hidden is on {hidden.device}; the Triton kernels need a CUDA tensor "
                         "(or TRITON_INTERPRET=1 set before triton is imported); use linear_cross_entropy_torch")
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be "
                         "(..., D) and (V, D)")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"{name}: labels shape {tuple(labels.shape)}, expected {tuple(hidden.shape[:-1])} "
                         "(hidden's shape without D)")
    if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32) or weight.dtype != hidden.dtype:
        raise ValueError(f"{name}: hidden dtype {hidden.dtype}, weight dtype {weight.dtype}; expected one "
                         "of float16, bfloat16, float32 for both")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: labels dtype {labels.dtype}, expected int64 or int32")
    if len({hidden.device, weight.device, labels.device}) != 1:
        raise ValueError(f"{name}: hidden on {hidden.device}, weight on {weight.device}, labels on "
                         f"{labels.device}; expected one device")
    if not (hidden.is_contiguous() and weight.is_contiguous() and labels.is_contiguous()):
        raise ValueError(f"{name}: hidden (strides {hidden.stride()}), weight and labels must be contiguous; "
                         "shift labels with F.pad(labels[..., 1:], (0, 1), value=-100) rather than slicing "
                         "hidden")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{name}: softcap={softcap}, expected None or a number > 0")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"{name}: chunk_size={chunk_size!r}, expected None or an int > 0")
    V = weight.shape[0]
    if labels.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # no host sync inside a CUDA graph: the captured step's labels come from the checked data pipeline
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bad.any():  # one sync per step; an out-of-range label would read outside the logits row
        index = bad.nonzero()[0].tolist()
        raise ValueError(f"{name}: labels[{', '.join(map(str, index))}] = {labels[tuple(index)].item()} "
                         f"is outside [0, {V}) and is not ignore_index={ignore_index}")


def _linear_cross_entropy_forward(hidden, weight, labels, softcap, ignore_index, chunk_size,
                                  need_grad_hidden, need_grad_weight):
    """Loss sum (fp32 scalar) and the gradients for an incoming gradient of 1, chunk by chunk."""
    N, V = hidden.shape[0], weight.shape[0]
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_BYTES // (V * hidden.element_size()))
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
    grad_weight = torch.zeros_like(weight) if need_grad_weight else None
    loss_rows = torch.empty(N, dtype=torch.float32, device=hidden.device)
    for start in range(0, N, chunk_size):
        end = min(start + chunk_size, N)
        hidden_chunk = hidden[start:end]
        logits = hidden_chunk @ weight.T  # (n, V) in hidden's dtype
        _cross_entropy_kernel[(end - start,)](
            logits, labels[start:end], loss_rows[start:end], V, ignore_index,
            float(softcap) if softcap is not None else 1.0, HAS_SOFTCAP=softcap is not None,
            BLOCK_SIZE=min(_BLOCK_SIZE, triton.next_power_of_2(V)), num_warps=8)
        grad_logits = logits  # the kernel overwrote the logits with dloss/dlogits
        if grad_hidden is not None:
            torch.mm(grad_logits, weight, out=grad_hidden[start:end])
        if grad_weight is not None:
            grad_weight.addmm_(grad_logits.T, hidden_chunk)
    return loss_rows.sum(), grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, softcap, ignore_index, chunk_size):
        D = hidden.shape[-1]
        loss, grad_hidden, grad_weight = _linear_cross_entropy_forward(
            hidden.view(-1, D), weight, labels.view(-1), softcap, ignore_index, chunk_size,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if grad_hidden is not None:
            grad_hidden = grad_hidden.view(hidden.shape)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        # the loss is a sum, so its gradients are the ones computed in the forward times grad_loss
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy_triton(hidden, weight, labels, softcap=None, ignore_index=-100, chunk_size=None):
    """Sum of cross-entropy over non-ignored rows of hidden (..., D) @ weight (V, D)^T vs labels (...)."""
    _validate(hidden, weight, labels, softcap, ignore_index, chunk_size)
    return _LinearCrossEntropy.apply(hidden, weight, labels, softcap, ignore_index, chunk_size)
