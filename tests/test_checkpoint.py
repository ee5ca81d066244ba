"""Checkpoints (docs/reliability.md D2, D6, D7, D8, C5, E1): a complete round trip of adapter, optimizer and
RNG states; interrupted, unmarked and corrupted checkpoints skipped; keep-last-K retention that survives a
failed save; no pickles on disk; non-finite adapters and full disks never replace a good checkpoint.

A small stand-in model (two LoRA linears) keeps these tests at a few milliseconds each; the full training
loop's resume is tested end to end in tests/test_train.py.
"""
import errno
import json
import os
import random
from collections import namedtuple

import numpy as np
import pytest
import torch
from torch import nn

from minilora import checkpoint as ckpt
from minilora.errors import CheckpointError, NonFiniteError, ResumeError
from minilora.lora import apply_lora, lora_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

shutil_usage = namedtuple("usage", "total used free")




class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(12, 10)
        self.down_proj = nn.Linear(10, 7)

    def forward(self, x):
        return self.down_proj(torch.relu(self.q_proj(x)))


def _trained(steps=3, seed=0):
    """A Tiny model with LoRA and an AdamW that has taken `steps` steps (non-trivial moments)."""
    torch.manual_seed(seed)
    model = apply_lora(Tiny(), r=3, alpha=6, dropout=0.1, targets=("q_proj", "down_proj"))
    params = list(lora_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    for _ in range(steps):
        model(torch.randn(5, 12)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save(root, step, model, opt, keep_last=2):
    return ckpt.save_checkpoint(str(root), step, model, opt, {"train_state": {"step": step}, "config": {}}, keep_last)


def test_round_trip_restores_adapter_optimizer_and_every_rng(tmp_path):
    model, opt = _trained()
    path = _save(tmp_path, 3, model, opt)
    adapter = {k: v.detach().clone() for k, v in lora_parameters(model).items()}
    moments = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in lora_parameters(model).items()}
    expected_draws = (torch.rand(4), random.random(), np.random.rand(3))

    fresh, fresh_opt = _trained(steps=1, seed=1)  # different adapter, moments and RNG positions
    with torch.no_grad():  # the same frozen base, as a resumed run loads it from the same files
        for k, v in model.state_dict().items():
            if ".lora_" not in k:
                fresh.state_dict()[k].copy_(v)
    state = ckpt.load_checkpoint(path, fresh, fresh_opt)
    assert state["train_state"] == {"step": 3}
    for k, v in lora_parameters(fresh).items():
        assert torch.equal(v, adapter[k]), k
    for n, p in lora_parameters(fresh).items():
        assert set(fresh_opt.state[p]) == set(moments[n]) == {"step", "exp_avg", "exp_avg_sq"}
        for k, v in fresh_opt.state[p].items():
            assert torch.equal(v, moments[n][k]), (n, k)
    assert fresh_opt.param_groups[0]["weight_decay"] == 0.01
    draws = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(draws[0], expected_draws[0]) and draws[1] == expected_draws[1]
    assert np.array_equal(draws[2], expected_draws[2])
    # and the next optimizer step is identical too
    for m, o in ((model, opt), (fresh, fresh_opt)):
        torch.manual_seed(9)
        m(torch.randn(5, 12)).pow(2).mean().backward()
        o.step()
    for k, v in lora_parameters(fresh).items():
        assert torch.equal(v, lora_parameters(model)[k]), k


def test_only_safetensors_json_and_marker_on_disk(tmp_path):
    model, opt = _trained()
    path = _save(tmp_path, 1, model, opt)
    names = sorted(os.listdir(path))
    assert names == sorted(["COMPLETE", "adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors",
                            "rng.safetensors", "state.json"])
    digests = json.load(open(os.path.join(path, "COMPLETE")))["sha256"]
    assert set(digests) == set(names) - {"COMPLETE"}
    for name in names:  # a pickle starts with the PROTO opcode 0x80
        with open(os.path.join(path, name), "rb") as f:
            assert f.read(1) != b"\x80", name


def test_interrupted_unmarked_and_corrupted_checkpoints_are_skipped(tmp_path):
    model, opt = _trained()
    good = _save(tmp_path, 2, model, opt, keep_last=5)
    newest = _save(tmp_path, 4, model, opt, keep_last=5)
    stale_tmp = tmp_path / "step_000006.tmp-12345"
    stale_tmp.mkdir()
    (stale_tmp / "optimizer.safetensors").write_bytes(b"half a file")
    assert ckpt.latest_checkpoint(str(tmp_path)) == newest
    assert not stale_tmp.exists(), "interrupted temp dirs are cleaned on the next start"

    # D6: one flipped byte in the newest adapter -> its sha256 disagrees -> fall back to step 2
    adapter_file = os.path.join(newest, "adapter_model.safetensors")
    data = bytearray(open(adapter_file, "rb").read())
    data[-3] ^= 0xFF
    open(adapter_file, "wb").write(bytes(data))
    assert "sha256" in ckpt.verify_checkpoint(newest)
    assert ckpt.latest_checkpoint(str(tmp_path)) == good
    with pytest.raises(ResumeError, match="adapter_model.safetensors does not match"):
        ckpt.load_checkpoint(newest, model, opt)

    # D2: a renamed directory without COMPLETE is treated as incomplete
    os.remove(os.path.join(good, "COMPLETE"))
    assert "COMPLETE" in ckpt.verify_checkpoint(good)
    assert ckpt.latest_checkpoint(str(tmp_path)) is None


def test_keep_last_survives_a_failed_save(tmp_path, monkeypatch):
    """D7 + E1: K=2 over saves 1..5 with save 4 failing on a full disk; never fewer than one complete."""
    model, opt = _trained()
    for step in (1, 2, 3):
        _save(tmp_path, step, model, opt)
    assert sorted(os.listdir(tmp_path)) == ["step_000002", "step_000003"]
    real_write = ckpt._write_file

    def full_disk(path, data, pause_halfway=0.0):
        if path.endswith("optimizer.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data, pause_halfway)

    monkeypatch.setattr(ckpt, "_write_file", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*intact"):
        _save(tmp_path, 4, model, opt)
    assert sorted(os.listdir(tmp_path)) == ["step_000002", "step_000003"], "temp dir removed, old ones intact"
    monkeypatch.setattr(ckpt, "_write_file", real_write)
    _save(tmp_path, 5, model, opt)
    assert sorted(os.listdir(tmp_path)) == ["step_000003", "step_000005"]
    assert all(ckpt.verify_checkpoint(os.path.join(tmp_path, d)) is None for d in os.listdir(tmp_path))


def test_a_kill_inside_pruning_leaves_nothing_behind(tmp_path, monkeypatch):
    """A prune killed mid-delete (simulated: the delete raises after removing one file) leaves no step
    directory without its COMPLETE marker; the next save's prune removes the leftover."""
    model, opt = _trained()
    for step in (1, 2):
        _save(tmp_path, step, model, opt)
    real_rmtree = ckpt.shutil.rmtree

    def killed_rmtree(path, ignore_errors=False):
        if not os.path.isfile(os.path.join(path, ckpt.COMPLETE)):  # the save's own temp-dir cleanup
            return real_rmtree(path, ignore_errors=ignore_errors)
        os.remove(os.path.join(path, ckpt.COMPLETE))  # rmtree's order is the directory's: the marker may go first
        raise KeyboardInterrupt  # stands in for SIGKILL: nothing after this line runs

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 3, model, opt)
    names = sorted(os.listdir(tmp_path))
    assert [n for n in names if n.startswith("step_") and n[5:].isdigit()] == ["step_000002", "step_000003"], names
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    _save(tmp_path, 4, model, opt)
    assert sorted(os.listdir(tmp_path)) == ["step_000003", "step_000004"]


def test_non_finite_adapter_is_never_saved(tmp_path):
    """C5: a NaN in the adapter (or the optimizer moments) refuses the save; the previous one stays."""
    model, opt = _trained()
    previous = _save(tmp_path, 1, model, opt)
    before = open(os.path.join(previous, "adapter_model.safetensors"), "rb").read()
    with torch.no_grad():
        model.q_proj.lora_A[1, 2] = float("inf")
    with pytest.raises(NonFiniteError, match="q_proj.lora_A"):
        _save(tmp_path, 2, model, opt)
    assert os.listdir(tmp_path) == ["step_000001"]
    assert open(os.path.join(previous, "adapter_model.safetensors"), "rb").read() == before


def test_preflight_disk_check_names_the_numbers(tmp_path, monkeypatch):
    """E2: less free space than the checkpoints need refuses to start, with the numbers."""
    model, _ = _trained(steps=0)
    need = ckpt.estimate_checkpoint_bytes(model)
    n = sum(p.numel() for p in lora_parameters(model).values())
    assert need == 12 * n + (1 << 20)  # adapter + two AdamW moments in fp32, plus small files
    ckpt.check_disk_space(str(tmp_path / "not" / "yet"), need)  # a path that does not exist yet is fine
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: shutil_usage(total=10 << 20, used=10 << 20, free=1 << 19))
    with pytest.raises(CheckpointError, match=r"0\.5 MiB free, need ~"):
        ckpt.check_disk_space(str(tmp_path), need)


def test_bitsandbytes_8bit_optimizer_state_round_trips(tmp_path):
    """bitsandbytes nests its quantized moments in a dict; they must come back bit for bit."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = apply_lora(Tiny(), r=3, alpha=6, targets=("q_proj", "down_proj"))
    params = list(lora_parameters(model).values())
    opt = bnb.optim.AdamW8bit(params, lr=1e-2, min_8bit_size=1)  # 8-bit even for these small tensors
    model(torch.randn(5, 12)).pow(2).mean().backward()
    opt.step()
    path = _save(tmp_path, 1, model, opt)
    fresh_opt = bnb.optim.AdamW8bit(params, lr=1e-2, min_8bit_size=1)
    ckpt.load_checkpoint(path, model, fresh_opt)

    def flat(o):
        return ckpt._flatten_optimizer(o.state_dict())

    (a, a_json), (b, b_json) = flat(opt), flat(fresh_opt)
    assert any(t.dtype == torch.uint8 for t in a.values()), "expected 8-bit moments"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a_json["scalars"] == b_json["scalars"]
