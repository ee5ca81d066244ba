"""Bad settings and output directories fail with a clear error before any model loads; nothing is lost.

train.py and evaluate.py are called in-process with a model path that does not exist: an error about the
model would mean the check came too late. Also: --overwrite/--resume on an --out that holds a run, malformed
adapter_config.json and train_config.json next to an adapter.
"""
import json
import os

import pytest
import torch

import evaluate
import train
from minilora.config import TrainConfig
from minilora.errors import CheckpointError, ConfigError
from minilora.evaluation import EvalConfig, with_run_split

from conftest import regen

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(capsys, *argv):
    code = train.main([*map(str, argv), "--no-progress"])
    return code, capsys.readouterr().err


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}] * 4))
    return path


@pytest.mark.parametrize("flags, message", [
    (["--adam-beta1", "2"], "--adam-beta1=2.0: expected 0 <= beta1 < 1"),
    (["--adam-beta2", "1"], "--adam-beta2=1.0"),
    (["--weight-decay", "nan"], "--weight-decay=nan: expected a finite number"),
    (["--adam-eps", "nan"], "--adam-eps=nan: expected a finite number"),
    (["--adam-eps", "0"], "--adam-eps=0.0: expected a positive number"),
    (["--learning-rate", "inf"], "--learning-rate=inf"),
    (["--lora-dropout", "nan"], "--lora-dropout=nan"),
    (["--device", "bogus"], "--device='bogus': expected auto, cpu, cuda or cuda:N"),
    (["--device", "mps"], "--device='mps'"),
    (["--resume", "--overwrite"], "--overwrite=True: expected not together with --resume"),
])
def test_bad_training_values_fail_before_the_model_loads(tmp_path, data, capsys, flags, message):
    code, err = _train(capsys, "--model", tmp_path / "no-such-model", "--data", data, "--out", tmp_path / "o", *flags)
    assert code == 1 and message in err, err
    assert "no-such-model" not in err and not (tmp_path / "o").exists()


def test_cuda_on_a_cpu_only_torch_and_data_directory(tmp_path, data, capsys):
    if not torch.cuda.is_available():
        code, err = _train(capsys, "--model", tmp_path / "m", "--data", data, "--out", tmp_path / "o", "--device", "cuda")
        assert code == 1 and "--device='cuda'" in err and "sees no CUDA GPU" in err, err
        code, err = _train(capsys, "--model", tmp_path / "m", "--data", data, "--out", tmp_path / "o", "--device", "cuda:0")
        assert code == 1 and "sees no CUDA GPU" in err
    code, err = _train(capsys, "--model", tmp_path / "m", "--data", tmp_path, "--out", tmp_path / "o")
    assert code == 1 and "--data=" in err and "not a directory" in err, err


def test_no_flag_abbreviations(tmp_path, data, capsys):
    """`--lr nan` used to be read as --lr-schedule nan."""
    with pytest.raises(SystemExit):
        train.main(["--model", str(tmp_path), "--data", str(data), "--lr", "nan"])
    assert "unrecognized arguments: --lr nan" in capsys.readouterr().err


def test_every_field_is_type_checked():
    for name, value in [("lora_r", 2.5), ("epochs", True), ("learning_rate", "1e-4"), ("pack", 1),
                        ("lora_targets", ("q_proj", 3)), ("max_seq_len", float("nan"))]:
        with pytest.raises(ConfigError, match=f"--{name.replace('_', '-')}="):
            TrainConfig(**{name: value}).validate()
    for name, value in [("exec_timeout_s", float("inf")), ("exec_workers", 0), ("top_p", float("nan")),
                        ("stop", ("x", 1)), ("exec_memory_mb", 8)]:
        with pytest.raises(ConfigError, match=f"--{name.replace('_', '-')}="):
            EvalConfig(**{name: value}).validate()


