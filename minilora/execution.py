"""Execution-based checking of generated code (pass@k) for HumanEval- and MBPP-layout problems.

Layouts, one JSON object per problem (task_id optional in both):
  HumanEval  prompt, test, entry_point. The completion continues `prompt` (a function body, or a whole new
             definition, which then replaces the prompt's stub). Program: prompt + completion + test +
             `check(entry_point)`, as openai/human-eval builds it.
  MBPP       text, test_list, test_setup_code (optional). The completion is the whole code. Program:
             setup + completion + the asserts of test_list, as in the MBPP paper (Austin et al. 2021).

Each sample runs as `python -I -B run.py` in its own subprocess (no shell). `run.py` is the small runner
below: it reads `program.py`, installs the guard, and runs it; the parent process never evaluates sample
text. Verdicts, each with the tail of stderr:
  passed   the program ran to its end: the runner then prints a per-run secret, so an early `exit(0)`
           cannot pass
  failed   an AssertionError (a wrong answer), or the program exited before its tests finished
  timeout  the wall-clock timeout or the CPU-time limit
  crashed  any other exception (NameError, MemoryError, SyntaxError, the guard's PermissionError ...) or
           death by a signal (segfault, abort)

What is enforced:
  - time: wall-clock timeout, then SIGKILL to the whole process group; RLIMIT_CPU as a backstop.
  - memory RLIMIT_AS; file size RLIMIT_FSIZE (also caps stdout/stderr, which go to files); no core dumps.
  - a fresh temporary working directory (also HOME and TMPDIR), deleted afterwards; a minimal environment.
  - network: a new, empty network namespace (unshare(CLONE_NEWNET)) where the kernel allows it (root or
    CAP_SYS_ADMIN); always, the guard refuses to create sockets.
  - files: the guard is an audit hook (PEP 578; it cannot be removed once added). It refuses opening for
    writing, removing, renaming, linking, mkdir, chmod/chown/utime/truncate of any path outside the work
    dir (symlinks resolved), and starting processes (subprocess, os.system, exec, fork, posix_spawn, kill).
  - user: run as root, the child drops to `nobody` when that user can run this interpreter (probed once);
    otherwise it stays root and only the guard protects the file system.
Not enforced: the guard is Python-level; code calling C directly (ctypes, C extensions) gets around it, and
then only the namespace, the limits and the uid hold. This keeps careless model output from doing harm;
it is not a jail for hostile code (run that in a throwaway VM or container as well). `sandbox_report()`
says which layers are active here.
"""
import ctypes
import functools
import os
import pwd
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .data import read_json_rows
from .errors import DataError
from .metrics import pass_at_k

CLONE_NEWNET = 0x40000000  # <sched.h>
_TAIL = 2000  # characters of stderr kept per sample

_RUNNER = r'''
import os, sys, traceback

def _main():
    secret = sys.stdin.readline().strip()
    sys.stdin.close()
    work = os.path.realpath(os.getcwd())
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    write, exit_now, realpath = os.write, os._exit, os.path.realpath
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    # audit event -> (index of a path it changes, index of that path's dir_fd or None), ...
    changes = {"os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.symlink": ((1, 2),),
               "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)), "os.chmod": ((0, 2),),
               "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.truncate": ((0, None),),
               "os.setxattr": ((0, None),), "os.removexattr": ((0, None),)}
    blocked = {"socket.__new__", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
               "os.fork", "os.forkpty", "os.kill", "os.killpg"}

    def inside(path, dir_fd):
        if isinstance(path, int):  # an fd the program already holds
            return True
        path = os.fsdecode(path)
        if dir_fd not in (None, -1) and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        path = realpath(path)
        return path == work or path.startswith(work + os.sep)

    def guard(event, args):
        if event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & write_flags)
            if writes and not inside(path, None):
                raise PermissionError(f"sandbox: writing outside the work dir is not allowed: {path!r}")
        for path_at, fd_at in changes.get(event, ()):
            if not inside(args[path_at], None if fd_at is None else args[fd_at]):
                raise PermissionError(f"sandbox: {event} outside the work dir is not allowed: {args[path_at]!r}")

    def flush():
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except BaseException:
                pass

    sys.addaudithook(guard)
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__sample__"})
    except AssertionError:
        traceback.print_exc()
        flush()
        exit_now(2)
    except SystemExit as e:
        print(f"the sample called exit({e.code!r}) before its tests finished", file=sys.stderr)
        flush()
        exit_now(4)
    except BaseException:
        traceback.print_exc()
        flush()
        exit_now(3)
    flush()
    write(1, ("\nminilora-done-" + secret + "\n").encode())
    exit_now(0)

_main()
'''


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0   # wall clock per sample
    memory_mb: int = 1024    # RLIMIT_AS
    file_mb: int = 16        # RLIMIT_FSIZE: any file the sample writes, and its stdout/stderr


