"""Data-parallel training under torchrun on CPU: gloo, 2 processes, the tiny recipe (minilora/distributed.py).

- `torchrun --nproc-per-node 2 train.py` gives one process's loss curve at the same global batch (fp32,
  rtol 1e-5) and its adapter; rank 0 alone writes metrics.jsonl (one line per step) and the adapter;
- a step whose micro-batches do not divide over the ranks (3 over 2, then an epoch's short last step in
  which rank 1 has none) still equals one process;
- a checkpoint resumes on another number of ranks: 2 ranks then 1, and 1 then 2, equal 4 steps in one process;
- on the same number of ranks resume is exact with dropout on (every rank's RNG is in the checkpoint).

Starting processes is most of the cost (~10 s a launch on the shared CPU), so the 2-rank runs after the CLI
one share a single torchrun launch of this very file (`_worker`, at the bottom), which calls train() in
turn inside one process group.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
_spec = importlib.util.spec_from_file_location("regen", os.path.join(ROOT, "scripts", "regenerate_expected_loss.py"))
regen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(regen)

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")

# The recipe (micro_batch_size 2, 2 micro-batches a step, fp32 CPU) without dropout: one process and two
# ranks draw different dropout masks, so only dropout 0 can match step for step.
NO_DROPOUT = dict(lora_dropout=0.0, max_steps=4)
UNEVEN = dict(lora_dropout=0.0, grad_accum_steps=3, max_steps=3)  # 14 rows = 7 batches: steps of 3, 3, 1
# FSDP2 shards the frozen NF4 base; the uneven steps make the short rank re-run a batch at weight 0
FSDP = dict(UNEVEN, quantize="nf4", fsdp=True)


def _torchrun(args):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def _adapter(out):
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


def _assert_same_training(got, want, rtol=1e-5):
    """Loss and grad-norm curves within rtol (fp32; only the order of float additions differs), same adapter."""
    for key in ("loss", "grad_norm"):
        a, b = [r[key] for r in _records(got)], [r[key] for r in _records(want)]
        diffs = [abs(x - y) for x, y in zip(a, b)]
        assert len(a) == len(b) and all(d <= rtol * abs(y) for d, y in zip(diffs, b)), (
            f"{key}: got {a}, want {b}, max diff {max(diffs):.3e}, mean diff {sum(diffs) / len(diffs):.3e}")
    got_adapter, want_adapter = _adapter(got), _adapter(want)
    assert got_adapter.keys() == want_adapter.keys()
    for name, t in want_adapter.items():
        # atol: AdamW divides by sqrt(v), so near-zero gradients turn rounding noise into ~lr * 1e-4 moves
        torch.testing.assert_close(got_adapter[name], t, rtol=rtol, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run the tests compare, keyed by name; one process in this process, two ranks under torchrun."""
    from minilora.trainer import train

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as tests/test_train.py: a second thread only waits for a busy core
    d = str(tmp_path_factory.mktemp("distributed"))
    base, data = regen.write_inputs(d)
    out = {name: os.path.join(d, name) for name in ("one", "one_uneven", "one_then_two", "two_cli", "two_uneven",
                                                     "two_then_one", "two_dropout", "two_dropout_split",
                                                     "one_nf4_uneven", "two_fsdp", "two_fsdp_then_one")}

    def config(name, **settings):
        return regen.recipe_config(base, data, out[name], **settings)

    train(config("one", **NO_DROPOUT))
    train(config("one_uneven", **UNEVEN))
    train(config("one_then_two", **{**NO_DROPOUT, "max_steps": 2}))
    train(config("one_nf4_uneven", **{**FSDP, "fsdp": False}))

    _torchrun(["train.py", "--model", base, "--data", data, "--out", out["two_cli"], "--quantize", "none",
               "--backend", "torch", "--device", "cpu", "--dtype", "float32", "--lora-r", "8", "--lora-alpha", "16",
               "--lora-dropout", "0", "--learning-rate", "1e-3", "--micro-batch-size", "2", "--grad-accum-steps", "2",
               "--max-steps", "4", "--max-seq-len", "256", "--test-fraction", "0.125", "--eval-every", "0",
               "--save-every", "0", "--no-progress"])

    plan = [(out["two_uneven"], UNEVEN), (out["two_then_one"], {**NO_DROPOUT, "max_steps": 2}),
            (out["one_then_two"], {**NO_DROPOUT, "resume": True}),
            (out["two_dropout"], {"max_steps": 4}),  # the recipe's dropout 0.1
            (out["two_dropout_split"], {"max_steps": 2}), (out["two_dropout_split"], {"max_steps": 4, "resume": True}),
            (out["two_fsdp"], FSDP), (out["two_fsdp_then_one"], {**FSDP, "max_steps": 2})]
    with open(os.path.join(d, "plan.json"), "w") as f:
        json.dump({"base": base, "data": data, "runs": plan}, f)
    _torchrun([os.path.abspath(__file__), os.path.join(d, "plan.json")])

    train(config("two_then_one", **NO_DROPOUT, resume=True))
    train(config("two_fsdp_then_one", **{**FSDP, "fsdp": False}, resume=True))
    torch.set_num_threads(before)
    return out


