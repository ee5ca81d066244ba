"""`python evaluate.py --study` end to end on two tiny checkpoints and a reference one: real training, resume.

The table's numbers are checked against rouge-score run directly on each cell's predictions.jsonl, the tuned
cells against the adapters training wrote, and resuming against a monkeypatched trainer that must not run.
"""
import json
import os

import pytest

import evaluate
from minilora import study as study_module
from tiny import make_checkpoint

RECORDS = [{"instruction": f"Add {i} to x.", "input": "", "output": f"def f{i}(x):\n    return x + {i}"}
           for i in range(24)]
TRAIN_YAML = "lora_r: 8\nlora_alpha: 16\nmicro_batch_size: 4\ngrad_accum_steps: 1\nmax_seq_len: 96\n" \
             "gradient_checkpointing: false\neval_examples: 4\nlearning_rate: 0.003\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    for i, family in enumerate(("llama", "qwen2", "gemma")):
        make_checkpoint(family, root / family, seed=30 + i)
    (root / "data.json").write_text(json.dumps(RECORDS))
    (root / "train.yaml").write_text(TRAIN_YAML)
    return root


def _argv(root, out, *extra):
    return ["--study", "--models", f"{root / 'llama'},{root / 'qwen2'}", "--reference-models", str(root / "gemma"),
            "--data", str(root / "data.json"), "--test-fraction", "0.25", "--out", str(out), "--max-new-tokens", "12",
            "--max-steps", "20", "--train-config", str(root / "train.yaml"), "--no-progress", *extra]


def _rouge_from_predictions(directory):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    with open(os.path.join(directory, "predictions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return sum(scorer.score(r["reference"], r["prediction"])["rougeL"].fmeasure for r in rows) / len(rows), len(rows)


@pytest.mark.slow
def test_study_runs_resumes_and_refuses_other_settings(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    assert evaluate.main(_argv(files, out)) == 0
    table = capsys.readouterr().out
    result = json.loads((out / "study.json").read_text())
    assert table == (out / "study.md").read_text()
    llama, qwen, gemma = (str(files / f) for f in ("llama", "qwen2", "gemma"))
    assert list(result["models"]) == [llama, qwen, gemma]
    for name in (llama, qwen):
        cell = result["models"][name]
        assert cell["role"] == "tuned" and cell["train"]["steps"] == 20
        assert os.path.isfile(os.path.join(cell["train"]["adapter"], "adapter_model.safetensors"))
        for phase in ("untuned", "tuned"):
            expected, n = _rouge_from_predictions(out / os.path.basename(name) / phase)
            assert cell[phase]["rouge_l"] == pytest.approx(expected, abs=1e-12) and cell[phase]["n"] == n == 6
        tuned_summary = json.loads((out / os.path.basename(name) / "tuned" / "summary.json").read_text())
        assert tuned_summary["adapter"] == cell["train"]["adapter"]
        before, after = cell["untuned"]["rouge_l"], cell["tuned"]["rouge_l"]
        assert cell["relative_improvement"] == (None if before == 0 else pytest.approx(after / before - 1))
        assert after > before  # 20 steps on this tiny, regular data really teach the answer format
        assert os.path.basename(name) in table
    assert set(result["models"][gemma]) == {"role", "untuned"} and "(reference, untuned)" in table

    # Resume: every cell is recorded, so nothing is trained or generated again.
    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr("minilora.trainer.train", must_not_run)
    monkeypatch.setattr(study_module, "evaluate_rouge", must_not_run)
    assert evaluate.main(_argv(files, out)) == 0
    assert json.loads((out / "study.json").read_text())["models"] == result["models"]

    # A lost cell is redone, and only that one.
    monkeypatch.undo()
    edited = json.loads((out / "study.json").read_text())
    del edited["models"][qwen]["tuned"]
    (out / "study.json").write_text(json.dumps(edited))
    calls = []
    real = study_module.evaluate_rouge
    monkeypatch.setattr(study_module, "evaluate_rouge", lambda config: calls.append(config.model) or real(config))
    monkeypatch.setattr("minilora.trainer.train", must_not_run)
    assert evaluate.main(_argv(files, out)) == 0
    assert calls == [qwen]
    redone = json.loads((out / "study.json").read_text())["models"][qwen]["tuned"]
    assert {k: redone[k] for k in ("rouge_l", "rouge_l_code", "n")} == \
        {k: result["models"][qwen]["tuned"][k] for k in ("rouge_l", "rouge_l_code", "n")}

    # Other settings would mix incomparable cells: refused, naming the setting.
    capsys.readouterr()
    assert evaluate.main(_argv(files, out, "--split-seed", "1")) == 1
    assert "split_seed" in capsys.readouterr().err


def test_a_failing_model_is_recorded_and_the_others_run(files, tmp_path, capsys):
    out = tmp_path / "study"
    broken = tmp_path / "broken"
    broken.mkdir()  # a directory without config.json
    argv = ["--study", "--models", str(broken), "--reference-models", str(files / "gemma"), "--data",
            str(files / "data.json"), "--test-fraction", "0.25", "--out", str(out), "--max-new-tokens", "4",
            "--no-progress", "--limit", "2"]
    assert evaluate.main(argv) == 1
    assert "1 model(s) failed" in capsys.readouterr().err
    result = json.loads((out / "study.json").read_text())
    assert "config.json" in result["models"][str(broken)]["error"]
    assert result["models"][str(files / "gemma")]["untuned"]["n"] == 2
