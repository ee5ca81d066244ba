"""What a newcomer meets first: command-line help, bad model arguments, log noise, the trainable-parameter
count, the eval-loss baseline of the loss curve, and the demo end to end on the embedded tasks."""
import json
import os
import subprocess
import sys

import pytest
import torch

from minilora import hub
from minilora.config import TrainConfig
from minilora.errors import HubError
from minilora.loading import load_model
from minilora.lora import apply_lora, parameter_counts

from conftest import ROOT, regen

pytestmark = pytest.mark.usefixtures("one_thread")


def _python(*args, timeout=120):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_help_names_the_module_and_required_options():
    demo = _python("-m", "minilora.demo", "--help")
    assert demo.returncode == 0 and demo.stdout.startswith("usage: python -m minilora.demo")
    inspect = _python("-m", "minilora.inspect", "--help")
    assert inspect.returncode == 0
    model_help = " ".join(inspect.stdout.split("--model MODEL", 2)[2].split("--adapter")[0].split())
    assert "(required)" in model_help and "default" not in model_help


def test_train_checks_a_missing_model_path_before_the_dataset(tmp_path, monkeypatch):
    """No --data: the default is a hub dataset; a bad --model must fail first, naming the path, without a download."""
    from minilora import data, trainer

    def no_download(source):
        raise AssertionError(f"the dataset {source} was fetched before the model argument was checked")

    monkeypatch.setattr(data, "_download", no_download)
    with pytest.raises(HubError, match="'/nonexistent': no such directory"):
        trainer.train(TrainConfig(model="/nonexistent", out=str(tmp_path / "out"), device="cpu"))
    assert not (tmp_path / "out").exists()


def test_train_py_bad_model_path_is_one_line(tmp_path):
    result = _python("train.py", "--model", str(tmp_path / "no" / "such" / "dir"), "--out", str(tmp_path / "o"))
    assert result.returncode == 1
    assert "no such directory" in result.stderr and str(tmp_path / "no" / "such" / "dir") in result.stderr
    assert "huggingface.co" not in result.stderr


def test_missing_relative_path_with_one_slash_says_no_such_directory(monkeypatch):
    """`ckpts/smollm2` reads as a hub id too: the error names both readings."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(HubError) as e:
        hub.resolve_model_dir("ckpts/smollm2")
    assert "no such directory 'ckpts/smollm2'" in str(e.value) and "hub" in str(e.value)
    with pytest.raises(HubError, match="cannot download HuggingFaceTB/SmolLM2-135M") as e:
        hub.resolve_model_dir("smollm2-135m")  # a short name is no path: no "no such directory"
    assert "no such directory" not in str(e.value)
    for path in ("./ckpts/smollm2", "a/b/c", "~/x", "/abs/path"):
        with pytest.raises(HubError, match="no such directory"):
            hub.check_model_name(path)


def test_model_argument_that_is_a_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(HubError, match="is a file, not a directory"):
        hub.check_model_name(str(path))


def test_hub_warnings_print_once_and_absl_info_is_quiet():
    """train.py and evaluate.py set logs up with minilora.cli.setup_logging; a hub retry warning comes out once."""
    code = ("from minilora.cli import setup_logging; setup_logging()\n"
            "from huggingface_hub.utils import logging as hub_logging\n"
            "hub_logging.get_logger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')\n"
            "import logging; logging.getLogger('absl').info('Using default tokenizer.')\n"
            "logging.getLogger('minilora.trainer').info('ours')\n")
    result = _python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Retrying in 1s") == 1
    assert "Using default tokenizer" not in result.stderr and "ours" in result.stderr


def test_trainable_percentage_counts_nf4_weights_at_their_logical_size(inputs):
    """The NF4 model counts as many base parameters as the same model in floats (reference: plain numel sums),
    and the ratio is inspect's."""
    from minilora.inspect import count_parameters, meta_model
    from minilora.config import load_config

    base, _ = inputs
    targets = ("q_proj", "v_proj", "down_proj")
    counts = {}
    for quantize in (None, "nf4"):
        model, _ = load_model(base, quantize=quantize, backend="torch")
        apply_lora(model, 8, 16.0, targets=targets)
        counts[quantize] = parameter_counts(model)
        if quantize is None:
            want = (sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n),
                    sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n))
    assert counts[None] == counts["nf4"] == want
    inspected = count_parameters(meta_model(load_config(base), 8, 16.0, targets))
    assert (inspected["lora"], inspected["total"]) == want


