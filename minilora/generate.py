"""Batched text generation with a preallocated KV cache: greedy or sampled, ragged prompts, stop ids and strings.

The shape of pytorch-labs/gpt-fast's generate.py: prefill the prompt once, then decode one token at a time
into a cache whose tensors never change shape, so on a GPU the decode step is captured once as a CUDA graph
and replayed (no Python or kernel-launch overhead per layer); `compile=True` also runs the step through
torch.compile inside the graph, fusing its element-wise kernels (it costs 10-40 s of compiling per shape;
measured gain: benchmarks/RESULTS.md). Reuse a decoder (`make_decoder`, as evaluate.py does) to skip the capture per call.
Graphs are captured without autograd, as generation runs (nf4.JoinedLinear4bit applies only then), and short
batches replay their prefill from a graph too (prompts padded to a multiple of PROMPT_BUCKET): an eager
prefill is bound by the host. On CUDA the step's attention runs in minilora/kernels/decode_attention_fused.py (the
StaticKVCache's `slot` and masking data are read by the kernel). Measured speeds: benchmarks/RESULTS.md.
Greedy output is checked against transformers' `generate` and batched output against one-prompt-at-a-time
output in tests/test_generate.py.

Greedy decoding (temperature 0) keeps its whole loop body in the captured step (`Decoder.greedy_step`): the
next token, its column of the output, the finished rows and the next positions are written on the device, so
replays follow each other with nothing launched between them. At batch 1 the token comes from the lm_head's
int8 screen (minilora/kernels/greedy_head.py): the int8 copy bounds every logit, and only the rows that could
still be the argmax are computed from the real weight, so the token is the one the full logits give while about
half the head's bytes are read (0.4 GB more memory for a 3B model's copy).

Ragged prompts are left-padded. Padding gets segment 0 and every real token segment 1, positions count real
tokens only (cumsum(valid) - 1), so by model.py's masking rule a padded row computes exactly what it would
alone. Decoded tokens continue each row's own positions.

Sampling: logits / temperature, then top-p (nucleus: the smallest set of tokens whose probability reaches
p, as transformers' TopPLogitsWarper), then a draw by the exponential race argmax(p / E), E ~ Exp(1), which
is a categorical sample without a GPU->CPU sync (gpt-fast). temperature=0 is greedy. With a seeded
`torch.Generator` a run is reproducible for the same batch composition; draws depend on how prompts are
batched, greedy output does not.
"""
import os
import time

import torch

from .model import KVCache, use_triton

CUDA_CHECK_EVERY = 16  # decode steps between GPU->CPU syncs that test "all rows finished" / stop strings
# With CUDA graphs the prefill is replayed from a graph too, for prompts padded to a multiple of PROMPT_BUCKET
# while batch x padded length <= PREFILL_GRAPH_TOKENS: there an eager prefill is bound by the host launching
# ~20 ops per layer (H200, Llama-3.2-3B shape, 128 tokens: 30-39 ms on the host for 5.7 ms of GPU work).
PROMPT_BUCKET, PREFILL_GRAPH_TOKENS = 64, 2048
MAX_STOP_IDS = 16  # greedy decoding tests each new token against a fixed-size buffer of stop ids
# Greedy tokens at up to SCREEN_MAX_BATCH rows come from the lm_head's int8 screen plus the exact logits of the
# rows it cannot rule out (minilora/kernels/greedy_head.py): half the head's bytes per step.
# Batch 1 only: at 8 rows the screen kernel took 0.32x the plain head's speed (benchmarks/RESULTS.md, H100).
# On by default (H100: the batch-1 step 1.789 -> 1.636 ms, same tokens); MINILORA_SCREENED_HEAD=0 turns it off.
SCREENED_HEAD, SCREEN_MAX_BATCH = os.environ.get("MINILORA_SCREENED_HEAD", "1") == "1", 1


# ---------------------------------------------------------------------------------------------- sampling

