"""A greedy decode step's bookkeeping in one launch: the new token into the output, finished rows, next inputs.

`advance_greedy(token, out, column, finished, pad, stop_ids, tokens, positions, slot)` does, in place, what
`advance_greedy_reference` does with nine torch ops:
    token = where(finished, pad, token)              (a finished row emits padding)
    out[:, column] = token                           (the output buffer's next column)
    finished |= token is one of stop_ids             (stop_ids padded with -1, never a token id)
    tokens[:, 0] = token; positions += 1             (the next step's inputs)
    slot += 1; column += 1                           (the KV-cache write slot and the output column)
token (B,) int64, out (B, L) int64, finished (B,) bool, tokens and positions (B, 1) int64; column, pad, slot
one-element int64 tensors; stop_ids (S,) int64. Nothing is read on the host, so a CUDA graph replays it.

Why: at batch 1 a decode step is ~200 kernels and each costs ~1-1.5 µs of launch and drain, whatever its size;
these nine ops were nine of them (minilora/generate.py's `Decoder._greedy_step` runs it after the head).

One program, one warp: row b's values are loaded and stored by the lanes that hold b; every lane reads the
scalars (slot, column) before a barrier and stores the same advanced value after it, so none reads a value
another lane has already advanced. Test: tests/test_greedy_advance.py.
"""
import os

import torch
import triton
import triton.language as tl

from minilora.kernels.pdl import let_dependents_start, pdl_enabled, wait_for_inputs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_ROWS = 1024


def advance_greedy_reference(token, out, column, finished, pad, stop_ids, tokens, positions, slot):
    token = torch.where(finished, pad, token)
    out.index_copy_(1, column.reshape(1), token[:, None])
    finished |= (token[:, None] == stop_ids).any(-1)  # torch.isin cannot be captured in a CUDA graph
    tokens.copy_(token[:, None])
    positions += 1
    slot += 1
    column += 1


@triton.jit
def _advance_greedy_kernel(token_ptr, out_ptr, column_ptr, finished_ptr, pad_ptr, stop_ptr, tokens_ptr,
                           positions_ptr, slot_ptr, B, out_stride, n_stop, B_PAD: tl.constexpr,
                           STOP_PAD: tl.constexpr, PDL: tl.constexpr):
    let_dependents_start(PDL)
    wait_for_inputs(PDL)
    b = tl.arange(0, B_PAD)
    row = b < B
    done = tl.load(finished_ptr + b, mask=row, other=0) != 0
    token = tl.where(done, tl.load(pad_ptr), tl.load(token_ptr + b, mask=row, other=0))
    column = tl.load(column_ptr)
    slot = tl.load(slot_ptr)
    position = tl.load(positions_ptr + b, mask=row, other=0)
    s = tl.arange(0, STOP_PAD)
    stops = tl.load(stop_ptr + s, mask=s < n_stop, other=-1)
    hit = tl.max((token[:, None] == stops[None, :]).to(tl.int32), axis=1) > 0
    tl.debug_barrier()  # every lane has read slot, column and its rows before any of them is written
    tl.store(out_ptr + b.to(tl.int64) * out_stride + column, token, mask=row)
    tl.store(finished_ptr + b, done | hit, mask=row)
    tl.store(tokens_ptr + b, token, mask=row)
    tl.store(positions_ptr + b, position + 1, mask=row)
    tl.store(slot_ptr, slot + 1)
    tl.store(column_ptr, column + 1)


def advance_greedy(token, out, column, finished, pad, stop_ids, tokens, positions, slot):
    """`advance_greedy_reference` in one Triton launch (CUDA, or the interpreter); see the module docstring."""
    who = "advance_greedy"
    if not (token.is_cuda or INTERPRET):
        raise ValueError(f"{who}: token is on {token.device}; the Triton kernel needs a CUDA tensor (or "
                         "TRITON_INTERPRET=1); use advance_greedy_reference")
    B = token.shape[0] if token.dim() == 1 else -1
    want = {"token": (token, (B,), torch.int64), "out": (out, (B, out.shape[-1]), torch.int64),
            "finished": (finished, (B,), torch.bool), "tokens": (tokens, (B, 1), torch.int64),
            "positions": (positions, (B, 1), torch.int64), "column": (column, (), torch.int64),
            "pad": (pad, (), torch.int64), "slot": (slot, (), torch.int64),
            "stop_ids": (stop_ids, (stop_ids.shape[0],), torch.int64)}
    if not 1 <= B <= MAX_ROWS:
        raise ValueError(f"{who}: token {tuple(token.shape)}, expected (B,) with 1 <= B <= {MAX_ROWS}")
    for name, (t, shape, dtype) in want.items():
        if tuple(t.shape) != shape or t.dtype != dtype or t.device != token.device:
            raise ValueError(f"{who}: {name} is {tuple(t.shape)} {t.dtype} on {t.device}, expected {shape} "
                             f"{dtype} on {token.device}")
    for name in ("token", "finished", "tokens", "positions", "stop_ids"):
        if not want[name][0].is_contiguous():
            raise ValueError(f"{who}: {name} must be contiguous")
    if out.stride(1) != 1:
        raise ValueError(f"{who}: out (strides {out.stride()}) needs contiguous rows")
    pdl = pdl_enabled(token.device)
    _advance_greedy_kernel[(1,)](token, out, column, finished, pad, stop_ids, tokens, positions, slot, B,
                                 out.stride(0), stop_ids.shape[0], B_PAD=triton.next_power_of_2(B),
                                 STOP_PAD=max(2, triton.next_power_of_2(stop_ids.shape[0])), PDL=pdl,
                                 num_warps=1, launch_pdl=pdl)
