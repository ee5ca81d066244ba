"""QLoRA on real pretrained weights (MINILORA_REAL_CKPTS=DIR, README "Tests"): a few optimizer steps of
trainer.train on SmolLM2-135M-Instruct (NF4 base, LoRA) on CPU lower the loss on held-out rows of the embedded
task set (minilora/tasks). Skips when the checkpoint is absent. About 2 minutes on one CPU core."""
import json
import os

import pytest
import torch

from conftest import real_checkpoint
from minilora import load_model, tasks
from minilora.config import TrainConfig
from minilora.data import load_records, split_records, tokenize_example
from minilora.trainer import evaluate_loss, train

pytestmark = pytest.mark.real

ROWS = 48  # the first training tasks; 8 of them held out


def test_real_qlora_lowers_held_out_loss(tmp_path):
    path = real_checkpoint("smollm2-135m-instruct")
    rows = tasks.train_records()[:ROWS]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    config = TrainConfig(model=path, data=str(data), out=str(tmp_path / "run"), device="cpu", quantize="nf4",
                         backend="torch", lora_r=16, lora_alpha=32.0, lora_dropout=0.0, learning_rate=1e-3,
                         micro_batch_size=4, grad_accum_steps=1, max_steps=8, max_seq_len=192,
                         test_fraction=1 / 6, split_seed=0, eval_every=0, eval_examples=8, save_every=0,
                         progress=False)

    # The loss of the untuned NF4 base on exactly the rows the trainer holds out (LoRA starts at B = 0, so
    # this is also the adapted model's loss at step 0).
    base, tok = load_model(path, dtype=torch.float32, device="cpu", quantize="nf4", backend="torch")
    _, test_records = split_records(load_records(config.data), test_fraction=config.test_fraction,
                                    seed=config.split_seed)
    test = [ex for r in test_records if (ex := tokenize_example(r, tok, config.max_seq_len))]
    assert len(test) == 8
    before = evaluate_loss(base, test, config, tok.pad_id, torch.device("cpu"), torch.float32)
    del base

    result = train(config)
    after = result["eval_loss"]
    assert result["steps"] == 8
    assert torch.isfinite(torch.tensor(after))
    print(f"held-out loss {before:.4f} -> {after:.4f}")  # shown with pytest -s
    # require a clear fall (0.1 nat), not noise
    assert after < before - 0.1, f"held-out loss did not fall: {before:.4f} -> {after:.4f}"
    assert os.path.isfile(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
