"""The embedded data set: small Python programming tasks generated here, deterministically from a seed.

Written for this project (no third-party text), so the demo and the tests need nothing beside the
repository. Each task is one function of a family in `families.py` (41 families: numbers, lists, strings,
dicts), with a generated name, parameter name and constant, and comes in two layouts at once:

  Alpaca record   instruction, input (optional: an example call, or ""), output (the reference solution),
                  the layout of CodeAlpaca that `data.load_records` and train.py read;
  HumanEval       task_id, prompt (signature and docstring), entry_point (the function's name), test (a
                  `check(candidate)` of asserts), the layout that `execution` runs and evaluate.py's
                  `--problems` reads (openai/human-eval's).

The expected values in the tests come from each family's oracle, a Python function separate from the
solution's text, so running the solution against its tests checks the template (tests/test_tasks.py does,
for every task, through `execution.evaluate_pass_at_k`).

Held-out tasks use function names and constants that no training task of the same family uses (the
parameter names and instruction wordings are shared): scoring them asks whether a tuned model learned the
families rather than the training rows.

API: `train_records(seed)`, `held_out_problems(seed)`, `write_tasks(out, seed)`, and `generate_tasks(seed)`
(both sides with every key, plus "family" and "constant"). On the command line:

    python -m minilora.tasks --out DIR     # DIR/train.json (Alpaca records), DIR/held_out.jsonl (problems)
"""
import json
import os
import random

from .families import FAMILIES, NOUNS, PARAMETERS

TRAIN_PER_FAMILY = 30
HELD_OUT_PER_FAMILY = 4
# How the instruction asks for the function; {sig} is `name(parameter)`, {says} the family's sentence.
INSTRUCTIONS = (
    "Write a Python function `{sig}` that {says}.",
    "Create a function `{sig}` which {says}.",
    "Implement `{sig}`: it {says}.",
)


def _literal(value):
    return repr(value)


def _fill(text, parameter, constant):
    k, k2 = constant if isinstance(constant, tuple) else (constant, None)
    return text.format(p=parameter, k=_literal(k), k2=_literal(k2))


def _arguments(kind, rng, constant):
    """Five arguments for a test of a function taking `kind`, some of them containing the constant."""
    k = constant[0] if isinstance(constant, tuple) else constant
    if kind == "number":  # the constant's neighbours too: `above` and `cap` change answer there
        near = [k - 1, k, k + 1] if isinstance(k, int) else []
        return rng.sample(range(-20, 41), 5 - len(near)) + near
    out = []
    for i in range(5):
        if kind == "list":
            xs = [rng.randint(-5, 25) for _ in range(rng.randint(0 if i == 0 else 1, 7))]
            if isinstance(k, int) and i % 2 == 1:
                xs.insert(rng.randint(0, len(xs)), k)
            out.append(xs)
        elif kind == "string":
            letters = "abcdeilmnorstuxyz"
            word = "".join(rng.choice(letters) for _ in range(rng.randint(0 if i == 0 else 1, 9)))
            if isinstance(k, str) and i % 2 == 1:
                at = 0 if i == 1 else rng.randint(0, len(word))
                word = word[:at] + k + word[at:]
            out.append(word)
        else:
            keys = rng.sample(("a", "b", "c", "red", "blue", "x", "y", "total", "count", "name"), rng.randint(0 if i == 0 else 1, 4))
            d = {key: rng.randint(-5, 25) for key in keys}
            if isinstance(k, str) and i % 2 == 1:
                d[k] = rng.randint(1, 9)
            out.append(d)
    return out


def _test(family, constant, rng):
    k, k2 = constant if isinstance(constant, tuple) else (constant, None)
    lines = ["def check(candidate):"]
    for argument in _arguments(family.kind, rng, constant):
        expected = family.oracle(argument, k, k2)
        lines.append(f"    assert candidate({argument!r}) == {expected!r}")
    return "\n".join(lines) + "\n"


