"""Training checkpoints that survive a crash at any instant and resume a run exactly.

Layout (docs/reliability.md: llm.c's DONE marker plus HF's file split, no pickles):

  OUT/checkpoints/step_000200/
    adapter_config.json, adapter_model.safetensors   the LoRA adapter in PEFT format (loadable as is)
    optimizer.safetensors    optimizer tensors, flattened as "state/<param index>/<name>"
    rng.safetensors          torch CPU RNG, one CUDA RNG per device, numpy's MT19937 key
    state.json               step, data cursor, optimizer param groups and scalars, python RNG, config
    COMPLETE                 written last: sha256 of every file above
  OUT/checkpoints/step_000300.tmp-<pid>/    a write in progress: ignored, removed by the next start

Atomicity: files go to the temp dir, each fsynced; COMPLETE is written and fsynced; the directory is
fsynced and renamed into place, then its parent fsynced. Only then are checkpoints beyond `keep_last`
deleted, so a crash at any point leaves the previous complete checkpoint intact. A step written again (a
resumed run repeating it) swaps directories: the old copy is renamed aside to step_N.old-<pid> and deleted only
once the new one is in place; a crash between the two renames is repaired on resume. A checkpoint whose
COMPLETE is missing or whose hashes disagree is skipped on resume, falling back to an older one.

Test hook: MINILORA_TEST_CHECKPOINT_PAUSE="STEP:SECONDS" sleeps halfway through writing
optimizer.safetensors of step STEP, so tests/test_train.py can SIGKILL a run mid-write.
"""
import hashlib
import json
import logging
import os
import random
import shutil
import time

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .errors import CheckpointError, ResumeError
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, adapter_state, check_finite, lora_parameters, PEFT_PREFIX

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE = "state.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
PAUSE_ENV = "MINILORA_TEST_CHECKPOINT_PAUSE"
OLD_MARK = ".old-"  # step_000200.old-<pid>: the previous copy of a step being rewritten


# ------------------------------------------------------------------------------------- file writing

def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path, data: bytes, pause_halfway=0.0):
    """Write bytes and fsync them; `pause_halfway` seconds of sleep in the middle (test hook only)."""
    with open(path, "wb") as f:
        if pause_halfway:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            time.sleep(pause_halfway)
            data = data[len(data) // 2:]
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pause_for(step):
    spec = os.environ.get(PAUSE_ENV, "")
    if ":" in spec and spec.split(":")[0] == str(step):
        return float(spec.split(":")[1])
    return 0.0


# --------------------------------------------------------------------------------- state to tensors

def _flatten_optimizer(state_dict):
    """(tensors, json_part) of an optimizer state_dict: tensors keyed "state/<param index>/<name>[/<name>...]"
    (bitsandbytes nests its 8-bit state one dict down), everything else in the JSON part."""
    tensors, scalars = {}, {}

    def walk(prefix, value):
        if torch.is_tensor(value):
            tensors[prefix] = value.detach().cpu().clone()  # own storage: bitsandbytes shares its qmaps
        elif isinstance(value, dict):
            for name, item in value.items():
                if "/" in str(name):
                    raise CheckpointError(f"optimizer state key {name!r} contains '/', which checkpoints reserve.")
                walk(f"{prefix}/{name}", item)
        else:
            scalars[prefix] = value

    for idx, per_param in state_dict["state"].items():
        walk(f"state/{idx}", per_param)
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors, json_part):
    state = {}
    for key, value in [*tensors.items(), *json_part["scalars"].items()]:
        _, idx, *path = key.split("/")
        node = state.setdefault(int(idx), {})
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return {"state": state, "param_groups": json_part["param_groups"]}


