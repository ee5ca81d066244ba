"""Crash tests that really crash (docs/reliability.md promises 4 and 5, D1, E4).

train.py runs as a subprocess on the expected-loss recipe's tiny model (2-layer Llama, 14 training rows, CPU
fp32, dropout on, cosine schedule with warmup, several epochs) with a checkpoint after every step
(save_every=1), and is SIGKILLed ten times in a row, each time resumed with --resume:
  - kill 1 lands halfway through writing step 3's optimizer.safetensors (the MINILORA_TEST_CHECKPOINT_PAUSE hook
    of checkpoint.py holds the writer there);
  - kills 2-10 land at a random moment of the loop: once the resumed run has logged one step past what the
    killed run had logged, after a random delay of up to 10 ms (odd kills: mostly inside that step's checkpoint
    write) or up to 50 ms, about one step (even kills: anywhere in the next step).
The eleventh run finishes. Then:
  - the final adapter is byte-identical to an uninterrupted run's (in-process, same settings), and so is every
    logged loss;
  - every resume started at most one checkpoint interval (1 step) behind the last step its killed run had
    logged: at most one interval of work was redone per kill;
  - every interrupted checkpoint write was removed by the next start, and nothing else is left over.
The figures (kills that landed in a checkpoint write, steps redone, seconds) are printed (pytest -s) and
recorded in docs/reliability.md. E4: an out-of-memory error in the middle of a run leaves the last checkpoint
intact, and --resume then reaches the same adapter.
"""
import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from minilora.checkpoint import PAUSE_ENV, verify_checkpoint
from minilora.config import TrainConfig

from conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

KILLS = 10
SETTINGS = dict(max_steps=30, quantize="none", backend="torch", device="cpu", dtype="float32", lora_r=8, lora_alpha=16.0,
                lora_dropout=0.1, micro_batch_size=2, grad_accum_steps=1, max_seq_len=256, test_fraction=0.125,
                learning_rate=1e-3, lr_schedule="cosine", warmup_steps=3, save_every=1, keep_last=2, eval_every=0,
                progress=False, seed=0)






def _config(inputs, out, **changes):
    return TrainConfig(model=inputs[0], data=inputs[1], out=str(out), **{**SETTINGS, **changes})


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    """(adapter bytes, losses) of the run never interrupted."""
    from minilora.trainer import train

    out = tmp_path_factory.mktemp("uninterrupted")
    train(_config(inputs, out))
    return (out / "adapter" / "adapter_model.safetensors").read_bytes(), _losses(out)


def _losses(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    losses = []
    for line in open(path, encoding="utf-8").read().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line being written as we read
            continue
        if "loss" in record:
            losses.append((record["step"], record["loss"]))
    return losses


def _last_step(out):
    return max((step for step, _ in _losses(out)), default=0)


def _cli_args(inputs, out):
    args = ["--model", inputs[0], "--data", inputs[1], "--out", str(out)]
    for key, value in SETTINGS.items():
        flag = "--" + key.replace("_", "-")
        args += ([flag] if value else ["--no-" + key.replace("_", "-")]) if isinstance(value, bool) else [flag, str(value)]
    return args


def _start(args, log_path, env=None):
    with open(log_path, "w") as log:  # a file, not a pipe: a killed child can never block on a full pipe
        return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=log,
                                env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})})


def _wait_for(proc, condition, log_path, what, timeout=180):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"train.py ended (rc {proc.returncode}) before {what}:\n{open(log_path).read()[-3000:]}"
        assert time.time() < deadline, f"train.py never reached {what}"
        time.sleep(0.002)


def _resumed_at(log_path):
    found = re.findall(r"resumed from \S+ at step (\d+)", open(log_path).read())
    assert len(found) == 1, open(log_path).read()[-3000:]
    return int(found[0])


def test_ten_sigkills_in_a_row_then_resume_end_at_the_uninterrupted_adapter(inputs, uninterrupted, tmp_path):
    out, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args, rng, started = _cli_args(inputs, out), random.Random(0), time.time()
    kills, logs = [], []
    for i in range(KILLS + 1):
        logs.append(tmp_path / f"run{i}.log")
        env = {PAUSE_ENV: "3:60"} if i == 0 else None
        proc = _start(args + (["--resume"] if i else []), logs[i], env)
        try:
            if i == KILLS:  # the last run is left to finish
                assert proc.wait(180) == 0, open(logs[i]).read()[-3000:]
                break
            if i == 0:
                half_written = str(ckpts / "step_000003.tmp-*" / "optimizer.safetensors")
                _wait_for(proc, lambda: glob.glob(half_written), logs[i], "step 3's checkpoint write")
                time.sleep(0.05)  # inside the writer's 60 s pause: the optimizer file is half written
            else:
                target = kills[-1]["logged"] + 1
                _wait_for(proc, lambda: _last_step(out) >= target, logs[i], f"step {target}")
                # the step's line is written just before its checkpoint: a short delay mostly lands in that
                # write, a long one anywhere in the next step (compute, metrics line or checkpoint)
                time.sleep(rng.uniform(0.0, 0.01 if i % 2 else 0.05))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"run {i} finished before its kill: raise max_steps"
        kills.append({"logged": _last_step(out), "in_write": bool(glob.glob(str(ckpts / "*.tmp-*")))})
    seconds = time.time() - started

    for kill, log_path in zip(kills, logs[1:]):
        kill["resumed_at"] = _resumed_at(log_path)
        kill["redone"] = kill["logged"] - kill["resumed_at"]
        if kill["in_write"]:
            assert "removing interrupted checkpoint write" in open(log_path).read()
    assert kills[0]["in_write"] and kills[0]["resumed_at"] == 2, kills[0]
    assert all(0 <= k["redone"] <= SETTINGS["save_every"] for k in kills), kills
    adapter, losses = uninterrupted
    assert _losses(out) == losses, "the losses of the killed-and-resumed run differ from the uninterrupted run's"
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter, "final adapters differ"
    assert sorted(os.listdir(ckpts)) == ["step_000029", "step_000030"], os.listdir(ckpts)
    assert all(verify_checkpoint(str(ckpts / name)) is None for name in os.listdir(ckpts))
    print(f"\ncrash test: {len(kills)} SIGKILLs ({sum(k['in_write'] for k in kills)} inside a checkpoint write), "
          f"steps redone {[k['redone'] for k in kills]} (total {sum(k['redone'] for k in kills)}, max "
          f"{max(k['redone'] for k in kills)}), {len(losses)} steps, {seconds:.1f} s for {KILLS + 1} runs of train.py")


def test_e4_out_of_memory_mid_run_keeps_the_last_checkpoint_and_resumes(inputs, uninterrupted, tmp_path, monkeypatch):
    import minilora.trainer as trainer

    real, calls = trainer.token_loss_sum, [0]

    def out_of_memory_at_step_5(model, batch, packed):  # grad_accum_steps=1: one call per step
        calls[0] += 1
        if calls[0] == 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, batch, packed)

    monkeypatch.setattr(trainer, "token_loss_sum", out_of_memory_at_step_5)
    out = tmp_path / "run"
    with pytest.raises(torch.cuda.OutOfMemoryError):  # train.py: a traceback and exit status 1
        trainer.train(_config(inputs, out))
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000003", "step_000004"]
    assert verify_checkpoint(str(out / "checkpoints" / "step_000004")) is None
    monkeypatch.undo()
    trainer.train(_config(inputs, out, resume=True))
    adapter, losses = uninterrupted
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert _losses(out) == losses