def top_p_filter(logits, top_p):
    """logits with every token outside the top-p nucleus set to -inf (at least the best token is kept)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the better tokens
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def argmax(logits):
    """logits.argmax(-1) for (B, V), the first index of the maximum as argmax gives it.

    torch reduces a row in one thread block (27 µs for V = 128k on an H200, 1% of a decode step); as
    (B, chunks, V / chunks) the first reduction spreads over the SMs, and ties still go to the lowest index
    (the first chunk holding the maximum, its first position there)."""
    B, V = logits.shape
    chunks = next((c for c in (256, 128, 64, 32) if V % c == 0 and V // c >= 16), 1)
    if chunks == 1:
        return logits.argmax(dim=-1)
    best, where = logits.reshape(B, chunks, V // chunks).max(dim=-1)
    chunk = best.argmax(dim=-1, keepdim=True)
    return (chunk * (V // chunks) + where.gather(-1, chunk)).squeeze(-1)


def sample(logits, temperature=0.0, top_p=1.0, generator=None):
    """Next token ids (B,) from logits (B, V): argmax when temperature is 0, else a temperature/top-p draw."""
    if temperature == 0.0:
        return argmax(logits)
    probs = top_p_filter(logits.float() / temperature, top_p).softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return argmax(probs / race)


def screened_head(model, batch_size):
    """The lm_head's int8 screen (minilora/kernels/greedy_head.py) when greedy tokens can come from it: Triton
    on CUDA, a plain head without soft-capping (tanh can tie logits the screen tells apart), at most
    SCREEN_MAX_BATCH rows. Made once per head weight and kept on the model; None otherwise."""
    head = model.lm_head
    if (not SCREENED_HEAD or type(head) is not torch.nn.Linear or model.config.final_logit_softcap is not None
            or batch_size > SCREEN_MAX_BATCH or not use_triton(head.weight)):
        return None  # a LoRA-wrapped head (no .weight of its own) takes the logits path
    weight = head.weight
    from minilora.kernels.greedy_head import screen_head

    key = (weight.data_ptr(), weight._version, weight.shape, weight.dtype)
    cached = getattr(model, "_screened_head", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            model._screened_head = cached = (key, screen_head(weight))
    return cached[1]


def greedy_tokens(model, hidden, head):
    """argmax(model.logits(hidden)) for hidden (B, D): through the int8 screen `head` when there is one, which
    reads half the head's bytes and still gives the same token (the exact logits of the few rows it keeps)."""
    if head is None:
        return argmax(model.logits(hidden))
    from minilora.kernels.greedy_head import greedy_tokens as screened_greedy_tokens

    return screened_greedy_tokens(hidden.contiguous(), model.lm_head.weight, head)


# ---------------------------------------------------------------------------------------------- the cache

class StaticKVCache(KVCache):
    """model.KVCache whose write position is a device tensor (`slot`) instead of a Python int.

    A CUDA graph replays the exact kernels it captured, so a Python slice `[length:length + T]` would be
    frozen at capture time; `index_copy_` at `slot + arange(T)` reads the slot from memory on every replay.
    `length` (the Python counter model.py advances) is not used here.
    """

    def __init__(self, config, batch_size, max_length, device, dtype):
        super().__init__(config, batch_size, max_length, device, dtype)
        self.slot = torch.zeros((), dtype=torch.long, device=device)
        self.slots = self.slot + torch.arange(1, device=device)  # this forward's write slots (append_positions)

    # model.py counts `cache.length += T`; here the count lives in `slot`. A constant 0 that ignores writes
    # keeps torch.compile from specialising (and recompiling) the step on a changing Python int.
    @property
    def length(self):
        return 0

    @length.setter
    def length(self, value):
        pass

    def decodes_in_kernels(self, x):
        return use_triton(x)  # the kernels read `slot` and the masking rule's positions/segments from memory

    def append_positions(self, positions, segments):
        # model.py calls this once per forward, before the layers: the slots are computed here once, not per
        # layer (two kernels fewer per layer in every decode step)
        T = positions.shape[1]  # one token: a view of the slot, no kernel at all
        self.slots = self.slot.reshape(1) if T == 1 else self.slot + torch.arange(T, device=self.slot.device)
        self.key_positions.index_copy_(1, self.slots, positions)
        self.key_segments.index_copy_(1, self.slots, segments)

    def update(self, layer_idx, k, v):
        self.keys[layer_idx].index_copy_(2, self.slots, k)
        self.values[layer_idx].index_copy_(2, self.slots, v)
        return self.keys[layer_idx], self.values[layer_idx]

    def clear(self):
        """Forget every slot (segment -1 is never attended to); keys/values are overwritten before use."""
        self.key_segments.fill_(-1)
        self.slot.zero_()