@dataclass
class ExecResult:
    status: str         # "passed" | "failed" | "timeout" | "crashed"
    returncode: int
    stderr_tail: str
    stdout_tail: str
    seconds: float

    @property
    def passed(self):
        return self.status == "passed"


# ------------------------------------------------------------------------------------------ problems

def problem_layout(problem):
    """"humaneval" or "mbpp" from the keys; DataError for anything else."""
    if all(k in problem for k in ("prompt", "test", "entry_point")):
        return "humaneval"
    if "text" in problem and "test_list" in problem:
        return "mbpp"
    raise DataError(f"problem {problem.get('task_id', '?')!r} has keys {sorted(problem)}: expected the HumanEval "
                    "layout (prompt, test, entry_point) or the MBPP layout (text, test_list, test_setup_code).")


def _problem_issue(problem):
    """Why `problem` cannot be run, or None."""
    if not isinstance(problem, dict):
        return f"expected a JSON object, found {type(problem).__name__}"
    try:
        layout = problem_layout(problem)
    except DataError as e:
        return str(e)
    if layout == "humaneval":
        for k in ("prompt", "test", "entry_point"):
            if not isinstance(problem[k], str):
                return f"{k!r} is {type(problem[k]).__name__}, expected a string"
        if not problem["entry_point"].isidentifier():  # it is pasted into `check(...)`
            return f"entry_point {problem['entry_point']!r} is not a Python identifier"
    else:
        if not isinstance(problem["text"], str) or not isinstance(problem.get("test_setup_code", ""), str):
            return "'text' and 'test_setup_code' must be strings"
        if not isinstance(problem["test_list"], list) or not all(isinstance(t, str) for t in problem["test_list"]):
            return "'test_list' must be a list of strings"
    return None


def load_problems(path):
    """Problems from a JSONL (or JSON list) file; DataError naming the line of every bad one (first few)."""
    rows, bad = read_json_rows(path)
    problems = []
    for where, row in rows:
        issue = _problem_issue(row)
        if issue:
            bad.append((where, issue))
        else:
            problems.append(row)
    if bad:
        listed = "; ".join(f"{where}: {why}" for where, why in bad[:5])
        raise DataError(f"{path}: {len(bad)} bad problems: {listed}. Fix the file.")
    if not problems:
        raise DataError(f"{path}: no problems in the file.")
    return problems


def problem_prompt(problem):
    """What the model is asked: HumanEval's prompt, or MBPP's text and tests in the MBPP paper's wording."""
    if problem_layout(problem) == "humaneval":
        return problem["prompt"]
    tests = "\n".join(problem["test_list"])
    return f"You are an expert Python programmer, and here is your task: {problem['text']} " \
           f"Your code should pass these tests:\n\n{tests}\n"


def build_program(problem, completion):
    """The text of the program that checks `completion` (module docstring)."""
    if problem_layout(problem) == "humaneval":
        return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
    tests = "\n".join(problem["test_list"])
    return f"{problem.get('test_setup_code', '')}\n{completion}\n\n{tests}\n"


# ------------------------------------------------------------------------------------------- sandbox

