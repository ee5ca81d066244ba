"""`python evaluate.py --study` end to end on two tiny checkpoints (one with a chat template) and a reference
one: both untuned baselines, two training seeds, pass@1 on a small problems file, resume.

The table's numbers are checked against rouge-score run directly on each cell's predictions.jsonl, pass@1
against the sandbox verdicts written beside it, means and spreads against `statistics`, and resuming against
a monkeypatched trainer that must not run.
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


PROBLEMS = [{"task_id": f"t{i}", "prompt": f"def plus{i}(x):\n", "entry_point": f"plus{i}",
             "test": f"def check(f):\n    assert f(1) == {1 + i}\n", "instruction": f"Write plus{i}(x) that adds {i}."}
            for i in range(2)]


def _pass_at_1_from_predictions(directory):
    with open(os.path.join(directory, "pass1", "predictions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert {r["status"] for r in rows} <= {"passed", "failed", "crashed", "timeout"}
    return sum(r["status"] == "passed" for r in rows) / len(rows), len(rows)


@pytest.mark.slow
def test_study_runs_resumes_and_refuses_other_settings(files, tmp_path, monkeypatch, capsys):
    import statistics

    from test_chat_template import make_chat_tokenizer

    for family in ("llama", "gemma"):  # instruct-style: a chat template; qwen2 keeps a plain tokenizer
        make_chat_tokenizer(str(files / family))
    (files / "problems.jsonl").write_text("\n".join(json.dumps(p) for p in PROBLEMS))
    out = tmp_path / "study"
    argv = _argv(files, out, "--seeds", "2", "--problems", str(files / "problems.jsonl"))
    assert evaluate.main(argv) == 0
    table = capsys.readouterr().out
    result = json.loads((out / "study.json").read_text())
    assert table == (out / "study.md").read_text()
    llama, qwen, gemma = (str(files / f) for f in ("llama", "qwen2", "gemma"))
    assert list(result["models"]) == [llama, qwen, gemma]
    for name, fmt in ((llama, "chat"), (qwen, "alpaca")):
        record, here = result["models"][name], out / os.path.basename(name)
        assert record["role"] == "tuned" and ("untuned_chat" in record) == (fmt == "chat")
        cells = {k: (record[k], here / k.replace("_", "-")) for k in ("untuned_alpaca", "untuned_chat") if k in record}
        for s in ("0", "1"):
            run = record["runs"][s]
            assert run["train"]["steps"] == 20 and run["train"]["seed"] == int(s) and run["train"]["prompt_format"] == fmt
            assert json.loads((here / f"train-seed{s}" / "train_config.json").read_text())["prompt_format"] == fmt
            assert os.path.isfile(os.path.join(run["train"]["adapter"], "adapter_model.safetensors"))
            cells[f"tuned {s}"] = (run["tuned"], here / f"tuned-seed{s}")
        for cell, directory in cells.values():
            expected, n = _rouge_from_predictions(directory)
            assert cell["rouge_l"] == pytest.approx(expected, abs=1e-12) and cell["n"] == n == 6
            assert (cell["pass@1"], cell["problems_n"]) == _pass_at_1_from_predictions(directory)
        assert cells["untuned_alpaca"][0]["prompt_format"] == "alpaca"
        tuned = [record["runs"][s]["tuned"]["rouge_l"] for s in ("0", "1")]
        best = max(record[k]["rouge_l"] for k in ("untuned_alpaca", "untuned_chat") if k in record)
        summary = record["summary"]["rouge_l"]
        assert summary["tuned"] == [pytest.approx(statistics.mean(tuned)), pytest.approx(statistics.stdev(tuned))]
        if best == 0:  # an untuned tiny model can score nothing: no relative gain then
            assert summary["gain_vs_best"] == [None, None]
        else:
            gains = [t / best - 1 for t in tuned]
            assert summary["gain_vs_best"] == [pytest.approx(statistics.mean(gains)),
                                               pytest.approx(statistics.stdev(gains))]
        if record["untuned_alpaca"]["rouge_l"] > 0:
            alpaca_gains = [t / record["untuned_alpaca"]["rouge_l"] - 1 for t in tuned]
            assert summary["gain_vs_alpaca"][0] == pytest.approx(statistics.mean(alpaca_gains))
        assert min(tuned) > best  # 20 steps on this tiny, regular data really teach the answer format
        assert os.path.basename(name) in table
    assert set(result["models"][gemma]) == {"role", "untuned_chat"} and "(reference, untuned)" in table
    assert f"tuned beats {gemma} untuned on ROUGE-L" in table or f"does not beat {gemma}" in table

    # Resume: every cell is recorded, so nothing is trained or generated again.
    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr("minilora.trainer.train", must_not_run)
    monkeypatch.setattr(study_module, "score_cell", must_not_run)
    assert evaluate.main(argv) == 0
    assert json.loads((out / "study.json").read_text())["models"] == result["models"]

    # A lost cell is redone, and only that one.
    monkeypatch.undo()
    edited = json.loads((out / "study.json").read_text())
    del edited["models"][qwen]["runs"]["1"]["tuned"]
    (out / "study.json").write_text(json.dumps(edited))
    calls = []
    real = study_module.score_cell
    monkeypatch.setattr(study_module, "score_cell", lambda config, name, *a: calls.append(name) or real(config, name, *a))
    monkeypatch.setattr("minilora.trainer.train", must_not_run)
    assert evaluate.main(argv) == 0
    assert calls == [qwen]
    redone = json.loads((out / "study.json").read_text())["models"][qwen]["runs"]["1"]["tuned"]
    assert {k: redone[k] for k in ("rouge_l", "rouge_l_code", "n", "pass@1")} == \
        {k: result["models"][qwen]["runs"]["1"]["tuned"][k] for k in ("rouge_l", "rouge_l_code", "n", "pass@1")}

    # Other settings would mix incomparable cells: refused, naming the setting.
    capsys.readouterr()
    assert evaluate.main(argv + ["--split-seed", "1"]) == 1
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
    assert str(broken) in result["models"][str(broken)]["error"] and "is missing" in result["models"][str(broken)]["error"]
    reference = result["models"][str(files / "gemma")]
    assert [cell["n"] for key, cell in reference.items() if key.startswith("untuned")] == [2]