def join_projections(model):
    """Join each block's 4-bit q/k/v and gate/up layers into one 4-bit matmul each (`nf4.JoinedLinear4bit`),
    and give o_proj and down_proj the same form alone (for its fp32 absmax, which the GEMV reads faster).

    A decode step then makes 4 NF4 matmul launches per block instead of 7. Layers that are not plain
    Linear4bit (float weights, LoRA wrappers) stay as they are; joining again is a no-op."""
    from .nf4 import JoinedLinear4bit, Linear4bit

    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        for owner, attr, layers in ((attn, "joined_qkv", (attn.q_proj, attn.k_proj, attn.v_proj)),
                                    (attn, "joined_o", (attn.o_proj,)),
                                    (mlp, "joined_gate_up", (mlp.gate_proj, mlp.up_proj)),
                                    (mlp, "joined_down", (mlp.down_proj,))):
            joined = getattr(owner, attr)
            if joined is not None and joined.holds(*layers):
                continue
            setattr(owner, attr, None)  # a stale join (layers since wrapped by LoRA, moved) holds memory for nothing
            if all(type(layer) is Linear4bit for layer in layers):
                try:
                    setattr(owner, attr, JoinedLinear4bit(layers))
                except ValueError:  # layers that cannot share one weight (widths, dtypes, backends)
                    pass


