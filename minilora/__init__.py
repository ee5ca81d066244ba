"""minilora: a small, readable QLoRA toolkit for fine-tuning small language models on code."""

__version__ = "0.1.0"
