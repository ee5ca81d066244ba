"""The greedy bookkeeping kernel (minilora/kernels/greedy_advance.py) vs its torch reference, state by state.

Fresh random states: rows already finished or not, tokens that hit a stop id or not, stop lists of 0 to 16 ids
(-1 padded as generate.py keeps them, and unpadded), output columns anywhere in the buffer. Every buffer the
step touches must come out equal to the reference's, and nothing else may change. CPU: the Triton interpreter;
`-m gpu`: the same checks on the device, and several steps replayed from a CUDA graph.
"""
import pytest
import torch

from minilora.kernels.greedy_advance import advance_greedy, advance_greedy_reference


def random_state(B, length, n_stop, padded, generator, device="cpu"):
    vocab = 50
    stop = torch.randperm(vocab, generator=generator)[:n_stop]
    stop_ids = torch.cat([stop, torch.full((16 - n_stop,), -1)]) if padded else stop
    token = torch.randint(0, vocab, (B,), generator=generator)
    if n_stop:  # make sure some rows hit a stop id
        hits = torch.rand(B, generator=generator) < 0.4
        token = torch.where(hits, stop[torch.randint(0, n_stop, (B,), generator=generator)], token)
    state = dict(token=token, out=torch.randint(0, vocab, (B, length), generator=generator),
                 column=torch.tensor(int(torch.randint(0, length, (1,), generator=generator))),
                 finished=torch.rand(B, generator=generator) < 0.3, pad=torch.tensor(vocab + 7),
                 stop_ids=stop_ids.long(), tokens=torch.randint(0, vocab, (B, 1), generator=generator),
                 positions=torch.randint(0, 1000, (B, 1), generator=generator),
                 slot=torch.tensor(int(torch.randint(0, 1000, (1,), generator=generator))))
    return {k: v.to(device) for k, v in state.items()}


def check(state):
    ours = {k: v.clone() for k, v in state.items()}
    expected = {k: v.clone() for k, v in state.items()}
    advance_greedy(**ours)
    advance_greedy_reference(**expected)
    for name in state:
        assert torch.equal(ours[name].cpu(), expected[name].cpu()), (name, ours[name], expected[name])
    return expected


@pytest.mark.parametrize("B", [1, 3, 8, 37])
@pytest.mark.parametrize("n_stop,padded", [(0, True), (0, False), (1, True), (3, False), (16, True)])
def test_matches_reference(B, n_stop, padded):
    generator = torch.Generator().manual_seed(1000 * B + 10 * n_stop + padded)
    for _ in range(3):
        state = random_state(B, 9, n_stop, padded, generator)
        expected = check(state)
        assert int(expected["slot"]) == int(state["slot"]) + 1  # the reference really moved things on
        if n_stop:
            newly = expected["finished"] & ~state["finished"]
            assert torch.equal(newly, torch.isin(state["token"], state["stop_ids"][state["stop_ids"] >= 0])
                               & ~state["finished"])


def test_rejects_bad_buffers():
    state = random_state(2, 5, 1, True, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="finished is"):
        advance_greedy(**{**state, "finished": state["finished"].long()})
    with pytest.raises(ValueError, match="positions is"):
        advance_greedy(**{**state, "positions": state["positions"][:, 0]})
    with pytest.raises(ValueError, match="out .*contiguous rows"):
        advance_greedy(**{**state, "out": state["out"].t().contiguous().t()})


@pytest.mark.gpu
def test_on_gpu_and_in_a_cuda_graph():
    generator = torch.Generator().manual_seed(7)
    for B in (1, 8):
        check(random_state(B, 12, 4, True, generator, "cuda"))
    state = random_state(4, 12, 4, True, generator, "cuda")
    state["column"].fill_(0)
    expected = {k: v.clone() for k, v in state.items()}
    advance_greedy(**{k: v.clone() for k, v in state.items()})  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        advance_greedy(**state)
    for _ in range(5):  # the graph reads column, slot and finished from memory on every replay
        graph.replay()
        advance_greedy_reference(**expected)
    torch.cuda.synchronize()
    for name in state:
        assert torch.equal(state[name], expected[name]), name