@functools.lru_cache(maxsize=None)
def _unshare():
    """libc's unshare(2), or None off Linux/glibc."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).unshare
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    return fn


def _capped(limit, value):
    """(value, value) lowered to the current hard limit: raising a hard limit would fail in the child."""
    hard = resource.getrlimit(limit)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    return value, value


def _preexec(limits, user):
    """The function the child runs between fork and exec: network namespace, limits, then the uid."""
    unshare = _unshare()
    cpu = int(limits.timeout_s) + 1
    caps = [(resource.RLIMIT_AS, _capped(resource.RLIMIT_AS, limits.memory_mb << 20)),
            (resource.RLIMIT_CPU, _capped(resource.RLIMIT_CPU, cpu)),
            (resource.RLIMIT_FSIZE, _capped(resource.RLIMIT_FSIZE, limits.file_mb << 20)),
            (resource.RLIMIT_CORE, (0, 0))]

    def setup():
        if unshare is not None:
            unshare(CLONE_NEWNET)  # fails without CAP_SYS_ADMIN: then only the audit hook stops sockets
        for which, value in caps:
            resource.setrlimit(which, value)
        if user is not None:  # last: dropping root first would forbid the unshare
            os.setgroups([])
            os.setgid(user[1])
            os.setuid(user[0])
    return setup


def _nobody():
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


@functools.lru_cache(maxsize=None)
def _probe():
    """(user to drop to or None, whether the child gets its own network namespace), tried once."""
    here = os.readlink("/proc/self/ns/net") if os.path.exists("/proc/self/ns/net") else None
    script = "import os; print(os.readlink('/proc/self/ns/net') if os.path.exists('/proc/self/ns/net') else '')"
    nobody = _nobody() if os.geteuid() == 0 else None
    for user in ([nobody] if nobody else []) + [None]:
        try:  # nobody may be unable to run this interpreter (e.g. one under /root): then stay as we are
            out = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=30,
                                 preexec_fn=_preexec(Limits(), user), cwd="/", env={"PATH": os.defpath})
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0:
            return user, bool(here) and out.stdout.strip() not in ("", here)
    return None, False


def sandbox_report():
    """Which protections are active on this machine (for the evaluation summary)."""
    user, netns = _probe()
    return {"network_namespace": netns, "audit_hook": True, "rlimits": ["AS", "CPU", "FSIZE", "CORE"],
            "user": "nobody" if user is not None else pwd.getpwuid(os.geteuid()).pw_name}


def _tail(path, n):
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4 * n))
        return f.read().decode("utf-8", errors="replace")[-n:]


def run_program(program, limits=Limits()):
    """Run `program` (Python source) in the sandbox; an ExecResult."""
    user, _ = _probe()
    root = tempfile.mkdtemp(prefix="minilora-exec-")
    work = os.path.join(root, "work")  # stdout/stderr live beside it, out of the sample's reach
    try:
        os.mkdir(work)
        for name, text in (("program.py", program), ("run.py", _RUNNER)):
            with open(os.path.join(work, name), "w", encoding="utf-8") as f:
                f.write(text)
        if user is not None:
            os.chmod(root, 0o711)
            for path in (work, os.path.join(work, "program.py"), os.path.join(work, "run.py")):
                os.chown(path, *user)
        secret = secrets.token_hex(16)
        # one BLAS thread: each thread's stack counts against RLIMIT_AS, so `import numpy` on a many-core box could fail
        env = {"PATH": os.defpath, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-B", os.path.join(work, "run.py")], cwd=work, env=env,
                                    stdin=subprocess.PIPE, stdout=out, stderr=err, bufsize=0, start_new_session=True,
                                    preexec_fn=_preexec(limits, user))
            try:
                proc.stdin.write(f"{secret}\n".encode())  # unbuffered, a few bytes: never blocks on the pipe
            except BrokenPipeError:
                pass
            proc.stdin.close()
            try:
                proc.wait(timeout=limits.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            try:  # the sample's group: also anything it left running
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            rc = proc.wait()
        seconds = time.monotonic() - start
        stdout, stderr = _tail(out_path, _TAIL + 64), _tail(err_path, _TAIL)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    marker = f"minilora-done-{secret}"
    if timed_out or rc == -signal.SIGXCPU:
        status = "timeout"
    elif rc == 0 and marker in stdout:
        status = "passed"
    elif rc in (0, 2, 4):  # exit before the end, an assertion, exit()
        status = "failed"
    else:
        status = "crashed"
    if rc < 0 and not timed_out:
        stderr += f"\n[killed by {signal.Signals(-rc).name}]"
    elif rc == 0 and status == "failed":
        stderr += "\n[exited with status 0 before its tests finished]"
    return ExecResult(status, rc, stderr[-_TAIL:], stdout.replace(marker, "").rstrip("\n")[-_TAIL:], seconds)


def check_completion(problem, completion, limits=Limits()):
    """Run one completion of one problem against the problem's tests."""
    return run_program(build_program(problem, completion), limits)


# ------------------------------------------------------------------------------------------- pass@k

def check_completions(problems, completions, limits=Limits(), workers=1):
    """ExecResults, completions[i][j] -> result[i][j]; `workers` samples run at the same time."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but completions for {len(completions)}.")
    for problem in problems:
        issue = _problem_issue(problem)
        if issue:
            raise DataError(f"problem {problem.get('task_id', '?') if isinstance(problem, dict) else '?'!r}: {issue}.")
    jobs = [(i, j) for i, samples in enumerate(completions) for j in range(len(samples))]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        done = list(pool.map(lambda ij: check_completion(problems[ij[0]], completions[ij[0]][ij[1]], limits), jobs))
    results = [[None] * len(samples) for samples in completions]
    for (i, j), result in zip(jobs, done):
        results[i][j] = result
    return results


def pass_at_k_scores(results, ks=(1,)):
    """{"pass@k": mean over problems of the unbiased estimate}; every problem needs at least k samples."""
    scores = {}
    for k in ks:
        per_problem = []
        for i, samples in enumerate(results):
            if len(samples) < k:
                raise ValueError(f"pass@{k} needs at least {k} samples per problem; problem {i} has {len(samples)}.")
            per_problem.append(pass_at_k(len(samples), sum(r.passed for r in samples), k))
        scores[f"pass@{k}"] = sum(per_problem) / len(per_problem)
    return scores


def evaluate_pass_at_k(problems, completions, ks=(1,), limits=Limits(), workers=1):
    """Run every completion of every problem and return {"pass@k": ...} for each k in `ks`."""
    return pass_at_k_scores(check_completions(problems, completions, limits, workers), ks)
