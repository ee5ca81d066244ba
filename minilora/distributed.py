"""Data-parallel LoRA training on several processes, launched by torchrun; PyTorch's own collectives.

    torchrun --nproc-per-node 2 train.py --model llama3-3b ...    # README.md, "Several GPUs"

torchrun starts one process per GPU and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
`setup` reads them, joins the process group (NCCL on CUDA, gloo on CPU) and pins the process to
cuda:LOCAL_RANK. Without WORLD_SIZE > 1 every function here is a no-op and the loop is the one-process loop.

One optimizer step on N ranks (trainer.optimizer_step):
  - every rank builds the same BatchOrder plan and walks the same data cursor, so every rank holds the step's
    global list of `grad_accum_steps` micro-batches; rank r runs micro-batches r, r+N, r+2N, ...;
  - the loss is divided by the answer tokens of the GLOBAL list, which each rank counts from the list it
    holds (the all_reduce of the token count that a rank-local data loader would need is not needed here);
  - then each rank's LoRA gradients and loss sum are summed over ranks in ONE flat all_reduce, so clipping,
    the NaN guard and AdamW see identical numbers on every rank and the adapters stay identical.
So N ranks compute one process's step at the same global batch (micro_batch_size x grad_accum_steps) up to
the order of float additions (tests/test_distributed.py: rtol 1e-5 in fp32). `grad_accum_steps` counts
GLOBAL micro-batches: N changes the speed, not the maths, and the data cursor (trainer.TrainState) counts
global micro-batches, so a checkpoint resumes on any number of ranks. Rank 0 alone writes metrics, logs,
the plot, checkpoints and the adapter; the others skip those writes and meet it at the next collective.

Why not DistributedDataParallel. DDP is the usual choice, and for LoRA it would do exactly the above:
all-reduce the trainable gradients after the last micro-batch. Wrapping the model fights this loop:
  1. DDP arms its reducer in `DDP.forward`; the loop calls `Transformer.loss` (fused linear + cross-entropy),
     never `forward`, so the loss would have to move into `forward`;
  2. accumulation needs `no_sync()` on all but the last micro-batch, while GraphedMicroSteps captures one CUDA
     graph per batch SHAPE and replays it at any position in the step: DDP's hooks inside the capture would
     all-reduce on every replay, or on none;
  3. DDP needs every rank to run a backward in every step; here a rank has no micro-batch when
     grad_accum_steps is not a multiple of N, or in an epoch's short last step;
  4. DDP broadcasts module buffers every forward by default, and the NF4 base lives in buffers.
What DDP would add is overlap of the all-reduce with the last backward. LoRA gradients are small next to a
step: Llama-3.2-3B, r=64 on all seven linears, is 97M fp32 values (~0.4 GB), an estimate of a few ms over
NVLink and some tens of ms over PCIe or a 100 Gb/s link per step (not measured: no GPU time this session).

Dropout. Rank r > 0 draws its own dropout masks (its RNG is reseeded from (seed, rank, step)); checkpoints
carry every rank's RNG state, so a resume on the same N is exact. On another N the masks differ from the
uninterrupted run (they would anyway: another rank runs each micro-batch). With lora_dropout=0, N ranks
match one process step for step.

FSDP2 (--fsdp). For a base too big for one card, `shard_base` applies PyTorch's `fully_shard` to every block
and to the model: each rank keeps 1/N of the frozen base and all-gathers one block's weights just before it
runs (forward, recompute, backward), then frees them. What it takes for QLoRA:
  1. fully_shard shards Parameters and leaves buffers whole on every rank; the NF4 bytes are a buffer. They
     become a frozen Parameter held in the model's float dtype (nf4.Linear4bit.hold_packed_as_parameter;
     bitsandbytes' `quant_storage`), so a sharded group is one dtype: one flat all-gather, and no dtype cast
     can touch the bytes. The per-block statistics (absmax, code) stay replicated buffers: with double
     quantization they are ~1/32 of the packed bytes.
  2. The LoRA weights are `ignored_params`: replicated plain tensors as above, summed by the same all_reduce,
     so the optimizer, clipping, checkpoints and the adapter file do not change with FSDP.
  3. The loop calls `Transformer.loss`, not `forward`: `register_fsdp_forward_method` gives it the root's
     hooks (the embeddings, final norm and head are sharded too).
  4. Every rank must run the same number of forwards, since each one all-gathers: a rank with fewer
     micro-batches in a step re-runs one at weight 0 (`Ranks.work`). CUDA graphs are off (the all-gathers
     would be captured).
The base is loaded and quantized on the GPU one tensor at a time and each quantized layer moved to host
memory (`load_model(..., quantize_device=)`): while loading, a rank's GPU holds one layer's float weight
and its quantization at a time (by construction; the loading peak was not measured separately on GPUs).
"""
import base64
import logging
import os

import torch
import torch.distributed as dist

from .errors import ConfigError

log = logging.getLogger(__name__)


