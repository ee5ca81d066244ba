"""`load_model`: name or directory in, (model, tokenizer) out. The public entry point."""
import torch

from .config import load_config
from .hub import resolve_model_dir
from .model import Transformer
from .tokenizer import load_tokenizer
from .weights import load_weights


def load_model(name_or_dir, dtype=torch.float32, device="cpu", quantize=None, backend="auto", adapter=None,
               revision=None, token=None, quantize_device=None):
    """Load a causal LM and its tokenizer.

    quantize: None (weights in `dtype`) or "nf4" (block linears 4-bit, as QLoRA; embeddings, norms and
    lm_head stay in `dtype`). backend: "auto" | "torch" | "triton" | "bnb" for the 4-bit matmul.
    adapter: a PEFT-format LoRA adapter directory to attach.
    quantize_device: where quantize="nf4" runs if not on `device` (each 4-bit layer then moves to `device`).
    """
    directory = resolve_model_dir(name_or_dir, revision=revision, token=token)
    config = load_config(directory)
    tokenizer = load_tokenizer(directory)
    with torch.device("meta"):
        model = Transformer(config)
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize={quantize!r} is not supported (use None or 'nf4').")
    load_weights(model, directory, dtype, torch.device(device), quantize, backend,
                 None if quantize_device is None else torch.device(quantize_device))
    model.source_dir = directory  # config.json and tokenizer files are copied from here when saving
    if adapter is not None:
        from .lora import load_adapter

        load_adapter(model, adapter)
    model.eval()  # after the adapter, so its LoRA dropout is off too
    return model, tokenizer
