"""minilora: a small, readable QLoRA toolkit for fine-tuning small language models on code."""

__version__ = "0.1.0"

from .loading import load_model  # noqa: E402

__all__ = ["load_model"]