def test_bad_out_directories_fail_before_the_model_loads(tmp_path, data, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    model_dir = tmp_path / "model"  # a directory, never loaded: the checks come first
    model_dir.mkdir()
    os.symlink(model_dir, tmp_path / "link")
    for out, message in [(afile, "is a file, not a directory"), (afile / "run", "is a file, so no directory"),
                         ("/proc/minilora-run", "cannot write"), (tmp_path / "link" / "run", "inside the base model directory")]:
        code, err = _train(capsys, "--model", model_dir, "--data", data, "--out", out)
        assert code == 1 and message in err, (out, err)
    assert afile.read_text() == "x" and os.listdir(model_dir) == []


def test_an_earlier_run_is_never_mixed_in(tmp_path, capsys):
    """A second fresh run into the same --out is refused (files untouched); --overwrite replaces the run."""
    base, data_file = regen.write_inputs(str(tmp_path / "inputs"))
    out = tmp_path / "run"
    first = ["--model", base, "--data", data_file, "--out", out, "--max-steps", "2", "--save-every", "1", "--keep-last",
             "3", "--eval-every", "0", "--micro-batch-size", "2", "--grad-accum-steps", "1", "--lora-r", "2",
             "--quantize", "none", "--max-seq-len", "256"]
    assert _train(capsys, *first)[0] == 0
    snapshot = {p: open(os.path.join(out, p), "rb").read() for p in ("metrics.jsonl", "manifest.json")}
    steps = sorted(os.listdir(out / "checkpoints"))
    code, err = _train(capsys, *first[:-4], "--max-steps", "1", "--quantize", "none", "--max-seq-len", "256")
    assert code == 1 and "already holds files" in err and "--resume" in err and "--overwrite" in err, err
    assert {p: open(os.path.join(out, p), "rb").read() for p in snapshot} == snapshot
    assert sorted(os.listdir(out / "checkpoints")) == steps == ["step_000001", "step_000002"]
    code, err = _train(capsys, *first[:-6], "--max-steps", "1", "--quantize", "none", "--max-seq-len", "256",
                       "--overwrite")
    assert code == 0, err
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000001"]  # the earlier run's step 2 is gone
    steps_logged = [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert steps_logged == [1]


def test_malformed_adapter_and_run_config_name_the_file(tmp_path, capsys):
    from minilora import load_model
    from minilora.lora import apply_lora, save_adapter

    base, data_file = regen.write_inputs(str(tmp_path / "inputs"))
    model, _ = load_model(base)
    apply_lora(model, r=2, alpha=4.0, targets=("q_proj",))
    adapter = tmp_path / "run" / "adapter"
    save_adapter(model, str(adapter))
    good = json.loads((adapter / "adapter_config.json").read_text())
    for key, value, words in [("r", "eight", "r='eight' is not an integer >= 1"), ("target_modules", 5, "target_modules=5"),
                              ("lora_alpha", None, "required key 'lora_alpha'"), ("lora_dropout", "x", "lora_dropout='x'"),
                              ("use_rslora", "yes", "use_rslora='yes'")]:
        (adapter / "adapter_config.json").write_text(json.dumps({**good, key: value}))
        with pytest.raises(CheckpointError) as e:
            load_model(base, adapter=str(adapter))
        assert str(adapter / "adapter_config.json") in str(e.value) and words in str(e.value), str(e.value)
    (adapter / "adapter_config.json").write_text(json.dumps(good))
    run_config = tmp_path / "run" / "train_config.json"
    for text, words in [('{"data": "x", "test_fr', "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                        ('{"test_fraction": "half"}', "test_fraction='half' has type str")]:
        run_config.write_text(text)
        with pytest.raises(CheckpointError, match="train_config.json") as e:
            with_run_split(EvalConfig(model=base, adapter=str(adapter)))
        assert words in str(e.value)
        assert evaluate.main(["--model", str(tmp_path / "missing"), "--adapter", str(adapter), "--out",
                              str(tmp_path / "o")]) == 1
        assert "train_config.json" in capsys.readouterr().err
