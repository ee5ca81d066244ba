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

They live inside the package (`minilora.kernels`), not as a top-level `kernels`: that import name belongs to
Hugging Face's `kernels` package, which transformers (>= 5.25) requires and imports; a top-level package of ours
would shadow it there (and overwrite it in site-packages).
"""
