"""Programmatic dependent launch (PDL, Hopper and later): a decode kernel starts while the one before it ends.

A batch-1 decode step is ~300 small kernels in a row; each waits for the previous one to finish, drain and
flush before its first instruction runs, then waits again for its first weight bytes to arrive from memory.
With PDL a kernel launched with `launch_pdl=True` may start once every program of the kernel before it has
called `let_dependents_start` (or exited); it then loads what does not depend on that kernel (the 4-bit
weights), and calls `wait_for_inputs` (griddepcontrol.wait: the previous kernel has completed and its writes
are visible) before it reads the activations or writes anything. A kernel that calls `let_dependents_start`
but is followed by an ordinary launch changes nothing: the next kernel waits as always.

Rules for a kernel launched with PDL: nothing before `wait_for_inputs` may read what earlier kernels write
or write anything at all (its output may reuse memory the previous kernel still reads). Every such kernel
waits, so "kernel i completed" still implies "kernel i - 1 completed".

On by default where it exists (compute capability 9.0+, a real GPU); MINILORA_PDL=0 turns it off, and
Triton's CPU interpreter never uses it (no inline PTX there).
"""
import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` should be launched with PDL (and their PDL constexpr set)."""
    if INTERPRET or device.type != "cuda" or os.environ.get("MINILORA_PDL", "1") == "0":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Block until the previous kernel has completed and its writes are visible (no-op without PDL)."""
    if PDL:
        gdc_wait()


@triton.jit
def let_dependents_start(PDL: tl.constexpr):
    """Allow the next kernel, if launched with PDL, to start its programs now (no-op without PDL)."""
    if PDL:
        gdc_launch_dependents()