def make_task(family, name, parameter, constant, wording, rng, task_id):
    """One task of `family` in both layouts (module docstring), plus its family's name and constant."""
    says = _fill(family.says, parameter, constant)
    signature = f"{name}({parameter})"
    instruction = INSTRUCTIONS[wording].format(sig=signature, says=says)
    solution = f"def {signature}:\n    {_fill(family.body, parameter, constant)}\n"
    test = _test(family, constant, rng)
    example = ""
    if family.example:
        k, k2 = constant if isinstance(constant, tuple) else (constant, None)
        argument = _arguments(family.kind, rng, constant)[2]
        example = f"{name}({argument!r}) == {family.oracle(argument, k, k2)!r}"
    docstring = says[0].upper() + says[1:] + "."
    prompt = f"def {signature}:\n    \"\"\"{docstring}\"\"\"\n"
    return {"task_id": task_id, "family": family.name, "constant": constant, "instruction": instruction, "input": example,
            "output": solution, "prompt": prompt, "entry_point": name, "test": test}


def _names(family):
    return [f"{verb}_{noun}" for verb in family.verbs for noun in NOUNS[family.kind]]


def generate_tasks(seed=0):
    """(training tasks, held-out tasks): dicts with both layouts' keys, "family" and "constant"; same seed,
    same tasks."""
    rng = random.Random(seed)
    owners = {}
    for family in FAMILIES:
        for name in _names(family):
            owners.setdefault(name, set()).add(family.name)
    train, held_out = [], []
    for family in FAMILIES:
        names = sorted(n for n in _names(family) if len(owners[n]) == 1)  # a name says which family it is
        rng.shuffle(names)
        held_names, train_names = names[:HELD_OUT_PER_FAMILY], names[HELD_OUT_PER_FAMILY:]
        constants = list(family.constants) or [None]
        rng.shuffle(constants)
        cut = max(1, len(constants) // 4) if len(constants) > 1 else 0
        held_constants, train_constants = (constants[:cut], constants[cut:]) if cut else (constants, constants)
        parameters = PARAMETERS[family.kind]
        seen = set()
        while len(seen) < TRAIN_PER_FAMILY:
            choice = (rng.choice(train_names), rng.choice(parameters), rng.choice(train_constants),
                      rng.randrange(len(INSTRUCTIONS)))
            if choice not in seen:
                seen.add(choice)
                train.append(make_task(family, *choice, rng, f"train/{family.name}/{len(seen) - 1}"))
        for i, name in enumerate(held_names):
            held_out.append(make_task(family, name, rng.choice(parameters), held_constants[i % len(held_constants)],
                                      rng.randrange(len(INSTRUCTIONS)), rng, f"held_out/{family.name}/{i}"))
    rng.shuffle(train)
    return train, held_out


def train_records(seed: int = 0) -> list:
    """The training tasks as Alpaca records {"instruction", "input", "output"} (what train.py's --data reads)."""
    train, _ = generate_tasks(seed)
    return [{k: t[k] for k in ("instruction", "input", "output")} for t in train]


def held_out_problems(seed: int = 0) -> list:
    """The held-out tasks as HumanEval problems {"task_id", "prompt", "entry_point", "test"}, with the task's
    "instruction" and "input" so an instruction-tuned model can be asked in words, and the reference solution
    (the whole function) as "output": each problem is also an Alpaca record, for ROUGE-L."""
    _, held_out = generate_tasks(seed)
    keys = ("task_id", "prompt", "entry_point", "test", "instruction", "input", "output")
    return [{k: t[k] for k in keys} for t in held_out]


def write_tasks(out, seed=0):
    """Write both files into `out` (created if needed); {"train": path, "held_out": path}."""
    os.makedirs(out, exist_ok=True)
    records, problems = train_records(seed), held_out_problems(seed)
    paths = {"train": os.path.join(out, "train.json"), "held_out": os.path.join(out, "held_out.jsonl")}
    with open(paths["train"], "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    with open(paths["held_out"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p) + "\n" for p in problems)
    return paths