def test_torchrun_two_ranks_equal_one_process(runs):
    _assert_same_training(runs["two_cli"], runs["one"])
    records = _records(runs["two_cli"])
    assert [r["step"] for r in records] == [1, 2, 3, 4], "rank 0 alone logs each step once"
    assert {r["world_size"] for r in records} == {2} and {r["world_size"] for r in _records(runs["one"])} == {1}
    for name in ("adapter/adapter_config.json", "adapter/tokenizer.json", "loss.png", "manifest.json",
                 "checkpoints/step_000004/COMPLETE"):
        assert os.path.isfile(os.path.join(runs["two_cli"], name)), name


def test_micro_batches_that_do_not_divide_over_ranks(runs):
    """3 micro-batches over 2 ranks, then a 1-batch step (end of the epoch) in which rank 1 runs nothing."""
    _assert_same_training(runs["two_uneven"], runs["one_uneven"])
    assert [r["answer_tokens"] for r in _records(runs["two_uneven"])] == \
        [r["answer_tokens"] for r in _records(runs["one_uneven"])]


@pytest.mark.parametrize("name, world_sizes", [("two_then_one", [2, 2, 1, 1]), ("one_then_two", [1, 1, 2, 2])])
def test_resume_on_another_number_of_ranks(runs, name, world_sizes):
    """The data cursor counts global micro-batches, so 2 steps on N ranks + 2 on M == 4 steps on one."""
    assert [r["world_size"] for r in _records(runs[name])] == world_sizes
    _assert_same_training(runs[name], runs["one"])


def test_resume_on_the_same_ranks_is_exact_with_dropout(runs):
    straight, split = _records(runs["two_dropout"]), _records(runs["two_dropout_split"])
    assert [r["loss"] for r in split] == [r["loss"] for r in straight] and len(split) == 4, (split, straight)
    a, b = _adapter(runs["two_dropout"]), _adapter(runs["two_dropout_split"])
    assert all(torch.equal(a[k], b[k]) for k in a), "adapters differ after resuming on 2 ranks"
    state = json.load(open(os.path.join(runs["two_dropout_split"], "checkpoints", "step_000004", "state.json")))
    assert len(state["rank_rng"]) == 2


def test_fsdp_shards_the_nf4_base_and_trains_as_one_process(runs):
    """FSDP2 (--fsdp): each rank holds half the frozen base (the NF4 bytes as float32 Parameters), and the
    uneven steps (rank 1 short in each) train exactly as one process with an NF4 base."""
    _assert_same_training(runs["two_fsdp"], runs["one_nf4_uneven"])
    for rank in (0, 1):
        with open(os.path.join(runs["two_fsdp"], f"summary_rank{rank}.json")) as f:
            summary = json.load(f)
        held, whole = summary["base_bytes_held"], summary["base_bytes_whole"]
        # dim-0 chunks: a rank holds ceil(rows / 2) or fewer rows of each tensor
        assert 0.4 * whole <= held <= 0.55 * whole, (rank, held, whole)


def test_fsdp_checkpoint_resumes_on_one_process(runs):
    """2 steps sharded on 2 ranks, then resumed whole on one process, equal 3 steps on one process."""
    assert [r["world_size"] for r in _records(runs["two_fsdp_then_one"])] == [2, 2, 1]
    _assert_same_training(runs["two_fsdp_then_one"], runs["one_nf4_uneven"])


def _worker(plan_path):
    """Under torchrun: the plan's runs in order, inside one process group (train() leaves it open)."""
    from minilora.trainer import train

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    with open(plan_path) as f:
        plan = json.load(f)
    for out, settings in plan["runs"]:
        summary = train(regen.recipe_config(plan["base"], plan["data"], out, **settings))
        with open(os.path.join(out, f"summary_rank{dist.get_rank()}.json"), "w") as f:
            json.dump(summary, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
