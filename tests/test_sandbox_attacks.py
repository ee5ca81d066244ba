"""Adversarial samples against minilora.execution: escapes, wrong-pass tricks, bombs, attacks on the evaluator.

Each test runs real attacking code in the real sandbox and asserts the outcome: contained (nothing written
outside, no process left behind, the limit held), the right verdict, and the evaluator (this process, and a
bystander process it started) alive and untouched. Limits are small so that the whole file takes seconds.
Needs bubblewrap; CI installs it (.ci/run), elsewhere the tests skip with the reason.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from minilora import execution as ex
from minilora import sandbox

LIMITS = ex.Limits(timeout_s=4.0, memory_mb=300, file_mb=2, processes=16)
ADD = {"task_id": "t/add", "prompt": 'def add(a, b):\n    """Return a + b."""\n',
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
       "entry_point": "add"}
RIGHT = "    return a + b\n"

pytestmark = pytest.mark.skipif(
    not sandbox.sandbox_available() and os.environ.get("CI") != "true",
    reason=f"bubblewrap is not usable here ({sandbox.sandbox_status()[1]}); {sandbox.INSTALL_HINT}")


def run(completion, limits=LIMITS, problem=ADD):
    return ex.check_completion(problem, completion, limits)


def attack(code, answer=RIGHT):
    """A completion: the right function, then `code` at module level (it runs when the answer loads)."""
    return answer + "\n" + code


@pytest.fixture
def bystander():
    """A process of the evaluator's user, outside the sandbox: it must outlive every attack."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    assert proc.poll() is None, "a process outside the sandbox was killed"
    proc.kill()
    proc.wait()


