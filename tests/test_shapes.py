"""Every reference config builds, on the meta device, exactly the tensors of the real checkpoint.

The expected names, shapes and parameter counts come from docs/reference/expected_shapes.json
(derived with transformers on the hub config.json files in docs/reference/configs/; docs/reference/README.md).
"""
import json
import os

import pytest
import torch

from conftest import REFERENCE_DIR
from minilora.config import load_config
from minilora.model import Transformer
from minilora.weights import checkpoint_key_map

with open(os.path.join(REFERENCE_DIR, "expected_shapes.json")) as f:
    EXPECTED = json.load(f)["models"]


def _checkpoint_shapes(model):
    """Shape of each checkpoint tensor our loader expects (fused Phi-3 rows summed)."""
    params = dict(model.named_parameters())
    shapes = {}
    for key, targets in checkpoint_key_map(model.config, model).items():
        rows = sum(params[name].shape[0] for name, _ in targets)
        shapes[key] = [rows, *params[targets[0][0]].shape[1:]]
    return shapes


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_meta_model_matches_reference_shapes(name, tmp_path):
    expected = EXPECTED[name]
    with open(os.path.join(REFERENCE_DIR, "configs", f"{name}.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    config = load_config(str(tmp_path))
    with torch.device("meta"):
        model = Transformer(config)
    assert sum(p.numel() for p in model.parameters()) == expected["total_params"]
    want = dict(expected["top_level"])
    for i in range(expected["num_hidden_layers"]):
        want.update({k.replace("{i}", str(i)): v for k, v in expected["per_layer"].items()})
    got = _checkpoint_shapes(model)
    if config.tie_word_embeddings:
        got.pop("lm_head.weight", None)  # tied: the checkpoint stores only the embedding
    assert got == want
