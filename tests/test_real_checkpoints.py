"""Real pretrained checkpoints (MINILORA_REAL_CKPTS=DIR, README "Tests"):
minilora and transformers agree on the logits of a code prompt. Skips when the checkpoints are absent."""
import pytest
import torch

from conftest import real_checkpoint
from minilora import load_model

pytestmark = pytest.mark.real
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"])
def test_real_logits_match_transformers(name):
    from transformers import AutoModelForCausalLM

    path = real_checkpoint(name)
    model, tokenizer = load_model(path, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([tokenizer.encode(PROMPT, add_special_tokens=True)])
    with torch.no_grad():
        got, expected = model(ids), ref(ids).logits.float()
    diff = (got - expected).abs()
    assert (got.argmax(-1) == expected.argmax(-1)).all(), f"{name}: top-1 differs; max abs diff {diff.max():.3e}"
    # fp32 through 18-30 layers with logits of magnitude ~30: 1e-3 absolute leaves room for summation order only
    assert diff.max() <= 1e-3, f"{name}: max abs diff {diff.max():.3e}, mean {diff.mean():.3e}"
