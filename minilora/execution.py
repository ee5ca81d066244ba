"""Execution-based checking of generated code (pass@k) for HumanEval- and MBPP-layout problems.

Layouts, one JSON object per problem (task_id optional in both):
  HumanEval  prompt, test, entry_point. The completion continues `prompt` (a function body, or a whole new
             definition, which then replaces the prompt's stub); `test` defines `check(candidate)`.
  MBPP       text, test_list, test_setup_code (optional). The completion is the whole code; `test_list`
             holds asserts that call its functions by name (MBPP paper, Austin et al. 2021).

How a sample runs (exec_runners.py has the two programs, sandbox.py the isolation):
  - the answer (HumanEval: prompt + completion; MBPP: setup + completion) runs in one sandboxed process;
  - the tests run in another sandboxed process, a fresh interpreter that never sees the answer's code: the
    prompt's own helpers and the test code are the problem's, and the answer's functions are stand-ins that
    call the answer's process over a pipe, with arguments and results crossing as plain values (None, bool,
    int, float, complex, str, bytes and lists, tuples, dicts, sets of them);
  - both sandboxes are killed, with everything they started, at the wall-clock timeout or when the tests end.
So nothing the answer does to its own interpreter (exiting early, reading frames, `sys.settrace`, rebinding
builtins, a trailing decorator, returning an object whose `__eq__` is always true) changes the tests' verdict.

Verdicts (`ExecResult.status`):
  passed         the tests ran to their end
  failed         an AssertionError in the tests (a wrong answer), or the answer exited (`exit()`,
                 `os._exit`) before its tests finished
  timeout        the wall-clock limit
  crashed        any other exception, in the tests or raised by the answer (NameError, MemoryError,
                 SyntaxError, a value that cannot cross), or death by a signal or the memory limit
  sandbox-error  the sandbox itself did not start (the message says why); not the answer's fault

What this cannot catch (docs/reliability.md has the threat model):
  - an answer that returns the right values for the tested inputs without computing the function (a
    table of the public tests' answers), or that behaves differently when it is being tested;
  - effects other than return values: tests that check printed output, an argument changed in place, or
    state kept between calls of different functions see only what crosses the pipe (arguments are copies);
  - tests that pass objects other than plain values (functions, instances of classes the answer defines,
    MBPP's few class problems): the crossing fails, and the sample comes out "crashed". Such problems need
    the answer and the test in one interpreter, which is exactly what lets an answer fool its test; they
    are not supported rather than scored dishonestly.

Without bubblewrap, samples are refused (SandboxError saying how to install it) unless the caller passes
`allow_unsandboxed=True` (`evaluate.py --unsafe-no-sandbox`): then both processes run directly, with
rlimits only, and the answer can read, write and signal whatever the evaluator's user can.
"""
import json
import logging
import os
import select
import selectors
import signal
import sys
import time
import warnings
from dataclasses import dataclass

from .data import read_json_rows
from .errors import DataError, SandboxError
from .exec_runners import ANSWER, TESTS
from .metrics import pass_at_k
from .sandbox import (INSTALL_HINT, Limits, SandboxedProcess, cgroups, interpreter, rlimit_gap, sandbox_available,
                      sandbox_status, sandbox_user)

log = logging.getLogger(__name__)

__all__ = ["ExecResult", "Limits", "SandboxError", "load_problems", "check_completion", "check_completions",
           "run_samples", "evaluate_pass_at_k", "use_sandbox", "pass_at_k_scores", "sandbox_available", "sandbox_report"]

_FDS = ("requests", "replies", "result")  # the pipe ends a runner's config names, passed to its process
_TAIL = 2000  # characters of stderr/stdout kept per sample
STATUSES = ("passed", "failed", "timeout", "crashed", "sandbox-error")
UNSANDBOXED_WARNING = ("RUNNING MODEL-WRITTEN CODE WITHOUT A SANDBOX: bubblewrap is not available ({why}), and "
                       "the caller allowed running unsandboxed. The code can read, change and delete whatever "
                       "this user can, use the network and signal this process.")


@dataclass
class ExecResult:
    status: str         # one of STATUSES
    returncode: int     # the answer process's own exit status (negative: killed by that signal); None if it was
                        # still running when the tests ended or the time ran out (then the evaluator ended it)
    stderr_tail: str    # the answer's stderr, then the tests' traceback or the reason for the verdict
    stdout_tail: str    # the answer's stdout
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


