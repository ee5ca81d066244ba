"""evaluate.py end to end on a tiny random checkpoint, against independent references.

- predictions: transformers' greedy `generate` on the same Alpaca prompts (and peft for an adapter);
- scores: rouge-score's RougeScorer called directly on the written predictions;
- the rows scored: exactly the test side of `split_records` with the training run's fraction and seed;
- pass@k: problems whose tests pass (or fail) whatever the model writes, so the expected value is known.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import evaluate
from minilora.data import format_prompt, load_records, split_records
from minilora.sandbox import sandbox_available
from tiny import make_checkpoint

RECORDS = [{"instruction": f"Write a function number {i} that adds {i} to x.", "input": "" if i % 3 else f"x = {i}",
            "output": f"def f{i}(x):\n    return x + {i}"} for i in range(30)]
RECORDS[7]["output"] = ""  # an empty reference: skipped and counted, never scored
NEW = 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    hf = make_checkpoint("llama", root / "model", seed=21)
    data = root / "data.json"
    data.write_text(json.dumps(RECORDS))
    return root, hf, str(root / "model"), str(data)


def _run(*argv):
    return evaluate.main([*map(str, argv), "--no-progress", "--quantize", "none", "--max-new-tokens", str(NEW)])


def _read(out):
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out, "predictions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return summary, rows


def _hf_greedy_text(hf, tok, record):
    ids = tok.encode(format_prompt(record), add_special_tokens=True)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                          eos_token_id=tok.stop_ids)[0, len(ids):].tolist()
    out = out[:next((i for i, t in enumerate(out) if t in tok.stop_ids), len(out))]
    return tok.decode(out).strip()


def test_rouge_run_matches_independent_references(setup, tmp_path, capsys):
    from rouge_score import rouge_scorer

    from minilora.tokenizer import load_tokenizer

    root, hf, model, data = setup
    out = tmp_path / "out"
    assert _run("--model", model, "--data", data, "--split", "test", "--test-fraction", "0.3", "--split-seed", "5",
                "--out", out, "--batch-size", "3") == 0
    summary, rows = _read(out)
    table = capsys.readouterr().out
    assert "ROUGE-L" in table and table == (out / "summary.md").read_text()

    _, test = split_records(load_records(data), test_fraction=0.3, seed=5)
    expected_rows = [r for r in test if r["output"]]
    assert summary["skipped_empty_reference"] == len(test) - len(expected_rows)
    assert [(r["instruction"], r["reference"]) for r in rows] == [(r["instruction"], r["output"]) for r in expected_rows]
    assert summary["n"] == len(rows) == len(expected_rows)
    assert (summary["split_seed"], summary["test_fraction"], summary["model"]) == (5, 0.3, model)

    tok = load_tokenizer(model)
    assert [r["prediction"] for r in rows] == [_hf_greedy_text(hf, tok, r) for r in expected_rows]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    f1 = [scorer.score(r["reference"], r["prediction"])["rougeL"].fmeasure for r in rows]
    assert summary["rouge_l"] == pytest.approx(sum(f1) / len(f1), abs=1e-12)
    assert 0.0 <= summary["rouge_l_code"] <= 1.0


def test_adapter_run_uses_its_training_split_and_matches_peft(setup, tmp_path):
    from peft import PeftModel

    from minilora import load_model
    from minilora.lora import apply_lora, lora_parameters, save_adapter
    from minilora.tokenizer import load_tokenizer

    root, hf, model, data = setup
    base, _ = load_model(model)
    apply_lora(base, r=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    with torch.no_grad():
        for name, p in lora_parameters(base).items():
            p.normal_(0, 0.5)  # a visible change of the outputs
    run = tmp_path / "run"
    save_adapter(base, str(run / "adapter"))
    (run / "train_config.json").write_text(json.dumps({"data": data, "test_fraction": 0.2, "split_seed": 3}))
    out = tmp_path / "out"
    assert _run("--model", model, "--adapter", run / "adapter", "--out", out, "--limit", "3") == 0
    summary, rows = _read(out)
    assert (summary["data"], summary["test_fraction"], summary["split_seed"]) == (data, 0.2, 3)
    _, test = split_records(load_records(data), test_fraction=0.2, seed=3)
    expected = [r for r in test if r["output"]][:3]
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in expected]
    peft_model = PeftModel.from_pretrained(hf, str(run / "adapter")).eval()
    tok = load_tokenizer(model)
    try:
        assert [r["prediction"] for r in rows] == [_hf_greedy_text(peft_model, tok, r) for r in expected]
        with peft_model.disable_adapter():  # the adapter really changed the answers
            untuned = [_hf_greedy_text(peft_model, tok, r) for r in expected]
        assert [r["prediction"] for r in rows] != untuned
    finally:
        peft_model.unload()  # the module-scoped hf model is shared with other tests


# Problems whose verdict does not depend on the completion: cut at the first line break (--stop), the completion
# lands in a comment at the end of the prompt. Only a NUL byte (no Python source may hold one) changes that.
ALWAYS = {"task_id": "always", "prompt": "def f():\n    return 1\n# ", "test": "def check(fn):\n    assert fn() == 1\n",
          "entry_point": "f"}
NEVER = {"task_id": "never", "prompt": "def g():\n    return 1\n# ", "test": "def check(fn):\n    assert fn() == 2\n",
         "entry_point": "g"}
SLOW = {"task_id": "slow", "prompt": "def h():\n    return 1\n# ",
        "test": "import time\ndef check(fn):\n    time.sleep(0.4)\n    assert fn() == 1\n", "entry_point": "h"}
STOP = ["--stop", "\n", "\r"]
needs_sandbox = pytest.mark.skipif(not sandbox_available() and os.environ.get("CI") != "true",
                                   reason="bubblewrap is not usable here; install it: apt-get install -y bubblewrap")


def _expected(problem, completion):
    return "crashed" if "\x00" in completion else {"always": "passed", "never": "failed", "slow": "passed"}[problem]


@needs_sandbox
@pytest.mark.parametrize("samples, pass_at, temperature", [(0, 1, 0.0), (3, 2, 1.0)])
def test_pass_at_k_run(setup, tmp_path, samples, pass_at, temperature):
    from minilora.metrics import pass_at_k

    root, hf, model, data = setup
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in (ALWAYS, NEVER)))
    out = tmp_path / "out"
    assert _run("--model", model, "--problems", problems, "--pass-at", pass_at, "--samples", samples,
                "--temperature", temperature, "--out", out, "--exec-timeout-s", "10", *STOP) == 0
    summary, rows = _read(out)
    n = samples or 1
    assert summary["n"] == 2 and summary["samples_per_problem"] == n and len(rows) == 2 * n
    assert [(r["task_id"], r["sample"]) for r in rows] == [(t, j) for t in ("always", "never") for j in range(n)]
    assert [r["status"] for r in rows] == [_expected(r["task_id"], r["completion"]) for r in rows]
    correct = [sum(r["status"] == "passed" for r in rows if r["task_id"] == t) for t in ("always", "never")]
    assert summary[f"pass@{pass_at}"] == pytest.approx(sum(pass_at_k(n, c, pass_at) for c in correct) / 2)
    assert summary["sandbox"]["sandbox"] == "bubblewrap"


@needs_sandbox
def test_killed_evaluation_resumes_without_losing_finished_samples(setup, tmp_path):
    """SIGKILL evaluate.py while it executes samples; --resume keeps every finished row, generates nothing,
    and runs only the samples that had not finished."""
    root, hf, model, data = setup
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps(SLOW) + "\n")
    out = tmp_path / "out"
    argv = [sys.executable, "evaluate.py", "--model", model, "--problems", str(problems), "--samples", "6",
            "--pass-at", "1", "--temperature", "1.0", "--out", str(out), "--exec-workers", "1", "--no-progress",
            "--quantize", "none", "--max-new-tokens", str(NEW), *STOP]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    predictions = out / "predictions.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if predictions.exists() and predictions.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    before = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert 3 <= len(before) < 6, "the run was not killed while executing samples"
    assert not (out / "summary.json").exists()
    with open(predictions, "a") as f:
        f.write('{"problem": 0, "sam')  # and a line torn by the kill
    resumed = subprocess.run(argv + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(before)} of 6 samples already executed, {6 - len(before)} to run" in resumed.stderr
    summary, rows = _read(out)
    assert summary["new_tokens"] is None  # nothing generated: the completions came from completions.jsonl
    assert [r["sample"] for r in rows] == list(range(6))
    kept = {r["sample"]: r for r in rows}
    assert all(kept[r["sample"]] == r for r in before)  # finished rows unchanged (not run again)
    assert [r["status"] for r in rows] == [_expected("slow", r["completion"]) for r in rows]


def test_no_sandbox_is_refused_before_the_model_loads(setup, tmp_path, capsys, monkeypatch):
    from minilora import execution

    root, hf, model, data = setup
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps(ALWAYS) + "\n")
    monkeypatch.setattr(execution, "sandbox_status", lambda: (False, "bubblewrap (`bwrap`) is not installed"))
    assert _run("--model", tmp_path / "no-such-model", "--problems", problems, "--out", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "SandboxError" in err and "apt-get install -y bubblewrap" in err and "--unsafe-no-sandbox" in err
    assert not (tmp_path / "o").exists()
    with pytest.warns(RuntimeWarning, match="WITHOUT A SANDBOX"):
        assert _run("--model", model, "--problems", problems, "--out", tmp_path / "o", "--unsafe-no-sandbox", *STOP) == 0
    summary, rows = _read(tmp_path / "o")
    assert summary["sandbox"]["sandbox"] == "none" and rows[0]["status"] == _expected("always", rows[0]["completion"])


def test_out_directory_is_checked_before_the_model_loads(setup, tmp_path, capsys):
    root, hf, model, data = setup
    missing_model = tmp_path / "no-such-model"  # loading it would fail: every error below comes first
    afile = tmp_path / "afile"
    afile.write_text("x")
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "predictions.jsonl").write_text("{}\n")
    os.symlink(model, tmp_path / "link-to-model")
    cases = [(afile, "is a file, not a directory"), (afile / "sub", "is a file, so no directory can be made"),
             ("/proc/minilora-out", "cannot write"), (earlier, "already holds files (predictions.jsonl)")]
    for out, message in cases:
        assert _run("--model", missing_model, "--data", data, "--out", out) == 1, out
        assert message in capsys.readouterr().err, out
    assert _run("--model", model, "--data", data, "--out", tmp_path / "link-to-model" / "eval") == 1
    assert "inside the model directory" in capsys.readouterr().err
    assert (earlier / "predictions.jsonl").read_text() == "{}\n"
    assert _run("--model", model, "--data", data, "--out", earlier, "--overwrite", "--limit", "1") == 0
    assert _read(earlier)[0]["n"] == 1


def test_bad_settings_are_clear_errors(setup, tmp_path, capsys):
    root, hf, model, data = setup
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps(ALWAYS) + "\n")
    assert _run("--model", model, "--problems", problems, "--samples", "3", "--out", tmp_path / "o") == 1
    assert "--samples=3" in capsys.readouterr().err
    assert _run("--model", model, "--data", tmp_path / "missing.json", "--out", tmp_path / "o") == 1
    assert "missing.json" in capsys.readouterr().err
    missing_model = tmp_path / "no-such-model"  # each error below comes before any loading
    for flags, message in [(["--problems", tmp_path / "none.jsonl"], "--problems="),
                           (["--problems", tmp_path], "--problems="),
                           (["--data", tmp_path], "not a directory"),
                           (["--problems", problems, "--exec-timeout-s", "inf"], "--exec-timeout-s=inf: expected a finite"),
                           (["--problems", problems, "--exec-timeout-s", "nan"], "--exec-timeout-s=nan"),
                           (["--device", "bogus"], "--device='bogus'"),
                           (["--temperature", "nan"], "--temperature=nan"),
                           (["--resume"], "--resume=True: expected a pass@k run")]:
        assert _run("--model", missing_model, "--out", tmp_path / "o2", *flags) == 1, flags
        assert message in capsys.readouterr().err, flags
    if not torch.cuda.is_available():
        assert _run("--model", missing_model, "--out", tmp_path / "o2", "--device", "cuda") == 1
        assert "sees no CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no abbreviations: --temp is not --temperature
        _run("--model", model, "--temp", "1.0")
    assert "unrecognized arguments: --temp" in capsys.readouterr().err


def test_demo_with_data_file_tiny(tmp_path, capsys):
    """`python -m minilora.demo --tiny --data FILE`: ROUGE-L on the file's held-out split, pass@1 on the embedded
    held-out tasks, before and after a few QLoRA steps."""
    from minilora import demo
    from minilora.tokenizer import load_tokenizer

    records = [{"instruction": f"Return {i} times x.", "input": "", "output": f"def g(x):\n    return {i} * x"}
               for i in range(80)]  # 4 held-out rows at TrainConfig's 5%
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "demo"
    assert demo.main(["--tiny", "--data", str(data), "--out", str(out), "--steps", "3", "--pretrain-steps", "3",
                      "--eval-tasks", "3", "--max-new-tokens", "6"]) == 0
    report = json.loads((out / "demo.json").read_text())
    assert report["train"]["steps"] == 3 and report["after"]["adapter"] == report["train"]["adapter"]
    assert report["before"]["rouge_rows"] == report["after"]["rouge_rows"] == 3 and report["before"]["adapter"] is None
    assert report["before"]["problems"] == 3 and not (out / "data").exists()
    # The ROUGE-L rows are the training run's test split, and the tokenizer never saw them.
    _, test = split_records(load_records(str(data)), test_fraction=0.05, seed=0)
    rows = [json.loads(line) for line in (out / "after" / "predictions.jsonl").open()]
    assert [r["instruction"] for r in rows if "row" in r] == [r["instruction"] for r in test if r["output"]][:3]
    assert len([r for r in rows if "task_id" in r]) == 3
    tok = load_tokenizer(str(out / "base"))
    assert tok.decode(tok.encode("def f(x):\n    return x")) == "def f(x):\n    return x"
    assert len(report["pretrain_losses"]) == 3
    assert "| + QLoRA adapter |" in capsys.readouterr().out
