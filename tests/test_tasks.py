"""The embedded task set (minilora/tasks): size, determinism, held-out separation, and every reference
solution passing its own tests through the project's pass@k runner."""
import json
import os

import pytest

from minilora import tasks
from minilora.data import load_records
from minilora.execution import evaluate_pass_at_k, load_problems
from minilora.tasks.__main__ import main as tasks_main
from minilora.tasks.families import FAMILIES


@pytest.fixture(scope="module")
def generated():
    return tasks.generate_tasks(0)


def test_size_and_families(generated):
    train, held_out = generated
    assert len(train) + len(held_out) >= 1000
    assert len({t["family"] for t in train}) == len(FAMILIES) >= 30
    assert {t["family"] for t in held_out} == {t["family"] for t in train}
    kinds = {f.kind for f in FAMILIES}
    assert kinds == {"number", "list", "string", "dict"}
    assert any(t["input"] for t in train) and any(not t["input"] for t in train)  # the input is optional


def test_deterministic_and_seeded():
    assert tasks.train_records(0) == tasks.train_records(0)
    assert tasks.held_out_problems(0) == tasks.held_out_problems(0)
    assert tasks.train_records(1) != tasks.train_records(0)


def test_held_out_names_and_constants_are_new(generated):
    train, held_out = generated
    train_names = {t["entry_point"] for t in train}
    assert not train_names & {t["entry_point"] for t in held_out}
    assert len({t["instruction"] for t in train}) == len(train)  # no duplicate rows
    for family in FAMILIES:
        trained = {t["constant"] for t in train if t["family"] == family.name}
        for t in held_out:
            if t["family"] == family.name and len(family.constants) > 1:
                assert t["constant"] not in trained, (family.name, t["constant"])


def test_layouts(generated):
    train, held_out = generated
    for t in train + held_out:
        assert t["output"].startswith(f"def {t['entry_point']}(")
        assert t["prompt"].startswith(f"def {t['entry_point']}(") and '"""' in t["prompt"]
        assert f"`{t['entry_point']}(" in t["instruction"]
        compile(t["prompt"] + "    pass\n", t["task_id"], "exec")
        compile(t["test"], t["task_id"], "exec")
    assert set(tasks.train_records(0)[0]) == {"instruction", "input", "output"}
    assert {"task_id", "prompt", "entry_point", "test", "instruction", "input"} <= set(tasks.held_out_problems(0)[0])


def test_every_reference_solution_passes(generated):
    """pass@1 = 1 for the reference solutions of all tasks, run by execution's sandbox like model output."""
    problems = [t for part in generated for t in part]
    results = evaluate_pass_at_k(problems, [[t["output"]] for t in problems], ks=(1,), workers=4)
    assert results["pass@1"] == 1.0


def test_wrong_solutions_fail(generated):
    """The tests tell families apart: each family's solution fails another family's tests (first task each)."""
    _, held_out = generated
    firsts = {}
    for t in held_out:
        firsts.setdefault(t["family"], t)
    problems = list(firsts.values())
    wrong = [[problems[(i + 1) % len(problems)]["output"].replace(problems[(i + 1) % len(problems)]["entry_point"],
                                                                   p["entry_point"], 1)]
             for i, p in enumerate(problems)]
    assert evaluate_pass_at_k(problems, wrong, ks=(1,), workers=4)["pass@1"] == 0.0


def test_command_writes_both_files(tmp_path, capsys):
    assert tasks_main(["--out", str(tmp_path / "tasks")]) == 0
    records = load_records(str(tmp_path / "tasks" / "train.json"))
    problems = load_problems(str(tmp_path / "tasks" / "held_out.jsonl"))
    assert records == tasks.train_records(0)
    assert problems == tasks.held_out_problems(0)
    printed = capsys.readouterr().out
    assert os.path.join(str(tmp_path / "tasks"), "train.json") in printed
    with open(tmp_path / "tasks" / "held_out.jsonl") as f:
        assert all(json.loads(line)["entry_point"] for line in f)