def rng_state():
    """(tensors, json_part): every random generator a training step touches."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = s
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_key"] = torch.from_numpy(key.astype(np.int64))
    version, internal, python_gauss = random.getstate()
    return tensors, {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
                     "python": [version, list(internal), python_gauss]}


def set_rng_state(tensors, json_part):
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[f"torch_cuda.{i}"] for i in range(len([k for k in tensors if k.startswith("torch_cuda.")]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, pos, has_gauss, gauss = json_part["numpy"]
    np.random.set_state((kind, tensors["numpy_key"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, python_gauss = json_part["python"]
    random.setstate((version, tuple(internal), python_gauss))


# ------------------------------------------------------------------------------------------- save

def estimate_checkpoint_bytes(model, optimizer_slots=2):
    """Adapter plus `optimizer_slots` fp32 moments per adapter element (AdamW: 2), plus 1 MiB of small files."""
    n = sum(t.numel() for t in lora_parameters(model).values())
    return n * 4 * (1 + optimizer_slots) + (1 << 20)


def check_disk_space(root, needed_bytes):
    """CheckpointError before training if `root`'s disk cannot hold `needed_bytes` (docs/reliability.md E2)."""
    probe = root
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "."
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise CheckpointError(f"not enough disk for checkpoints in {root}: {free / 2**20:.1f} MiB free, need "
                              f"~{needed_bytes / 2**20:.1f} MiB (two checkpoints plus the final adapter). "
                              "Free space or choose another --out.")


def step_dir_name(step):
    return f"step_{step:06d}"


def save_checkpoint(root, step, model, optimizer, state, keep_last=2):
    """Atomically write checkpoint `step` of the run into `root` (OUT/checkpoints); returns its path.

    state: a JSON-able dict (step, data cursor, config, ...). Raises NonFiniteError before writing
    anything if the adapter or optimizer hold NaN/inf, CheckpointError if the disk write fails (the
    temp dir is removed and older checkpoints are untouched).
    """
    adapter = {k: t.cpu() for k, t in adapter_state(model).items()}
    check_finite(adapter, f"checkpoint step {step}")
    opt_tensors, opt_json = _flatten_optimizer(optimizer.state_dict())
    check_finite(opt_tensors, f"checkpoint step {step} (optimizer state)")
    rng_tensors, rng_json = rng_state()
    full_state = {**state, "optimizer": opt_json, "rng": rng_json}

    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, step_dir_name(step))
    tmp = f"{final}.tmp-{os.getpid()}"
    files = {
        ADAPTER_CONFIG: json.dumps(adapter_config(model, state.get("base_model")), indent=2).encode(),
        ADAPTER_WEIGHTS: save_safetensors_bytes(adapter, metadata={"format": "pt"}),
        RNG: save_safetensors_bytes({k: v.contiguous() for k, v in rng_tensors.items()}),
        STATE: json.dumps(full_state, indent=1).encode(),
        OPTIMIZER: save_safetensors_bytes(opt_tensors),
    }
    needed = sum(len(data) for data in files.values())
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name, data in files.items():
            _write_file(os.path.join(tmp, name), data, _pause_for(step) if name == OPTIMIZER else 0.0)
        digests = {name: _sha256(os.path.join(tmp, name)) for name in files}
        _write_file(os.path.join(tmp, COMPLETE), json.dumps({"step": step, "sha256": digests}, indent=1).encode())
        _fsync_dir(tmp)
        if os.path.exists(final):  # the same step written again (a resumed run): swap, so that a crash between
            old = f"{final}{OLD_MARK}{os.getpid()}"  # the renames leaves the old copy, which resume puts back
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"writing checkpoint {final} failed: {e} (it needs ~{needed / 2**20:.1f} MiB). Older "
                              f"checkpoints in {root} are intact; free disk space (or fix permissions) and resume "
                              "with --resume.") from None
    _prune(root, keep_last)
    return final


PRUNED_MARK = ".pruned-"