def leftovers(marker):
    """Host processes whose command line contains `marker` (the sandbox must leave none)."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except (OSError, ValueError):
            pass
    return found


# ------------------------------------------------------------------------------- file-system escapes

def escape_attempts(target):
    """Module-level code that tries to create `target` by several routes, each guarded, then says how it went."""
    t = repr(str(target))
    d, name = repr(os.path.dirname(str(target))), repr(os.path.basename(str(target)))
    routes = {
        "open": f"open({t}, 'w').write('x')",
        "dir_fd": f"fd = os.open({d}, os.O_RDONLY); os.close(os.open({name}, os.O_WRONLY | os.O_CREAT, dir_fd=fd))",
        "mkfifo": f"os.mkfifo({t})",
        "sqlite3": f"import sqlite3; c = sqlite3.connect({t}); c.execute('create table t(x)'); c.commit()",
        "symlink": f"os.symlink({t}, 'link'); open('link', 'w').write('x')",
        "ctypes": f"import ctypes; assert ctypes.CDLL(None).open({str(target).encode()!r}, 0o101, 0o644) >= 0",
        "shell": f"import subprocess; subprocess.run(['/bin/sh', '-c', 'echo x > ' + {t}], check=True)",
        "mkdir": f"os.makedirs({t})",
    }
    lines = ["import os"]
    for route, code in routes.items():
        lines.append(f"try:\n    {code}\n    print('wrote via {route}')\nexcept BaseException as e:\n"
                     f"    print('refused {route}:', type(e).__name__)")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where", ["host_tmp", "python_prefix", "cwd_parent"])
def test_no_write_reaches_the_host(tmp_path, where):
    target = {"host_tmp": tmp_path / "escaped",
              "python_prefix": os.path.join(os.path.realpath(sys.base_prefix), "escaped-by-sample"),
              "cwd_parent": os.path.join(os.path.dirname(os.getcwd()), "escaped-by-sample")}[where]
    result = run(attack(escape_attempts(target)))
    assert result.status == "passed", result  # the sample is not punished: its writes just never leave the sandbox
    assert result.stdout_tail.count("via") + result.stdout_tail.count("refused") == 8, result.stdout_tail
    assert not os.path.lexists(target), f"{target} was created on the host"


def test_existing_host_files_are_invisible_and_untouched(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    v = repr(str(victim))
    code = (f"import os, shutil\nfor f in (lambda: os.remove({v}), lambda: os.chmod({v}, 0), lambda: shutil.rmtree({repr(str(tmp_path))}),\n"
            f"          lambda: open({v}, 'a').write('!'), lambda: print(open({v}).read())):\n"
            "    try:\n        f()\n    except OSError as e:\n        print(type(e).__name__)\n")
    result = run(attack(code))
    assert result.status == "passed" and "precious" not in result.stdout_tail, result
    assert victim.read_text() == "precious" and (victim.stat().st_mode & 0o777) != 0


def test_only_tmp_is_writable_and_it_is_private(tmp_path):
    code = ("import os\nfor p in ['/x', '/home/x', '/dev/x', '/dev/shm/x', '/usr/x', '/proc/x', '/tmp/x']:\n"
            "    try:\n        open(p, 'w').write('a')\n        print('ok', p)\n"
            "    except OSError as e:\n        print('no', p)\nprint('cwd', os.getcwd(), os.listdir('/tmp'))\n")
    result = run(attack(code))
    assert result.status == "passed", result
    assert [line.split()[1] for line in result.stdout_tail.splitlines() if line.startswith("ok")] == ["/tmp/x"]
    assert "cwd /tmp ['x']" in result.stdout_tail  # an empty tmpfs of its own: no other sample's files
    assert not os.path.exists("/tmp/x") or os.path.getmtime("/tmp/x") < time.time() - 60


def test_kernel_settings_are_out_of_reach():
    """/proc/sys is hidden (opened for writing only, never written: a failure here must not change the host)."""
    code = ("import os\nfor p in ['/proc/sys/vm/swappiness', '/proc/sys/kernel/panic', '/proc/sysrq-trigger', '/sys/kernel']:\n"
            "    try:\n        os.close(os.open(p, os.O_WRONLY))\n        print('open', p)\n"
            "    except OSError as e:\n        print('no', p)\n")
    result = run(attack(code))
    assert result.status == "passed" and "open" not in result.stdout_tail and result.stdout_tail.count("no ") == 4, result


def test_disk_fill_stops_at_the_tmpfs_size():
    code = ("written = 0\ntry:\n    with open('/tmp/fill', 'wb') as f:\n        while True:\n"
            "            f.write(b'x' * 65536); f.flush(); written += 65536\nexcept OSError as e:\n"
            "    print('stopped', written, e.errno)\n")
    result = run(attack(code))
    assert result.status == "passed", result
    written = int(result.stdout_tail.split("stopped")[1].split()[0])
    assert written <= LIMITS.file_mb << 20, written


def test_no_host_secret_files_are_visible():
    code = ("import os\nfor p in ['/etc/shadow', '/etc/passwd', '/root', '/home', os.path.expanduser('~root')]:\n"
            "    print(p, os.path.exists(p) and (os.listdir(p) if os.path.isdir(p) else 'file'))\n")
    result = run(attack(code))
    assert result.status == "passed", result
    for line in result.stdout_tail.splitlines():
        assert line.endswith(" False") or line.endswith("[]") or "pyenv" in line or line.endswith("['.pyenv']"), line


# ----------------------------------------------------------------------------- network, environment

def test_no_network():
    code = ("import socket\nfor addr in [('127.0.0.1', 9), ('1.1.1.1', 53)]:\n    try:\n"
            "        socket.create_connection(addr, timeout=1)\n        print('connected', addr)\n"
            "    except OSError as e:\n        print('refused', addr)\nimport os\nprint(os.listdir('/sys/class/net') if os.path.exists('/sys/class/net') else 'no sys')\n")
    result = run(attack(code))
    assert result.status == "passed" and "connected" not in result.stdout_tail, result


def test_evaluator_environment_is_unreadable(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_marker_123")
    code = ("import os, glob\nprint(dict(os.environ))\nfor p in glob.glob('/proc/*/environ'):\n"
            "    try:\n        print(p, open(p, 'rb').read())\n    except OSError as e:\n        print(p, e)\n"
            "print('ppid', os.getppid())\n")
    result = run(attack(code))
    assert result.status == "passed", result
    assert "hf_secret_marker_123" not in result.stdout_tail + result.stderr_tail
    assert "HF_TOKEN" not in result.stdout_tail and "ppid 1" in result.stdout_tail  # its parent is the namespace's init


# ------------------------------------------------------------------------------ attacks on the evaluator

def test_parent_kill_attempts_hit_nothing_outside(bystander):
    code = ("import os, signal\nfor name, f in [('pidfd', lambda: signal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)),\n"
            "                ('kill -1', lambda: os.kill(-1, 9)), ('kill 1', lambda: os.kill(1, 9)),\n"
            f"                ('evaluator', lambda: os.kill({os.getpid()}, 9)), ('bystander', lambda: os.kill({bystander.pid}, 9))]:\n"
            "    try:\n        f()\n        print('sent', name)\n    except OSError as e:\n        print('failed', name, type(e).__name__)\n")
    result = run(attack(code))
    assert result.status in ("passed", "failed", "crashed"), result  # kill -1 may take the sample down with it
    assert result.status != "sandbox-error"
    assert bystander.poll() is None  # and this test process is still here to check


def test_setsid_children_do_not_outlive_the_sample():
    marker = "31.4159"
    code = ("import os, _posixsubprocess, ctypes, subprocess\n"
            "r, w = os.pipe()\n"
            f"_posixsubprocess.fork_exec(['/bin/sh', '-c', 'sleep {marker}'], [b'/bin/sh'], True, (), None, None,"
            " -1, -1, -1, -1, -1, -1, r, w, True, True, 0, None, None, None, -1, None, False)\n"
            "pid = ctypes.CDLL(None).fork()\n"
            f"if pid == 0:\n    os.setsid()\n    os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
            f"subprocess.Popen(['sleep', '{marker}'], start_new_session=True)\nprint('spawned')\n")
    result = run(attack(code))
    assert result.status == "passed" and "spawned" in result.stdout_tail, result
    time.sleep(0.2)
    assert leftovers(marker) == [], "a process of the sample outlived it"


def test_infinite_loop_times_out_and_is_killed():
    marker = "27.1828"
    limits = ex.Limits(timeout_s=1.5, memory_mb=300, file_mb=2, processes=16)
    code = f"import subprocess\nsubprocess.Popen(['sleep', '{marker}'])\nwhile True:\n    pass\n"
    start = time.monotonic()
    result = run(attack(code), limits)
    assert result.status == "timeout" and time.monotonic() - start < limits.timeout_s + 2, result
    assert leftovers(marker) == []


def test_huge_output_is_cut_and_bounded():
    code = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"
    start = time.monotonic()
    result = run(attack(code))
    assert result.status in ("crashed", "failed"), result  # EPIPE once the evaluator stops reading
    assert len(result.stdout_tail) < 2100 and "cut" in result.stdout_tail
    assert time.monotonic() - start < LIMITS.timeout_s


# ------------------------------------------------------------------------------------------- bombs

def test_fork_bomb_is_capped_by_the_process_limit(bystander):
    code = ("import os, time\nmade = 0\nwhile True:\n    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
            "    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n    made += 1\n    if made > 2000:\n        break\n"
            "print('forked', made)\n")
    result = run(attack(code))
    assert result.status == "passed", result
    made = int(result.stdout_tail.split("forked")[1].split()[0])
    assert made + 1 <= LIMITS.processes, made  # the answer's own process counts too
    assert leftovers("import os, time") == []


def test_memory_bomb_across_processes_is_capped():
    if sandbox.cgroups() is None:
        pytest.skip(f"no cgroups here: {sandbox.rlimit_gap()}")
    code = ("import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        block = bytearray(200 << 20)\n"
            "        for i in range(0, len(block), 4096):\n            block[i] = 1\n"
            "        print('allocated', flush=True)\n        time.sleep(30)\n        os._exit(0)\ntime.sleep(2)\n")
    result = run(attack(code, RIGHT))
    assert result.stdout_tail.count("allocated") <= 1, result  # 3 x 200 MiB cannot fit 300 MiB together
    assert result.status != "sandbox-error"


def test_single_allocation_over_the_limit_is_a_crash():
    result = run("    block = bytearray(1024 ** 3)\n    return a + b\n")  # 1 GiB > 300 MiB
    assert result.status == "crashed" and "MemoryError" in result.stderr_tail, result
    assert run("    block = bytearray(50 * 1024 ** 2)\n    return a + b\n").status == "passed"


# -------------------------------------------------------------------------------- wrong-pass tricks

WRONG = "    return a - b\n"


@pytest.mark.parametrize("trick, verdict", [
    # the answer's frames hold no secret any more; it leaves before its tests
    ("import sys\nf = sys._getframe()\nwhile f:\n    print(sorted(f.f_locals)[:20])\n    f = f.f_back\nimport os\nos._exit(0)\n",
     "failed"),
    ("import sys\nsys.exit(0)\n", "failed"),
    ("import os\nos._exit(0)\n", "failed"),
    # swap the test's `check` for a no-op through a trace function
    ("import sys\ndef tracer(frame, event, arg):\n    if frame.f_code.co_name == 'check':\n"
     "        frame.f_globals['check'] = lambda candidate: None\n    return tracer\nsys.settrace(tracer)\n", "failed"),
    # a trailing decorator meant to swallow the test's `def check`
    ("@lambda f: (lambda candidate: None)\n", "crashed"),
    # a reassigned AssertionError, so that a failed assert looks like something else
    ("import builtins\nclass Nope(BaseException):\n    pass\nbuiltins.AssertionError = Nope\n", "failed"),
])
def test_tricks_do_not_pass(trick, verdict):
    result = run(attack(trick, WRONG))
    assert result.status == verdict, result


def test_always_equal_return_value_does_not_pass():
    code = ("    class Anything:\n        def __eq__(self, other):\n            return True\n"
            "    return Anything()\n")
    result = run(code)
    assert result.status == "crashed" and "cannot cross" in result.stderr_tail, result
    sub = "    class Five(int):\n        def __eq__(self, other):\n            return True\n    return Five(7)\n"
    assert run(sub).status == "failed"  # an int subclass crosses as the plain int it is


def test_exit_inside_the_function_is_a_failure():
    result = run("    import sys\n    sys.exit(0)\n")
    assert result.status == "failed" and "exit(0)" in result.stderr_tail, result


def test_a_killed_answer_is_a_crash():
    result = run("    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    assert result.status == "crashed" and "SIGKILL" in result.stderr_tail, result


def test_sandbox_that_cannot_start_is_reported(monkeypatch):
    monkeypatch.setattr(sandbox, "filesystem_args", lambda: ["--ro-bind", "/nonexistent-minilora", "/x"])
    result = run(RIGHT)
    assert result.status == "sandbox-error" and "nonexistent-minilora" in result.stderr_tail, result


def test_as_root_the_sample_is_nobody_outside(monkeypatch):
    """Run as root with an interpreter that nobody can read, bwrap itself starts as nobody: a sample's
    processes are uid 65534 on the host, not root (root-mapped, it would pass root's permission checks)."""
    import threading

    if os.geteuid() != 0 or subprocess.run(["/usr/bin/python3", "-c", "import json, resource, site, traceback"],
                                            capture_output=True).returncode != 0 if os.path.exists("/usr/bin/python3") else True:
        pytest.skip("needs root and a system-wide /usr/bin/python3 with its standard library")
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3")
    monkeypatch.setattr(sandbox, "_python_trees", lambda: [])  # /usr is bound anyway
    for cached in (sandbox.sandbox_user, sandbox.sandbox_status):
        cached.cache_clear()
    marker, uids = "41.4142", set()

    def watch():
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not uids:
            for pid in leftovers(marker):
                try:
                    with open(f"/proc/{pid}/status") as f:
                        uids.add(next(int(line.split()[1]) for line in f if line.startswith("Uid:")))
                except (OSError, StopIteration):
                    pass
            time.sleep(0.02)

    try:
        assert sandbox.sandbox_user() == (65534, 65534)
        watcher = threading.Thread(target=watch)
        watcher.start()
        result = run(attack(f"import subprocess, time\nsubprocess.Popen(['sleep', '{marker}'])\ntime.sleep(1)\n"))
        watcher.join()
        assert result.status == "passed", result
        assert uids == {65534}, uids
    finally:
        for cached in (sandbox.sandbox_user, sandbox.sandbox_status):
            cached.cache_clear()


def test_an_evaluator_in_a_virtual_environment_under_tmp(tmp_path):
    """The usual set-up: minilora installed in a venv, here under /tmp, where the sandbox mounts its own tmpfs.
    Samples run on the venv's base interpreter, so they still start, pass and fail as they should."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = ("import sys; sys.path.insert(0, sys.argv[1])\n"
              "from minilora.execution import check_completions\n"
              f"p = {ADD!r}\n"
              "print([r[0].status for r in check_completions([p, p], [['    return a + b\\n'], ['    return a - b\\n']])])\n")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", script, repo], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['passed', 'failed']", out.stdout + out.stderr[-2000:]