class Decoder:
    """A KV cache for (batch_size, max_length) and the one-token decode step over it.

    With `use_graph` (CUDA only) the step is captured once as a CUDA graph and replayed for every token of
    every batch of the same shape; otherwise it runs eagerly. Both paths run the same code on the same
    static input tensors, so they compute the same thing. With graphs, the prefill of prompts padded by
    `prefill_length` is captured too, one graph per padded length, on first use. Captures run without
    autograd, as generation does (the joined 4-bit projections apply only then).
    """

    def __init__(self, model, batch_size, max_length, use_graph=False, compile=False):
        weight = model.model.embed_tokens.weight
        join_projections(model)
        self.model, self.batch_size, self.max_length = model, batch_size, max_length
        self.device = weight.device
        self.cache = StaticKVCache(model.config, batch_size, max_length, weight.device, weight.dtype)
        # The decode step's inputs live at fixed addresses; callers copy into them.
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.segments = torch.ones(batch_size, 1, dtype=torch.long, device=self.device)
        self.graph, self.compiled, self.use_graph = None, compile, use_graph
        self.prefills = {}  # padded prompt length -> (graph, input_ids, positions, segments, logits)
        # Greedy decoding keeps its whole loop body on the device (`greedy_step`): the token, the output
        # column, the finished rows and the next position are written by the step itself, so a replay follows
        # a replay with nothing launched between them.
        self.out = torch.zeros(batch_size, max_length, dtype=torch.long, device=self.device)
        self.column = torch.zeros((), dtype=torch.long, device=self.device)
        self.finished = torch.zeros(batch_size, dtype=torch.bool, device=self.device)
        self.pad = torch.zeros((), dtype=torch.long, device=self.device)
        self.stop_ids = torch.full((MAX_STOP_IDS,), -1, dtype=torch.long, device=self.device)
        self.greedy_graph, self.head = None, None if compile else screened_head(model, batch_size)
        # torch.compile fuses the step's many small element-wise kernels (norms, RoPE, residuals): on a GPU at
        # batch 1 those launches, not the weight reads, would otherwise bound a graph replay.
        self._step = torch.compile(self._forward_step, dynamic=False) if compile else self._forward_step
        if use_graph:
            self.pool = torch.cuda.graph_pool_handle()  # one memory pool for this decoder's graphs
            self.graph, self.logits = self._capture(self._step)

    def _forward_step(self):
        hidden = self.model.hidden_states(self.tokens, self.positions, self.segments, self.cache)
        return self.model.logits(hidden[:, -1])  # (B, V)

    def _greedy_step(self):
        """One greedy decode step with its bookkeeping, all on the device: feed `tokens`, write the next ones."""
        if self.compiled:  # the compiled step fuses the head with its neighbours; no screened head there
            token = argmax(self._step())
        else:
            hidden = self.model.hidden_states(self.tokens, self.positions, self.segments, self.cache)[:, -1]
            token = greedy_tokens(self.model, hidden, self.head)
        # the token into the output, finished rows, the next inputs: one kernel on the GPU, nine torch ops here
        from minilora.kernels.greedy_advance import advance_greedy, advance_greedy_reference

        advance = advance_greedy if use_triton(token) else advance_greedy_reference
        advance(token, self.out, self.column, self.finished, self.pad, self.stop_ids, self.tokens, self.positions,
                self.cache.slot)

    def _forward_prefill(self, input_ids, positions, segments):
        self.cache.clear()
        hidden = self.model.hidden_states(input_ids, positions, segments, self.cache)
        self.cache.slot.fill_(input_ids.shape[1])
        return self.model.logits(hidden[:, -1])

    @torch.no_grad()
    def _capture(self, forward, *inputs):
        """(graph, output) of `forward(*inputs)` captured on the current device; the cache is left cleared."""
        # Warm up on a side stream first (cuBLAS handles, Triton autotuning), as torch.cuda.graphs advises.
        self.cache.slot.fill_(self.max_length - 1)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                forward(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = forward(*inputs)
        self.cache.clear()  # the warm-up wrote a slot; make it invisible again
        return graph, output

    @torch.inference_mode()  # the static buffers may be inference tensors (made inside generate): copies need it
    def prefill(self, input_ids, positions, segments):
        """Run the padded prompts (B, P) into a cleared cache; logits (B, V) for the first new token.

        With graphs, replayed from one captured at the first call of this length if P is a length that
        `prefill_length` pads to."""
        P = input_ids.shape[1]
        if not self.use_graph or P % PROMPT_BUCKET or self.batch_size * P > PREFILL_GRAPH_TOKENS:
            return self._forward_prefill(input_ids, positions, segments)
        if P not in self.prefills:
            static = [t.clone() for t in (input_ids, positions, segments)]
            self.prefills[P] = (*self._capture(self._forward_prefill, *static), *static)
        graph, logits, *static = self.prefills[P]
        for buffer, value in zip(static, (input_ids, positions, segments)):
            buffer.copy_(value)
        graph.replay()
        return logits

    @torch.inference_mode()
    def start_greedy(self, first, positions, stop_ids, pad_id):
        """Set up `greedy_step` after a prefill: `first` (B,) the first new tokens (already padded where a row
        is finished), fed at `positions` (B,); rows stop at `stop_ids`. Returns the output buffer (B, max_length),
        whose column i the i-th `greedy_step` writes (column 0 is `first`)."""
        if len(stop_ids) > MAX_STOP_IDS:
            raise ValueError(f"generate: {len(stop_ids)} stop ids; greedy decoding takes at most {MAX_STOP_IDS}.")
        self.stop_ids.fill_(-1)
        self.stop_ids[:len(stop_ids)] = torch.tensor(sorted(stop_ids), dtype=torch.long)
        self.pad.fill_(pad_id)
        self.out[:, 0] = first
        self.finished.copy_((first[:, None] == self.stop_ids).any(-1))
        self.tokens.copy_(first[:, None])
        self.positions.copy_(positions[:, None])
        self.column.fill_(1)
        return self.out

    @torch.inference_mode()
    def greedy_step(self):
        """The next greedy token of every row into the output buffer (see `start_greedy`)."""
        if not self.use_graph:
            return self._greedy_step()
        if self.greedy_graph is None:
            self.greedy_graph = self._capture_greedy()
        self.greedy_graph.replay()

    @torch.no_grad()
    def _capture_greedy(self):
        """The greedy step as a CUDA graph, captured after a prefill: the warm-ups write the cache's last slot
        (unused until the last step, and made invisible again) and the step's state, which is restored."""
        cache = self.cache
        state = (self.out, self.column, self.finished, self.tokens, self.positions, cache.slot, cache.key_segments,
                 cache.key_positions)
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self.cache.slot.fill_(self.max_length - 1)
                self.column.fill_(self.max_length - 1)
                self._greedy_step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.cache.slot.fill_(self.max_length - 1)
        with torch.cuda.graph(graph, pool=self.pool):
            self._greedy_step()
        for buffer, value in zip(state, saved):
            buffer.copy_(value)
        return graph

    @torch.inference_mode()
    def step(self, tokens, positions):
        """Feed one token per row (B,) at `positions` (B,) into the next slot; logits (B, V)."""
        self.tokens.copy_(tokens[:, None])
        self.positions.copy_(positions[:, None])
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._step()
        self.cache.slot += 1
        return logits


# ---------------------------------------------------------------------------------------------- generate

def left_pad(prompts, pad_id, device, length=None):
    """(input_ids, positions, segments), each (B, P), for lists of token ids of different lengths; P is the
    longest prompt's length, or `length` (more left padding: segment 0 like the rest)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (got an empty prompt or no prompts).")
    P = max(max(len(p) for p in prompts), length or 0)
    input_ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), P, dtype=torch.bool)
    for row, ids in enumerate(prompts):
        input_ids[row, P - len(ids):] = torch.tensor(ids, dtype=torch.long)
        valid[row, P - len(ids):] = True
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), positions.to(device), valid.long().to(device)


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def _uses_graph(use_graph, model):
    return model.model.embed_tokens.weight.device.type == "cuda" if use_graph == "auto" else bool(use_graph)


def prefill_length(batch_size, prompt_length, use_graph):
    """The length prompts of at most `prompt_length` tokens are left-padded to: with CUDA graphs, the next
    multiple of PROMPT_BUCKET while the batch's padded tokens stay within PREFILL_GRAPH_TOKENS (one captured
    prefill per length serves many prompts); otherwise the longest prompt's length."""
    padded = _round_up(prompt_length, PROMPT_BUCKET)
    return padded if use_graph and batch_size * padded <= PREFILL_GRAPH_TOKENS else prompt_length