def test_eval_loss_is_logged_before_the_first_step(inputs, tmp_path):
    from minilora.trainer import read_metrics, train

    out = tmp_path / "run"
    train(regen.recipe_config(*inputs, str(out), eval_every=2, max_steps=4))
    records = read_metrics(str(out / "metrics.jsonl"))
    assert records[0] == {"step": 0, "eval_loss": pytest.approx(records[0]["eval_loss"])}
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 3 and all(torch.isfinite(torch.tensor(evals)))
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


def test_demo_runs_offline_on_the_embedded_tasks(tmp_path):
    """`python -m minilora.demo --tiny` from the repository, nothing beside it: every output it lists exists."""
    out = tmp_path / "demo"
    result = _python("-m", "minilora.demo", "--tiny", "--out", str(out), "--pretrain-steps", "4", "--steps", "4",
                     "--eval-tasks", "6", "--max-new-tokens", "12", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for table_row in ("untuned (pretrained-here base)", "+ QLoRA adapter", "held-out pass@1"):
        assert table_row in result.stdout
    report = json.loads((out / "demo.json").read_text())
    for side in ("before", "after"):
        assert 0.0 <= report[side]["pass@1"] <= 1.0 and report[side]["problems"] == 6
        rows = [json.loads(line) for line in (out / side / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == 6 and all(r["status"] in ("passed", "failed", "crashed", "timeout") for r in rows)
    for path in ("data/train.json", "data/held_out.jsonl", "train/adapter/adapter_model.safetensors", "train/loss.png",
                 "base/model.safetensors"):
        assert (out / path).is_file(), path
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0 and "eval_loss" in metrics[0]
    assert "shared" not in result.stdout + result.stderr


def test_demo_dequantize_once_gives_the_nf4_models_logits(inputs):
    """The demo scores with each NF4 weight dequantized once: the same logits as the 4-bit reference path (fp32)."""
    from minilora.demo import dequantize_once
    from minilora.nf4 import Linear4bit

    base, _ = inputs
    model, tok = load_model(base, quantize="nf4", backend="torch")
    apply_lora(model, 4, 8.0, targets=("q_proj", "up_proj"))
    for name, p in model.named_parameters():
        if ".lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # a trained-looking adapter, not the zero start
    ids = torch.randint(3, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        want = model(ids)
        got = dequantize_once(model)(ids)
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_evaluate_py_prints_no_absl_line(inputs, tmp_path):
    """rouge-score's "INFO absl: Using default tokenizer." no longer reaches evaluate.py's output."""
    base, data = inputs
    result = _python("evaluate.py", "--model", base, "--data", data, "--limit", "1", "--max-new-tokens", "2",
                     "--device", "cpu", "--no-progress", "--out", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| model |" in result.stdout
    assert "absl" not in result.stderr + result.stdout


def test_demo_without_bubblewrap_skips_pass_at_1_unless_told(monkeypatch, capsys):
    """Where bubblewrap is missing the demo still runs, scores no pass@1 and says how to get it; with
    --unsafe-no-sandbox it runs the programs without one. Nothing runs when it says 'not run'."""
    import minilora.sandbox
    from minilora import demo

    monkeypatch.setattr(minilora.sandbox, "sandbox_status", lambda: (False, "bubblewrap (`bwrap`) is not installed"))
    assert demo.how_to_run_code(False) == "no"
    assert "sudo apt-get install -y bubblewrap" in capsys.readouterr().out
    problem = {"task_id": "t/0", "prompt": "def f(x):\n", "entry_point": "f", "test": "def check(candidate):\n    assert candidate(1) == 2\n"}
    assert demo.run_tests([problem], ["    return x + 1\n"], "no") == (None, ["not run"])
    assert demo.how_to_run_code(True) == "unsandboxed"
    assert "WITHOUT a sandbox" in capsys.readouterr().out
    pass1, statuses = demo.run_tests([problem, problem], ["    return x + 1\n", "    return x\n"], "unsandboxed")
    assert (pass1, statuses) == (0.5, ["passed", "failed"])
