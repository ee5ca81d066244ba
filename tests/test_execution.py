"""minilora.execution: verdicts for right, wrong, hanging, crashing, greedy and escaping samples, and pass@k.

The problems and completions are written here; every sample really runs in the sandbox (bubblewrap). The
attacks (escapes, tricks, bombs) are in test_sandbox_attacks.py.
"""
import json
import os

import pytest

from minilora import execution as ex
from minilora.errors import DataError

LIMITS = ex.Limits(timeout_s=3.0, memory_mb=256, file_mb=1)
pytestmark = pytest.mark.skipif(
    not ex.sandbox_available() and os.environ.get("CI") != "true",
    reason=f"bubblewrap is not usable here ({ex.sandbox_status()[1]}); install it: apt-get install -y bubblewrap")

ADD = {"task_id": "t/add", "prompt": 'def add(a, b):\n    """Return a + b."""\n',
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
       "entry_point": "add"}
SQUARE = {"task_id": 2, "text": "Write a function to square a number.", "test_setup_code": "import math",
          "test_list": ["assert square(3) == 9", "assert square(-2) == 4"]}
RIGHT, WRONG = "    return a + b\n", "    return a - b\n"


def run(completion, problem=ADD, limits=LIMITS):
    return ex.check_completion(problem, completion, limits)


def test_program_text_of_both_layouts():
    assert ex.build_program(ADD, RIGHT) == (
        'def add(a, b):\n    """Return a + b."""\n    return a + b\n\n\n'
        "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n\n\ncheck(add)\n")
    assert ex.build_program(SQUARE, "def square(x):\n    return x * x") == (
        "import math\ndef square(x):\n    return x * x\n\nassert square(3) == 9\nassert square(-2) == 4\n")
    assert ex.problem_prompt(ADD) == ADD["prompt"]
    assert ex.problem_prompt(SQUARE) == (
        "You are an expert Python programmer, and here is your task: Write a function to square a number. "
        "Your code should pass these tests:\n\nassert square(3) == 9\nassert square(-2) == 4\n")


def test_right_and_wrong_answers():
    assert run(RIGHT).status == "passed"
    assert run("def add(a, b):\n    return b + a\n").status == "passed"  # a whole new definition also works
    wrong = run(WRONG)
    assert wrong.status == "failed" and "AssertionError" in wrong.stderr_tail
    assert run("def square(x):\n    return x * x\n", SQUARE).status == "passed"
    assert run("def square(x):\n    return x + x\n", SQUARE).status == "failed"


def test_early_exit_cannot_pass():
    for tail in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"):
        result = run(RIGHT + tail)  # module-level exit before check(add) runs
        assert result.status == "failed", result
        assert "before its tests finished" in result.stderr_tail


def test_hang_times_out():
    result = run("    while True:\n        pass\n")
    assert result.status == "timeout" and result.seconds < LIMITS.timeout_s + 1.0


@pytest.mark.parametrize("completion, why", [
    ("    raise ValueError('boom')\n", "ValueError: boom"),
    ("    import ctypes\n    return ctypes.string_at(0)\n", "SIGSEGV"),
    ("    import os\n    os.abort()\n", "SIGABRT"),
    ("    return a +\n", "SyntaxError"),
])
def test_crashes(completion, why):
    result = run(completion)
    assert result.status == "crashed" and why in result.stderr_tail, result


def test_file_size_limit():
    result = run("    open('big', 'wb').write(b'x' * (2 << 20))\n    return a + b\n")  # 2 MiB > file_mb=1
    assert result.status == "crashed" and ("File too large" in result.stderr_tail or "No space" in result.stderr_tail)