def make_decoder(model, batch_size, max_length, use_graph="auto", previous=None, compile=False):
    """A Decoder for this shape, reusing `previous` when it fits (same batch size and settings, long enough)."""
    use_graph = _uses_graph(use_graph, model)
    if (previous is not None and previous.batch_size == batch_size and previous.max_length >= max_length
            and previous.max_length <= 2 * max_length and (previous.graph is not None) == bool(use_graph)
            and previous.compiled == compile):
        return previous
    # Round the length up so batches of similar prompts share one cache and one captured graph.
    return Decoder(model, batch_size, _round_up(max_length, 64), use_graph=bool(use_graph), compile=compile)


def _finds_stop_string(tokenizer, ids, stop_strings):
    text = tokenizer.decode(ids)
    return any(s in text for s in stop_strings)


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, *, temperature=0.0, top_p=1.0, generator=None, stop_ids=(),
             stop_strings=(), tokenizer=None, pad_id=0, use_graph="auto", compile=False, decoder=None,
             check_every=None):
    """New token ids for each prompt (a list of token-id lists), in the prompts' order.

    A row stops at its first token in `stop_ids` (not included in the output), when its decoded text
    contains one of `stop_strings` (needs `tokenizer`; the ids are cut after the token that completes the
    string), or after `max_new_tokens`. All prompts run as one batch; pass a `decoder` from
    `make_decoder` to reuse its cache and CUDA graph across calls (a new one is made if it does not fit).
    """
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens}; expected >= 1.")
    if stop_strings and tokenizer is None:
        raise ValueError("generate: stop_strings need the tokenizer to decode with.")
    if not 0.0 < top_p <= 1.0 or temperature < 0.0:
        raise ValueError(f"generate: temperature={temperature} (expected >= 0), top_p={top_p} (expected in (0, 1]).")
    device = model.model.embed_tokens.weight.device
    longest = max((len(p) for p in prompts), default=1)
    P = prefill_length(len(prompts), longest, _uses_graph(use_graph, model))
    input_ids, positions, segments = left_pad(prompts, pad_id, device, length=P)
    B = input_ids.shape[0]
    decoder = make_decoder(model, B, P + max_new_tokens - 1, use_graph, previous=decoder, compile=compile)
    check_every = check_every or (CUDA_CHECK_EVERY if device.type == "cuda" else 1)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    lengths = positions[:, -1] + 1  # real tokens per row: the next position of each row
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    string_cut = [None] * B  # per row: number of ids kept once a stop string appeared
    stop_set = set(stop_ids)

    logits = decoder.prefill(input_ids, positions, segments)
    greedy = temperature == 0.0 and len(stop_set) <= MAX_STOP_IDS
    steps = max_new_tokens
    for i in range(max_new_tokens):
        if greedy:  # the step writes the token, its column of `out` and `finished` itself
            if i == 0:
                out = decoder.start_greedy(argmax(logits), lengths, stop_set, pad_id)
                finished = decoder.finished
            else:
                decoder.greedy_step()
        else:
            if i > 0:
                logits = decoder.step(out[:, i - 1], lengths + (i - 1))
            token = torch.where(finished, pad_id, sample(logits, temperature, top_p, generator))
            out[:, i] = token
            finished |= torch.isin(token, stop)
        # with no stop id or string no row can finish early: no reason to wait for the device
        if (stop_set or stop_strings) and ((i + 1) % check_every == 0 or i + 1 == max_new_tokens):
            if stop_strings:
                _check_stop_strings(out, finished, string_cut, i + 1, check_every, stop_set, tokenizer, stop_strings)
            if bool(finished.all()):
                steps = i + 1
                break

    results = []
    for row, ids in enumerate(out[:, :steps].tolist()):
        ids = ids[:string_cut[row]] if string_cut[row] is not None else ids
        cut = next((j for j, t in enumerate(ids) if t in stop_set), len(ids))
        results.append(ids[:cut])
    return results