def answer_program(problem, completion):
    """The text the answer's process runs (module docstring)."""
    if problem_layout(problem) == "humaneval":
        return f"{problem['prompt']}{completion}\n"
    return f"{problem.get('test_setup_code', '')}\n{completion}\n"


def test_spec(problem):
    """What the tests' process runs, as plain data."""
    if problem_layout(problem) == "humaneval":
        return {"layout": "humaneval", "prompt": problem["prompt"], "test": problem["test"],
                "entry_point": problem["entry_point"]}
    return {"layout": "mbpp", "setup": problem.get("test_setup_code", ""), "test": "\n".join(problem["test_list"])}


# ------------------------------------------------------------------------------------------- running

def use_sandbox(allow_unsandboxed=False):
    """True to run under bwrap; False (with a loud warning) only when opted out and bwrap is unavailable."""
    ok, why = sandbox_status()
    if ok:
        return True
    if not allow_unsandboxed:
        raise SandboxError(f"refusing to run model-written code without a sandbox: {why}. To fix it, {INSTALL_HINT}. "
                           "To run it unsandboxed anyway (only in a throwaway VM or container), pass "
                           "--unsafe-no-sandbox (evaluate.py) or allow_unsandboxed=True (Python).")
    message = UNSANDBOXED_WARNING.format(why=why)
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return False


class _Output:
    """The tail of one pipe; past `cap` bytes the pipe is closed, so the writer gets EPIPE."""

    def __init__(self, fd, cap):
        self.fd, self.cap, self.total, self.text, self.cut = fd, cap, 0, b"", False

    def read(self):
        """False at EOF (or when cut)."""
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return True
        self.total += len(chunk)
        self.text = (self.text + chunk)[-4 * _TAIL:]
        if self.total > self.cap:
            self.cut = True
            return False
        return bool(chunk)

    def value(self):
        text = self.text.decode("utf-8", errors="replace")[-_TAIL:]
        return text + (f"\n[output over {self.cap >> 20} MiB: cut]" if self.cut else "")


