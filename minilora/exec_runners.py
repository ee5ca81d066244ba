"""The two programs that run inside the sandbox for each sample, as source text (`python -I -S -c SOURCE CONFIG`).

The answer and its tests run in two processes, each in its own sandbox (sandbox.py), joined by two pipes:
  ANSWER  runs the answer's program (HumanEval: prompt + completion; MBPP: setup + completion), says which
          functions it defined, then serves calls: a request line names a function and its arguments, the
          reply line carries the return value, the exception raised, or the exit requested.
  TESTS   runs the problem's test code in a fresh interpreter where the answer's functions are stand-ins
          that make those calls; it writes its verdict to a pipe only the evaluator reads.
Values cross as JSON with tags for what JSON lacks (tuple, set, frozenset, dict with any keys, bytes,
complex): the tests compare plain built-in values, never an object of the answer's making (no custom
`__eq__`), and nothing the answer does to its own interpreter (frames, `sys.settrace`, builtins, a trailing
decorator, exit) reaches the tests' interpreter. Both programs start by lowering their own rlimits, before
any sample code runs. They are text for the child interpreter: the evaluator never executes them.
"""

_COMMON = r'''
import builtins, json, os, resource, site, sys, traceback

# started with -S (no .pth files run: faster, and nothing of the evaluator's set-up); plain site-packages stay importable
sys.path.extend(p for p in site.getsitepackages() if p not in sys.path)

MAX_DEPTH = 200

def set_limits(limits):
    wanted = [(resource.RLIMIT_AS, limits["memory"]), (resource.RLIMIT_FSIZE, limits["file"]),
              (resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, limits["cpu"])]
    if limits["processes"]:
        wanted.append((resource.RLIMIT_NPROC, limits["processes"]))
    for which, value in wanted:
        hard = resource.getrlimit(which)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))

def encode(x, depth=0):
    if depth > MAX_DEPTH:
        raise ValueError(f"a value nested more than {MAX_DEPTH} levels deep cannot cross between processes")
    if x is None or isinstance(x, bool):
        return x if x is None else bool(x)
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return float(x)
    if isinstance(x, str):
        return str.__str__(x)
    if isinstance(x, list):
        return [encode(v, depth + 1) for v in x]
    if isinstance(x, tuple):
        return {"$": "tuple", "v": [encode(v, depth + 1) for v in x]}
    if isinstance(x, dict):
        return {"$": "dict", "v": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in x.items()]}
    if isinstance(x, (set, frozenset)):
        return {"$": "set" if isinstance(x, set) else "frozenset", "v": [encode(v, depth + 1) for v in x]}
    if isinstance(x, (bytes, bytearray)):
        return {"$": "bytes", "v": bytes(x).hex()}
    if isinstance(x, complex):
        return {"$": "complex", "v": [x.real, x.imag]}
    raise TypeError(f"a value of type {type(x).__name__} cannot cross between the answer's process and the "
                    "tests' process (only None, bool, int, float, complex, str, bytes, list, tuple, dict, set)")

def decode(x, depth=0):
    kind = type(x)
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if x is None or kind in (bool, int, float, str):
        return x
    if kind is list:
        return [decode(v, depth + 1) for v in x]
    if kind is dict and sorted(x) == ["$", "v"]:
        tag, v = x["$"], x["v"]
        if tag == "bytes" and type(v) is str:
            return bytes.fromhex(v)
        if type(v) is list:
            if tag == "tuple":
                return tuple(decode(i, depth + 1) for i in v)
            if tag == "set":
                return {decode(i, depth + 1) for i in v}
            if tag == "frozenset":
                return frozenset(decode(i, depth + 1) for i in v)
            if tag == "dict" and all(type(p) is list and len(p) == 2 for p in v):
                return {decode(k, depth + 1): decode(w, depth + 1) for k, w in v}
            if tag == "complex" and len(v) == 2 and all(type(p) in (int, float) for p in v):
                return complex(v[0], v[1])
    raise ValueError(f"malformed value {str(x)[:80]!r}")

def tail(text, n=4000):
    return text[-n:]

def ours_removed(trace):
    """A traceback without the runner's own frames (they are in "<string>", the -c source)."""
    lines, kept, skip = trace.splitlines(), [], False
    for line in lines:
        if line.startswith('  File "<string>"'):
            skip = True
            continue
        if skip and line.startswith("    "):
            continue
        skip = False
        kept.append(line)
    return "\n".join(kept) + "\n"

def flush():
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass
'''