def _check_stop_strings(out, finished, string_cut, n, check_every, stop_set, tokenizer, stop_strings):
    """Mark rows whose text (up to any stop id) now contains a stop string; keep the shortest such prefix of ids."""
    for row, ids in enumerate(out[:, :n].tolist()):
        if string_cut[row] is not None:
            continue
        ids = ids[:next((j for j, t in enumerate(ids) if t in stop_set), len(ids))]
        if ids and _finds_stop_string(tokenizer, ids, stop_strings):
            # Earlier checks saw no stop string in the first n - check_every ids, so the cut lies after them.
            start = max(1, min(n - check_every + 1, len(ids)))
            string_cut[row] = next(k for k in range(start, len(ids) + 1)
                                   if _finds_stop_string(tokenizer, ids[:k], stop_strings))
            finished[row] = True


def cut_at_stop_strings(text, stop_strings):
    """`text` up to (not including) the earliest of `stop_strings`."""
    ends = [text.find(s) for s in stop_strings if s in text]
    return text[:min(ends)] if ends else text


def generate_text(model, tokenizer, prompts, max_new_tokens, *, batch_size=16, temperature=0.0, top_p=1.0,
                  generator=None, stop_strings=(), use_graph="auto", compile=False, add_special_tokens=True,
                  progress=None, stats=None):
    """Completions (str) for prompts, batched by similar length, returned in the prompts' order.

    A prompt is a string, encoded as training encodes it (with the tokenizer's BOS), or a list of token ids
    used as they are (a chat template's rendering). Generation stops at the tokenizer's stop ids (EOS and
    the chat template's end-of-turn token), at `stop_strings` (cut from the text) or after `max_new_tokens`.
    `progress`, if given, is called with the number of prompts finished after each batch; `stats`, a dict,
    receives `new_tokens` (generated, stop tokens excluded) and `seconds`.
    """
    started, new_tokens = time.perf_counter(), 0
    prompts = list(prompts)
    texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    encoded = [list(p) if not isinstance(p, str) else None for p in prompts]
    for i, ids in zip(texts, tokenizer.encode_batch([prompts[i] for i in texts], add_special_tokens=add_special_tokens)):
        encoded[i] = ids
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths, little padding
    completions = [None] * len(encoded)
    decoder = None
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        longest = prefill_length(len(batch), len(encoded[batch[-1]]), _uses_graph(use_graph, model))
        decoder = make_decoder(model, len(batch), longest + max_new_tokens - 1, use_graph, previous=decoder,
                               compile=compile)
        ids = generate(model, [encoded[i] for i in batch], max_new_tokens, temperature=temperature, top_p=top_p,
                       generator=generator, stop_ids=tokenizer.stop_ids, stop_strings=stop_strings,
                       tokenizer=tokenizer, pad_id=tokenizer.pad_id, use_graph=use_graph, compile=compile,
                       decoder=decoder)
        for i, new in zip(batch, ids):
            completions[i] = cut_at_stop_strings(tokenizer.decode(new), stop_strings)
            new_tokens += len(new)
        if progress is not None:
            progress(len(batch))
    if stats is not None:
        stats.update(new_tokens=new_tokens, seconds=time.perf_counter() - started)
    return completions