def test_values_cross_as_plain_data():
    """Tuples stay tuples, dict keys of any plain type survive, floats are exact: honest answers still pass."""
    problem = {"prompt": "def f(x):\n", "entry_point": "f",
               "test": "def check(c):\n    assert c((1, 2)) == ((1, 2), {(1, 'a'): {1.5, 2}}, b'\\x00', 0.1 + 0.2, 2 ** 70, None)\n"
                       "    assert type(c((1, 2))[0]) is tuple and c([3]) != ((3,),)\n"}
    code = "    return (tuple(x), {(1, 'a'): {1.5, 2}}, b'\\x00', 0.1 + 0.2, 2 ** 70, None)\n"
    assert run(code, problem).status == "passed"


def test_prompt_helpers_are_the_problems_not_the_answers():
    """HumanEval/32-style: the test uses a helper from the prompt; an answer that redefines it cannot pass."""
    problem = {"prompt": "def poly(x):\n    return x * x - 4\n\ndef root():\n", "entry_point": "root",
               "test": "def check(c):\n    assert abs(poly(c())) < 1e-9\n"}
    assert run("    return 2.0\n", problem).status == "passed"
    assert run("    return 3.0\ndef poly(x):\n    return 0\n", problem).status == "failed"


def test_mbpp_names_come_from_the_answer():
    assert run("def square(x):\n    return x * x\nhelper = lambda: 1\n", SQUARE).status == "passed"
    result = run("def cube(x):\n    return x ** 3\n", SQUARE)
    assert result.status == "crashed" and "NameError" in result.stderr_tail


def test_refused_without_bubblewrap_unless_allowed(monkeypatch):
    monkeypatch.setattr(ex, "sandbox_status", lambda: (False, "bubblewrap (`bwrap`) is not installed"))
    with pytest.raises(ex.SandboxError, match="apt-get install -y bubblewrap"):
        ex.check_completion(ADD, RIGHT, LIMITS)
    with pytest.warns(RuntimeWarning, match="WITHOUT A SANDBOX"):
        results = ex.check_completions([ADD], [[RIGHT, WRONG, RIGHT + "import sys\nsys.exit(0)\n"]], LIMITS,
                                       allow_unsandboxed=True)
    assert [r.status for r in results[0]] == ["passed", "failed", "failed"]  # verdicts stay honest


def test_load_problems(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(ADD) + "\n" + json.dumps(SQUARE) + "\n")
    assert ex.load_problems(str(path)) == [ADD, SQUARE]
    path.write_text(json.dumps(ADD) + "\n" + json.dumps({**ADD, "entry_point": "add); import os; (x"}) + "\n"
                    + json.dumps({"text": "x", "test_list": "assert 1"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError) as e:
        ex.load_problems(str(path))
    msg = str(e.value)
    assert "3 bad problems" in msg and "line 2: entry_point" in msg and "line 3: 'test_list' must be" in msg
    assert "line 4: problem '?' has keys ['prompt']" in msg


def test_pass_at_k_end_to_end():
    problems = [ADD, SQUARE]
    completions = [[RIGHT, WRONG, "    raise SystemExit(0)\n"],
                   ["def square(x):\n    return x * x\n", "def square(x):\n    return x ** 2\n", "def square(x):\n    return x\n"]]
    results = ex.check_completions(problems, completions, LIMITS, workers=2)
    assert [[r.status for r in row] for row in results] == [["passed", "failed", "failed"], ["passed", "passed", "failed"]]
    # ADD: n=3, c=1 -> pass@1 = 1/3, pass@2 = 1 - C(2,2)/C(3,2) = 2/3.  SQUARE: c=2 -> 2/3 and 1.
    scores = ex.pass_at_k_scores(results, ks=(1, 2, 3))
    assert scores == pytest.approx({"pass@1": 0.5, "pass@2": 5 / 6, "pass@3": 1.0})
    with pytest.raises(ValueError, match="pass@4 needs at least 4 samples"):
        ex.pass_at_k_scores(results, ks=(4,))
    assert ex.evaluate_pass_at_k([ADD], [[WRONG]], ks=(1,), limits=LIMITS) == {"pass@1": 0.0}