ANSWER = _COMMON + r'''
def main(config):
    set_limits(config["limits"])
    requests = open(config["requests"], "r", encoding="utf-8")
    replies = open(config["replies"], "w", encoding="utf-8")
    write, leave = replies.write, os._exit

    def send(message):
        write(json.dumps(message) + "\n")
        replies.flush()

    send({"started": True})  # bwrap and the interpreter are up: what follows is the answer's doing
    source = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    namespace = {"__name__": "__sample__"}
    try:
        exec(compile(source, "answer.py", "exec"), namespace)
    except SystemExit as e:
        flush(); send({"exit": repr(e.code)}); leave(0)
    except BaseException:
        flush(); send({"error": tail(ours_removed(traceback.format_exc()))}); leave(0)
    flush()
    send({"ready": [k for k, v in list(namespace.items()) if isinstance(k, str) and k.isidentifier()
                    and not k.startswith("__") and callable(v) and not isinstance(v, type)]})
    for line in requests:
        try:
            message = json.loads(line)
            function = namespace.get(message["call"])
            if function is None:
                raise NameError(f"name {message['call']!r} is not defined by the answer")
            value = function(*decode(message["args"]), **decode(message["kwargs"]))
            reply = json.dumps({"ok": encode(value)})
        except SystemExit as e:
            flush(); send({"exit": repr(e.code)}); leave(0)
        except BaseException as e:
            reply = json.dumps({"raise": type(e).__name__, "message": tail(str(e), 1000),
                                "traceback": tail(ours_removed(traceback.format_exc()))})
        flush()
        write(reply + "\n")
        replies.flush()
    flush()
    leave(0)

main(json.loads(sys.argv[1]))
'''

TESTS = _COMMON + r'''
class AnswerGone(BaseException):
    """The answer's process ended or exited: a BaseException, so the tests' `except Exception` cannot hide it."""

class AnswerError(Exception):
    """An exception of the answer's that is not a built-in type."""

def main(config):
    set_limits(config["limits"])
    spec = json.loads(sys.stdin.buffer.read())
    result = open(config["result"], "w", encoding="utf-8")

    def report(status, message=""):
        result.write(json.dumps({"status": status, "message": tail(message)}) + "\n")
        result.flush()

    report("started")
    requests = open(config["requests"], "w", encoding="utf-8")
    replies = open(config["replies"], "r", encoding="utf-8")
    most = config["max_reply_chars"]
    gone = []

    def receive():
        line = replies.readline(most)
        if not line:
            gone.append("the answer's process ended before its tests finished")
            raise AnswerGone()
        if not line.endswith("\n"):
            raise ValueError(f"the answer's reply is longer than {most} characters")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ValueError("malformed reply from the answer's process")
        if "exit" in message:
            gone.append(f"the answer called exit({message['exit']}) before its tests finished")
            raise AnswerGone()
        return message

    def stand_in(name):
        def call(*args, **kwargs):
            if gone:
                raise AnswerGone()
            try:
                requests.write(json.dumps({"call": name, "args": encode(list(args)), "kwargs": encode(kwargs)}) + "\n")
                requests.flush()
            except BrokenPipeError:
                gone.append("the answer's process ended before its tests finished")
                raise AnswerGone() from None
            message = receive()
            if "ok" in message:
                return decode(message["ok"])
            if "raise" in message:
                kind = getattr(builtins, str(message["raise"]), None)
                text = f"{message.get('message', '')}\n[raised in the answer's process]\n{message.get('traceback', '')}"
                if isinstance(kind, type) and issubclass(kind, Exception):
                    try:
                        error = kind(text)
                    except Exception:
                        error = AnswerError(f"{message['raise']}: {text}")
                else:
                    error = AnswerError(f"{message['raise']}: {text}")
                raise error
            raise ValueError("malformed reply from the answer's process")
        call.__name__ = call.__qualname__ = name
        return call

    try:
        first = {}
        first = receive()
        if "started" in first:
            first = receive()
    except AnswerGone:
        report("sandbox-error" if "started" not in first else "exit", gone[-1] if gone else "")
        return
    except BaseException:
        report("crashed", ours_removed(traceback.format_exc()))
        return
    if "error" in first:
        report("error", first["error"])
        return
    names = [n for n in first.get("ready", []) if isinstance(n, str) and n.isidentifier()]
    namespace = {"__name__": "__tests__"}
    try:
        if spec["layout"] == "humaneval":
            # the prompt's helpers (HumanEval/32's poly, /38's encode_cyclic): the problem's, not the answer's;
            # a prompt that ends in a bare `def` line gets a body so that it compiles
            for prompt in (spec["prompt"], spec["prompt"].rstrip() + "\n    pass\n"):
                try:
                    exec(compile(prompt, "prompt.py", "exec"), namespace)
                    break
                except Exception:
                    namespace = {"__name__": "__tests__"}
            entry = spec["entry_point"]
            namespace[entry] = stand_in(entry)
            exec(compile(spec["test"], "test.py", "exec"), namespace)
            namespace["check"](namespace[entry])
        else:
            exec(compile(spec["setup"], "setup.py", "exec"), namespace)
            for name in names:
                namespace[name] = stand_in(name)
            exec(compile(spec["test"], "test.py", "exec"), namespace)
    except AnswerGone:
        report("exit", gone[-1])
    except AssertionError:
        report("failed", ours_removed(traceback.format_exc()))
    except BaseException:
        report("exit" if gone else "crashed", ours_removed(traceback.format_exc()))
    else:
        report("exit" if gone else "passed", gone[-1] if gone else "")
    flush()

main(json.loads(sys.argv[1]))
os._exit(0)
'''
