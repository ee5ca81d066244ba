"""minilora.execution: verdicts for right, wrong, hanging, crashing, greedy and escaping samples, and pass@k.

The problems and completions are written here; every sample really runs in the sandbox's subprocess.
"""
import json
import os

import pytest

from minilora import execution as ex
from minilora.errors import DataError

LIMITS = ex.Limits(timeout_s=1.5, memory_mb=256, file_mb=1)

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


def test_memory_limit():
    result = run("    block = bytearray(1024 ** 3)\n    return a + b\n")  # 1 GiB > 256 MiB
    assert result.status == "crashed" and "MemoryError" in result.stderr_tail
    assert run("    block = bytearray(50 * 1024 ** 2)\n    return a + b\n").status == "passed"  # 50 MiB is fine


def test_file_size_limit():
    result = run("    open('big', 'wb').write(b'x' * (2 << 20))\n    return a + b\n")  # 2 MiB > file_mb=1
    assert result.status == "crashed" and "File too large" in result.stderr_tail


def test_network_is_refused():
    result = run("    import socket\n    socket.create_connection(('127.0.0.1', 9))\n    return a + b\n")
    assert result.status == "crashed" and "socket.__new__ is not allowed" in result.stderr_tail


def test_network_namespace_when_available():
    if not ex.sandbox_report()["network_namespace"]:
        pytest.skip("this kernel/user cannot unshare the network namespace")
    result = run("    import os\n    print(os.readlink('/proc/self/ns/net'))\n    return a + b\n")
    assert result.status == "passed" and result.stdout_tail.strip() not in ("", os.readlink("/proc/self/ns/net"))


def escapes(target):
    """Sample bodies that try to change `target` (outside the work dir) by different routes."""
    t = repr(str(target))
    return [
        f"    open({t}, 'w').write('x')\n",
        f"    import os\n    os.close(os.open({t}, os.O_WRONLY | os.O_CREAT))\n",
        f"    import pathlib\n    pathlib.Path({t}).write_text('x')\n",
        f"    import os\n    os.symlink({t}, 'link')\n    open('link', 'w').write('x')\n",
        f"    import shutil\n    shutil.copy('program.py', {t})\n",
        f"    import subprocess\n    subprocess.run(['touch', {t}])\n",
        f"    import os\n    os.system('touch ' + {t})\n",
    ]


def test_writes_outside_the_work_dir_fail(tmp_path):
    target = tmp_path / "escaped.txt"
    for body in escapes(target):
        result = run(body + "    return a + b\n")
        assert result.status == "crashed" and "sandbox:" in result.stderr_tail, (body, result)
        assert not target.exists(), body


def test_existing_files_outside_are_untouched(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    other = tmp_path / "dir"
    other.mkdir()
    v, o = repr(str(victim)), repr(str(other))
    for body in (f"    import os\n    os.remove({v})\n", f"    import os\n    os.rename({v}, 'stolen')\n",
                 f"    import os\n    os.chmod({v}, 0)\n", f"    import shutil\n    shutil.rmtree({o})\n",
                 f"    open({v}, 'a').write('!')\n", f"    import os\n    os.link({v}, 'hard')\n"):
        assert run(body + "    return a + b\n").status == "crashed", body
    assert victim.read_text() == "precious" and oct(victim.stat().st_mode & 0o777) != "0o0" and other.is_dir()


def test_work_dir_is_writable_and_removed():
    body = ("    import os, tempfile\n    open('scratch.txt', 'w').write('ok')\n"
            "    tempfile.NamedTemporaryFile().close()\n    print(os.getcwd())\n"
            "    return a + b if open('scratch.txt').read() == 'ok' else None\n")
    result = run(body)
    assert result.status == "passed", result
    work = result.stdout_tail.strip().splitlines()[0]
    assert os.path.basename(work) == "work" and not os.path.exists(work)


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


def test_processes_and_signals_are_refused():
    result = run("    import os, signal\n    os.kill(os.getpid(), signal.SIGTERM)\n")
    assert result.status == "crashed" and "os.kill is not allowed" in result.stderr_tail
    assert "os.fork is not allowed" in run("    import os\n    os.fork()\n").stderr_tail


def test_drops_root_to_nobody(tmp_path, monkeypatch):
    """As root, with an interpreter that `nobody` can run, the sample runs as nobody: even a write through
    ctypes (which the audit hook cannot see) into a root-owned directory fails."""
    system_python = "/usr/bin/python3"
    if os.geteuid() != 0 or not os.access(system_python, os.X_OK):
        pytest.skip("needs root and a system python3")
    monkeypatch.setattr(ex.sys, "executable", system_python)
    ex._probe.cache_clear()
    try:
        if ex.sandbox_report()["user"] != "nobody":
            pytest.skip("nobody cannot run the system python3 here")
        os.chmod(tmp_path, 0o755)
        target = tmp_path / "via_ctypes"
        body = (f"    import ctypes, os\n    fd = ctypes.CDLL(None).open({str(target).encode()!r}, os.O_WRONLY | os.O_CREAT, 0o644)\n"
                "    print(os.getuid(), fd)\n    return a + b\n")
        result = run(body)
        assert result.status == "passed" and set(result.stdout_tail.split("\n")) == {"65534 -1"}, result  # add() runs twice
        assert not target.exists()
    finally:
        ex._probe.cache_clear()
