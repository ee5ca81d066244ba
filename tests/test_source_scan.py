"""Nothing from a file is executed (docs/reliability.md promise 1, F5, F6): an AST scan of the shipped code.

Scanned: minilora/ (its kernels/ included), train.py, evaluate.py. Refused anywhere in them:
  - importing a pickle-family module (pickle, _pickle, cPickle, dill, joblib, shelve, marshal): they run code
    while loading;
  - `torch.load` (a pickle reader; CVE-2026-24747 is the latest of its escapes) and `allow_pickle=True`;
  - calls to `eval`, `exec` or `compile`, and YAML loaders that build Python objects (`yaml.load`,
    `yaml.unsafe_load`, `yaml.full_load`; `yaml.safe_load` is fine);
  - `shell=True` in any call, and the shell-running helpers `os.system`, `os.popen`, `subprocess.getoutput`,
    `subprocess.getstatusoutput`.
minilora/execution.py runs model-written code by design, but only in sandboxed child processes started with
an argument list: the `exec` it needs lives inside the runner's source text, which the child process runs,
so the parent never evaluates a sample and passes this scan like every other module.
"""
import ast
import os

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SCANNED = ["minilora", "train.py", "evaluate.py"]
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "joblib", "shelve", "marshal"}
CALLS = {"eval", "exec", "compile"}  # as bare names: model.eval() and torch.compile are attributes
DOTTED_CALLS = {"torch.load", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "os.system", "os.popen",
                "subprocess.getoutput", "subprocess.getstatusoutput", "builtins.eval", "builtins.exec"}


def _dotted(node):
    """'a.b.c' for a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def findings(source, filename="<source>"):
    """["file:line: what"] for every refused construct in `source`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in PICKLE_MODULES:
                found.append(f"{where}: from {node.module} import ...")
            if module in ("torch", "yaml", "builtins"):  # `from torch import load` hides torch.load from the call check
                found += [f"{where}: from {node.module} import {a.name}" for a in node.names
                          if f"{module}.{a.name}" in DOTTED_CALLS or a.name in CALLS]
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if isinstance(node.func, ast.Name) and node.func.id in CALLS:
                found.append(f"{where}: {node.func.id}(...)")
            elif name in DOTTED_CALLS:
                found.append(f"{where}: {name}(...)")
            for kw in node.keywords:
                if kw.arg in ("shell", "allow_pickle") and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append(f"{where}: {kw.arg}={ast.unparse(kw.value)}")
        elif isinstance(node, ast.Attribute) and _dotted(node) == "torch.load":  # also passed around uncalled
            found.append(f"{where}: torch.load")
    return sorted(set(found))


def _python_files():
    for entry in SCANNED:
        path = os.path.join(ROOT, entry)
        if os.path.isfile(path):
            yield path
        for directory, _, names in os.walk(path):
            yield from (os.path.join(directory, n) for n in sorted(names) if n.endswith(".py"))


def test_shipped_code_never_executes_file_content():
    files = list(_python_files())
    assert len(files) > 20 and any(f.endswith("execution.py") for f in files), files
    found = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            found += findings(f.read(), os.path.relpath(path, ROOT))
    assert not found, "code that can execute file content:\n" + "\n".join(found)


def test_the_scan_sees_each_pattern():
    """Each refused construct, written the ways code really writes it, is reported (the scan is not vacuous)."""
    bad = {
        "import pickle": "import pickle", "import dill as d": "import dill", "from pickle import loads": "from pickle",
        "torch.load(path)": "torch.load(...)", "from torch import load": "from torch import load",
        "f = torch.load": "torch.load", "eval(text)": "eval(...)", "exec(code, {})": "exec(...)",
        "compile(s, 'f', 'exec')": "compile(...)", "yaml.load(f)": "yaml.load(...)",
        "subprocess.run(cmd, shell=True)": "shell=True", "subprocess.Popen(c, shell=flag)": "shell=flag",
        "os.system('ls')": "os.system(...)", "np.load(p, allow_pickle=True)": "allow_pickle=True",
    }
    for source, what in bad.items():
        assert any(what in f for f in findings(source)), (source, findings(source))
    fine = ["model.eval()", "torch.compile(f)", "yaml.safe_load(f)", "subprocess.run([sys.executable, 'x'])",
            "subprocess.run(cmd, shell=False)", "safetensors.torch.load(data)", "RUNNER = 'exec(compile(s))'"]
    for source in fine:
        assert findings(source) == [], (source, findings(source))
