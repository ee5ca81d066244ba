"""minilora's Triton kernels, one file per kernel family, each beside its torch reference.

- nf4_dequant.py: NF4 (double-quant aware) -> fp16/bf16/fp32 weight; reference `minilora.nf4.dequantize_nf4`.
- nf4_matmul.py:  x @ W^T with W in NF4 (GEMV at 1 row, W decoded in registers for the tensor cores at 2-64 rows,
                  dequant + cuBLAS otherwise) and g @ W; a joined gate/up GEMV with the GLU in its epilogue.
- backend.py:     the one setting that picks who runs the 4-bit work: "torch", "triton" or "bnb".
- rmsnorm.py, rope.py, glu.py, cross_entropy.py: the training kernels (see each file's docstring); rmsnorm.py
                  also has the residual add + RMSNorm of decoding.
- decode_attention.py: a decode step's RoPE + KV-cache write and one-query attention (flash-decoding splits).
- decode_attention_fused.py: the same in one launch (the last split to finish combines); model.py's decode step.
- pdl.py:         programmatic dependent launch (Hopper): decode kernels start while the previous one ends.

PyPI has an unrelated package named `kernels`; code importing ours checks `MINILORA_KERNELS`
(see `require_minilora_kernels`) so that a shadowing install fails loudly instead of importing the wrong thing.
"""

MINILORA_KERNELS = True


def require_minilora_kernels(module) -> None:
    """Raise a clear ImportError if `module` (the imported `kernels` package) is not minilora's."""
    if not getattr(module, "MINILORA_KERNELS", False):
        raise ImportError(
            f"'kernels' resolved to {getattr(module, '__file__', module)!r}, which is not minilora's kernels "
            "package (PyPI has an unrelated package of that name). Run from the minilora checkout or "
            "`pip uninstall kernels`, then `pip install -e .` in the minilora repo.")