def _prune(root, keep_last):
    """Delete complete checkpoints beyond the newest `keep_last` (never the only complete one).

    Each is first renamed out of the step_NNNNNN names (atomic), then deleted: a kill inside the delete leaves
    a `.pruned-` directory that the next prune removes, never a half-deleted step directory that no later
    prune would recognise (the crash test found one left behind when its COMPLETE file went first).
    """
    complete = [p for p in _step_dirs(root) if os.path.isfile(os.path.join(p, COMPLETE))]
    for path in complete[:-keep_last] if keep_last > 0 else []:
        os.rename(path, f"{path}{PRUNED_MARK}{os.getpid()}")
    for name in os.listdir(root):
        if PRUNED_MARK in name:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _step_dirs(root):
    """step_NNNNNN directories (not temp ones), oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step_") and n[5:].isdigit())
    return [os.path.join(root, n) for n in names]


# ------------------------------------------------------------------------------------------- load

def verify_checkpoint(path):
    """None if `path` is complete and its files match the sha256s in COMPLETE, else the reason."""
    marker = os.path.join(path, COMPLETE)
    if not os.path.isfile(marker):
        return "no COMPLETE marker (the write was interrupted)"
    try:
        with open(marker, encoding="utf-8") as f:
            digests = json.load(f)["sha256"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable COMPLETE marker ({e})"
    for name, digest in digests.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if _sha256(file) != digest:
            return f"{name} does not match its sha256 in COMPLETE (corrupted after writing)"
    return None


def latest_checkpoint(root):
    """The newest checkpoint in `root` that verifies, or None. Removes interrupted temp dirs; logs skips."""
    if not os.path.isdir(root):
        return None
    for name in sorted(os.listdir(root)):
        if OLD_MARK in name:  # a crash while a step was rewritten: keep the old copy unless the new one is in place
            step_dir = os.path.join(root, name.split(OLD_MARK)[0])
            if os.path.exists(step_dir):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            else:
                log.warning("restoring %s from an interrupted rewrite", step_dir)
                os.rename(os.path.join(root, name), step_dir)
    for name in os.listdir(root):
        if ".tmp-" in name:
            log.warning("removing interrupted checkpoint write %s", os.path.join(root, name))
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    for path in reversed(_step_dirs(root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log.error("skipping checkpoint %s: %s", path, problem)
    return None


def _read_safetensors(path):
    with open(path, "rb") as f:
        return load_safetensors_bytes(f.read())


def read_state(path):
    """state.json of checkpoint `path` (to check a resume before any tensor is loaded)."""
    problem = verify_checkpoint(path)
    if problem is not None:
        raise ResumeError(f"checkpoint {path} cannot be resumed from: {problem}.")
    with open(os.path.join(path, STATE), encoding="utf-8") as f:
        return json.load(f)


def load_checkpoint(path, model, optimizer):
    """Restore adapter, optimizer and RNG states from checkpoint `path`; returns its state.json dict."""
    state = read_state(path)
    adapter = _read_safetensors(os.path.join(path, ADAPTER_WEIGHTS))
    params = lora_parameters(model)
    expected = {f"{PEFT_PREFIX}{name}.weight": p for name, p in params.items()}
    if set(adapter) != set(expected):
        diff = sorted(set(adapter) ^ set(expected))
        raise ResumeError(f"checkpoint {path}: adapter tensors differ from this run's LoRA layers "
                          f"({', '.join(diff[:4])} ...); the LoRA settings changed since the checkpoint.")
    with torch.no_grad():
        for key, p in expected.items():
            if adapter[key].shape != p.shape:
                raise ResumeError(f"checkpoint {path}: {key} has shape {list(adapter[key].shape)}, this run's "
                                  f"is {list(p.shape)} (was --lora-r changed?).")
            p.copy_(adapter[key])
    opt_tensors = _read_safetensors(os.path.join(path, OPTIMIZER))
    optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, state.pop("optimizer")))
    set_rng_state(_read_safetensors(os.path.join(path, RNG)), state.pop("rng"))
    return state