class _Sample:
    """One sample in flight: the answer's and the tests' sandboxes, their pipes, and the deadline."""

    def __init__(self, key, problem, completion, limits, sandboxed):
        self.key, self.limits, self.sandboxed, self.start = key, limits, sandboxed, time.monotonic()
        self.deadline = self.start + limits.timeout_s
        self.processes, self.outputs, self.writes, self.result = [], {}, {}, b""
        self.cut_outputs = []  # (name, _Output) of pipes closed at the output cap
        child_limits = {"memory": limits.memory_mb << 20, "file": limits.file_mb << 20,
                        "cpu": int(limits.timeout_s) + 1, "processes": limits.processes if sandboxed else 0}
        requests_r, requests_w = os.pipe()
        replies_r, replies_w = os.pipe()
        result_r, result_w = os.pipe()
        ends = [requests_r, requests_w, replies_r, replies_w, result_w]
        try:
            answer = {"requests": requests_r, "replies": replies_w, "limits": child_limits}
            self.answer = self._start(ANSWER, answer, answer_program(problem, completion), ("stdout", "stderr"))
            tests = {"requests": requests_w, "replies": replies_r, "result": result_w, "limits": child_limits,
                     "max_reply_chars": min(32 << 20, (limits.memory_mb << 20) // 8)}
            self.tests = self._start(TESTS, tests, json.dumps(test_spec(problem)), ("tests",))
        except BaseException:
            os.close(result_r)
            self.stop()
            self.close()
            raise
        finally:
            for fd in ends:
                os.close(fd)
        os.set_blocking(result_r, False)
        self.result_fd = result_r

    def _start(self, source, config, stdin_text, names):
        stdin_r, stdin_w = os.pipe()
        outs = [os.pipe() for _ in names]
        try:
            process = SandboxedProcess([interpreter(), "-I", "-S", "-B", "-c", source, json.dumps(config)], self.limits,
                                       self.sandboxed, pass_fds=[config[k] for k in _FDS if k in config],
                                       stdin=stdin_r, stdout=outs[0][1],
                                       stderr=outs[1][1] if len(outs) > 1 else outs[0][1])
        except BaseException:
            for fd in (stdin_w, *[r for r, _ in outs]):
                os.close(fd)
            raise
        finally:
            os.close(stdin_r)
            for _, w in outs:
                os.close(w)
        self.processes.append(process)
        for name, (r, _) in zip(names, outs):
            os.set_blocking(r, False)
            self.outputs[r] = (name, _Output(r, self.limits.file_mb << 20))
        os.set_blocking(stdin_w, False)
        self.writes[stdin_w] = stdin_text.encode("utf-8", errors="replace")
        return process

    def write(self, fd):
        """Feed a child's stdin; False when done (or the child closed it)."""
        try:
            n = os.write(fd, self.writes[fd][:65536])
        except (BrokenPipeError, BlockingIOError) as e:
            return isinstance(e, BlockingIOError)
        self.writes[fd] = self.writes[fd][n:]
        return bool(self.writes[fd])

    def read_result(self):
        """False at the tests' EOF: the tests are over."""
        try:
            chunk = os.read(self.result_fd, 65536)
        except BlockingIOError:
            return True
        self.result += chunk[: 1 << 20]
        return bool(chunk)

    def finish(self, timed_out):
        """Kill both sandboxes, reap them, and decide the verdict."""
        statuses = []
        for line in self.result.decode("utf-8", errors="replace").splitlines():
            try:
                statuses.append(json.loads(line))
            except ValueError:
                pass
        final = statuses[-1] if statuses and isinstance(statuses[-1], dict) else {}
        if final.get("status") == "exit" and not timed_out:  # give the answer a moment to report its own exit
            try:
                self.answer.popen.wait(timeout=max(0.0, min(1.0, self.deadline - time.monotonic())))
            except Exception:
                pass
        answer_rc = self.answer.popen.poll()  # None: still serving calls when the tests ended (killed next)
        self.stop()
        open_outputs = {fd: out for fd, (_, out) in self.outputs.items()}  # drain what is left in the pipes,
        drain_until = time.monotonic() + 1.0  # briefly: unsandboxed, a setsid() child may still hold one open
        while open_outputs and time.monotonic() < drain_until:
            for fd in select.select(list(open_outputs), [], [], max(0.0, drain_until - time.monotonic()))[0]:
                if not open_outputs[fd].read():
                    del open_outputs[fd]
        rc = _returncode(answer_rc)
        oom = any(p.out_of_memory() for p in self.processes)
        notes = []
        status = final.get("status")
        if status in ("passed", "failed", "crashed"):
            verdict = status
        elif timed_out:
            verdict = "timeout"
            notes.append(f"[wall-clock limit of {self.limits.timeout_s:g} s reached: both sandboxes killed]")
        elif status == "error":
            verdict = "crashed"
        elif status == "exit":
            verdict = "crashed" if (rc is not None and rc < 0) or oom else "failed"
        elif status == "sandbox-error" or not statuses:
            verdict = "sandbox-error"
        else:  # the tests' process died without a verdict (memory, a signal)
            verdict = "crashed"
            notes.append("[the tests' process ended without a verdict]")
        if oom:
            notes.append(f"[memory limit of {self.limits.memory_mb} MiB: the kernel killed a process]")
        if rc is not None and rc < 0 and not timed_out and verdict != "passed":
            notes.append(f"[the answer's process was killed by {signal.Signals(-rc).name}]")
        elif status == "exit" and rc == 0 and verdict == "failed":
            notes.append("[exited with status 0 before its tests finished]")
        outputs = {name: out.value() for name, out in [*self.outputs.values(), *self.cut_outputs]}
        parts = [outputs.get("stderr", ""), final.get("message", "")]
        if verdict == "sandbox-error":
            parts.append(outputs.get("tests", ""))
        stderr = "\n".join(p.rstrip("\n") for p in parts + notes if p.strip())
        self.close()
        return ExecResult(verdict, rc, stderr[-_TAIL:], outputs.get("stdout", "")[-_TAIL:],
                          time.monotonic() - self.start)

    def stop(self):
        """Kill both sandboxes (everything in them) and reap them."""
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.popen.wait()

    def close(self):
        for fd in list(self.outputs) + list(self.writes) + ([self.result_fd] if hasattr(self, "result_fd") else []):
            try:
                os.close(fd)
            except OSError:
                pass
        self.outputs, self.writes = {}, {}
        for process in self.processes:
            process.release()


def _returncode(rc):
    """The answer's exit status; bwrap reports a death by signal N as 128 + N."""
    if rc is not None and rc > 128 and rc - 128 in {s.value for s in signal.Signals}:
        return -(rc - 128)
    return rc


def default_workers():
    """Samples in flight at once: two per core (a sample mostly waits for its two interpreters to start), at most 8."""
    return min(8, 2 * (os.cpu_count() or 1))


def run_samples(jobs, limits=Limits(), workers=None, allow_unsandboxed=False):
    """Run (key, problem, completion) jobs, `workers` at a time (default: `default_workers()`) from this one
    thread; yield (key, ExecResult) as each finishes. SandboxError before anything runs if bubblewrap is
    unavailable (module docstring)."""
    workers = workers or default_workers()
    sandboxed = use_sandbox(allow_unsandboxed)
    if sandboxed:
        cgroups()  # set up once, before the first sample (or log that rlimits are all there is)
    pending, active = iter(jobs), []
    selector = selectors.DefaultSelector()
    try:
        while True:
            while len(active) < max(1, workers):
                job = next(pending, None)
                if job is None:
                    break
                key, problem, completion = job
                sample = _Sample(key, problem, completion, limits, sandboxed)
                for fd in sample.outputs:
                    selector.register(fd, selectors.EVENT_READ, (sample, "output"))
                for fd in sample.writes:
                    selector.register(fd, selectors.EVENT_WRITE, (sample, "stdin"))
                selector.register(sample.result_fd, selectors.EVENT_READ, (sample, "result"))
                active.append(sample)
            if not active:
                return
            now = time.monotonic()
            wait = max(0.0, min(s.deadline for s in active) - now)
            done = set()
            for selected, _ in selector.select(timeout=wait):
                sample, what = selected.data
                fd = selected.fd
                if what == "output":
                    keep = sample.outputs[fd][1].read()
                elif what == "stdin":
                    keep = sample.write(fd)
                    if not keep:
                        os.close(fd)
                        del sample.writes[fd]
                else:
                    keep = sample.read_result()
                    if not keep:
                        done.add(sample)
                if not keep:
                    selector.unregister(fd)
                    if what == "output" and sample.outputs[fd][1].cut:
                        os.close(fd)  # past the cap: the writer gets EPIPE from now on
                        sample.cut_outputs.append(sample.outputs.pop(fd))
            now = time.monotonic()
            for sample in list(active):
                timed_out = sample not in done and now >= sample.deadline
                if sample in done or timed_out:
                    for fd in list(sample.outputs) + list(sample.writes) + [sample.result_fd]:
                        if fd in selector.get_map():
                            selector.unregister(fd)
                    active.remove(sample)
                    yield sample.key, sample.finish(timed_out)
    finally:
        for sample in active:  # the caller stopped early, or an error: nothing may keep running
            sample.stop()
            sample.close()
        selector.close()


def check_completion(problem, completion, limits=Limits(), allow_unsandboxed=False):
    """Run one completion of one problem against the problem's tests; an ExecResult."""
    issue = _problem_issue(problem)
    if issue:
        raise DataError(f"problem {problem.get('task_id', '?') if isinstance(problem, dict) else '?'!r}: {issue}.")
    return next(run_samples([(0, problem, completion)], limits, 1, allow_unsandboxed))[1]


def sandbox_report():
    """Which protections are active on this machine (for the evaluation summary)."""
    ok, why = sandbox_status()
    if not ok:
        return {"sandbox": "none", "why": why}
    groups, user = cgroups(), sandbox_user()
    outside = ("nobody" if user else "root (this interpreter is not readable by nobody)") if os.geteuid() == 0 else \
        "this user"
    return {"sandbox": "bubblewrap", "user_outside": outside,
            "namespaces": ["user", "pid", "net", "ipc", "uts", "mount", "cgroup"],
            "root": "read-only", "writable": "private tmpfs /tmp",
            "limits": f"cgroup v{groups.version} memory + pids" if groups else f"rlimits only: {rlimit_gap()}"}


# ------------------------------------------------------------------------------------------- pass@k

def check_completions(problems, completions, limits=Limits(), workers=None, allow_unsandboxed=False):
    """ExecResults, completions[i][j] -> result[i][j]; `workers` samples run at the same time (run_samples)."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but completions for {len(completions)}.")
    for problem in problems:
        issue = _problem_issue(problem)
        if issue:
            raise DataError(f"problem {problem.get('task_id', '?') if isinstance(problem, dict) else '?'!r}: {issue}.")
    jobs = [((i, j), problems[i], c) for i, samples in enumerate(completions) for j, c in enumerate(samples)]
    results = [[None] * len(samples) for samples in completions]
    for (i, j), result in run_samples(jobs, limits, workers, allow_unsandboxed):
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


def evaluate_pass_at_k(problems, completions, ks=(1,), limits=Limits(), workers=None, allow_unsandboxed=False):
    """Run every completion of every problem and return {"pass@k": ...} for each k in `ks`."""
    return pass_at_k_scores(check_completions(problems, completions, limits, workers, allow_unsandboxed), ks)