class Ranks:
    """This process's place in the job: rank, world size, local rank. Ranks() is the one-process job.
    owns_group: `setup` joined the process group, so `teardown` leaves it (a caller's own group stays)."""

    def __init__(self, rank=0, world=1, local_rank=0, owns_group=False):
        self.rank, self.world, self.local_rank, self.owns_group = rank, world, local_rank, owns_group

    @property
    def main(self):
        """True on the process that writes files (rank 0)."""
        return self.rank == 0

    lockstep = False  # FSDP: every rank must run as many forwards as the others (shard_base sets it)

    def shard(self, micro):
        """This rank's micro-batches of a step: r, r+N, ... (spreads a short last step over the ranks)."""
        return micro[self.rank::self.world]

    def work(self, micro):
        """(batch, weight) pairs this rank runs in a step: its share at weight 1, and in lockstep as many
        weight-0 re-runs of the step's first micro-batch as it is short of the busiest rank."""
        mine = [(batch, 1.0) for batch in self.shard(micro)]
        if self.lockstep:
            mine += [(micro[0], 0.0)] * (-(-len(micro) // self.world) - len(mine))
        return mine


def setup(device):
    """(Ranks, device) from torchrun's environment; joins the process group when WORLD_SIZE > 1.

    device: the device resolved from --device; on CUDA each rank gets cuda:LOCAL_RANK.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(f"--device {device} under torchrun: each rank uses cuda:LOCAL_RANK; pass --device "
                              "cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES.")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} but this node sees {torch.cuda.device_count()} GPUs: "
                              "--nproc-per-node must not exceed the GPUs of a node.")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    if rank != 0:  # one copy of the logs: the others say only what went wrong
        logging.getLogger("minilora").setLevel(logging.WARNING)
    log.info("rank %d of %d on %s (%s)", rank, world, device, dist.get_backend())
    return Ranks(rank, world, local_rank, owns_group), device


def teardown(ranks):
    """Wait for rank 0's final writes, then leave the process group if `setup` joined it."""
    if ranks.world > 1:
        dist.barrier()
        if ranks.owns_group:
            dist.destroy_process_group()


def broadcast_parameters(ranks, params):
    """Rank 0's values everywhere (what DDP's constructor does): the starting point must be one adapter."""
    if ranks.world > 1:
        with torch.no_grad():
            for p in params:
                dist.broadcast(p, src=0)


def check_same(ranks, what, value):
    """ConfigError on every rank unless all ranks hold the same `value` (e.g. nodes with different copies of
    the data would each draw another batch plan, and the summed gradient would belong to no dataset)."""
    if ranks.world == 1:
        return
    values = [None] * ranks.world
    dist.all_gather_object(values, value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise ConfigError(f"{what} differs between rank 0 and rank(s) {differ}: every node must see the same "
                          "files (--model, --data).")


def sum_over_ranks(ranks, params, loss_sum):
    """Sum every rank's gradients (in place, in .grad) and loss sum in one flat all_reduce; returns the loss sum.

    Each rank already divided its micro-batches' losses by the GLOBAL token count, so the sum is the
    gradient of the global step. A rank that ran no micro-batch contributes zeros.
    """
    if ranks.world == 1:
        return loss_sum
    for p in params:
        if p.grad is None:  # zero_grad(set_to_none=True) and no backward on this rank this step
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1).float() for p in params] + [loss_sum.reshape(1).float()])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return flat[-1]


def gather_rng_states(ranks):
    """Every rank's torch RNG states (CPU and its own GPU), base64 strings for state.json; [] on one process."""
    if ranks.world == 1:
        return []
    mine = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mine["cuda"] = torch.cuda.get_rng_state()  # the current device: cuda:LOCAL_RANK
    mine = {k: base64.b64encode(v.numpy().tobytes()).decode() for k, v in mine.items()}
    states = [None] * ranks.world
    dist.all_gather_object(states, mine)
    return states


def set_rank_rng(ranks, states, seed, step):
    """Give rank r > 0 its own dropout stream before the loop; rank 0 keeps the one-process stream.

    states: every rank's RNG from the checkpoint being resumed (gather_rng_states), or None on a fresh start.
    Rank r takes its saved state when the checkpoint came from the same number of ranks (exact resume),
    else a stream seeded from (seed, rank, step). load_checkpoint already gave every rank rank 0's states.
    """
    if ranks.rank == 0:
        return
    if not states or len(states) != ranks.world:
        torch.manual_seed(hash((seed, ranks.rank, step)) & (2**63 - 1))  # an int tuple's hash is not salted
        return
    for key, value in states[ranks.rank].items():
        state = torch.frombuffer(bytearray(base64.b64decode(value)), dtype=torch.uint8)
        if key == "cpu":
            torch.set_rng_state(state)
        else:
            torch.cuda.set_rng_state(state)


def shard_base(ranks, model, trainable, device):
    """FSDP2: shard the frozen base of `model` over the ranks (see the module docstring); `trainable` (the LoRA
    parameters) stay whole on every rank, moved to `device`. Returns (bytes of frozen parameters this rank
    holds, bytes of all of them); (n, n) on one process, where nothing is sharded."""
    if ranks.world == 1:
        return base_bytes(model), base_bytes(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from .nf4 import Linear4bit

    storage = next(p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad)
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.hold_packed_as_parameter(storage)
    mesh = init_device_mesh(device.type, (ranks.world,))
    ignored = set(trainable)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored, reshard_after_forward=False)
    register_fsdp_forward_method(model, "loss")
    with torch.no_grad():
        for p in trainable:
            p.data = p.data.to(device)
    ranks.lockstep = True
    return base_bytes(model, local=True), base_bytes(model)


def base_bytes(model, local=False):
    """Bytes of the frozen parameters: the whole tensors, or with local=True this rank's FSDP shards."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        if not p.requires_grad:
            t = p.to_local() if local and isinstance(p, DTensor) else p
            total += t.numel() * t.element_size()
    return total
