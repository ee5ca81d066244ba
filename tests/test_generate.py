"""minilora.generate vs transformers' generate on tiny random checkpoints of every family (fp32, CPU).

References: `transformers` greedy `generate` one prompt at a time (no padding involved), its
TopPLogitsWarper for the nucleus, and exact categorical probabilities for the sampler.
"""
import pytest
import torch

from minilora import load_model
from minilora.generate import (PROMPT_BUCKET, Decoder, argmax, generate, generate_text, left_pad, prefill_length,
                               sample, top_p_filter)
from tiny import FAMILIES, make_checkpoint

TEXTS = ["def add(a, b):", "x = [1", "SELECT * FROM users WHERE id = 1; for i in range(10):\n"]
NEW = 12  # longer than the sliding windows (5, 6) of the tiny Gemma 2/3 and Phi-3 configs


_PAIRS = {}


def _pair(family, tmp_path_factory):
    if family not in _PAIRS:
        directory = tmp_path_factory.mktemp(family)
        hf = make_checkpoint(family, directory, seed=10 + FAMILIES.index(family))
        model, tokenizer = load_model(str(directory), dtype=torch.float32, device="cpu")
        _PAIRS[family] = family, hf, model, tokenizer
    return _PAIRS[family]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """Every family: used for the greedy parity test."""
    return _pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=["llama", "gemma2"])  # plain, and sliding window + soft-capping
def some_pair(request, tmp_path_factory):
    return _pair(request.param, tmp_path_factory)


def hf_greedy(hf, prompt, new_tokens, stop_ids):
    """transformers' greedy continuation of one prompt, cut before its first stop id."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                          eos_token_id=list(stop_ids))[0, len(prompt):].tolist()
    return out[:next((i for i, t in enumerate(out) if t in stop_ids), len(out))]


def test_ragged_batch_greedy_matches_transformers(pair):
    family, hf, model, tok = pair
    prompts = [tok.encode(t, add_special_tokens=True) for t in TEXTS]
    assert len({len(p) for p in prompts}) == 3  # really ragged
    expected = [hf_greedy(hf, p, NEW, tok.stop_ids) for p in prompts]
    batched = generate(model, prompts, NEW, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    one_by_one = [generate(model, [p], NEW, stop_ids=tok.stop_ids, pad_id=tok.pad_id)[0] for p in prompts]
    assert batched == expected, family
    assert one_by_one == expected, family


def test_each_row_stops_at_its_own_stop_id(some_pair):
    family, hf, model, tok = some_pair
    prompts = [tok.encode(t, add_special_tokens=True) for t in TEXTS]
    free = [hf_greedy(hf, p, NEW, [tok.eos_id]) for p in prompts]
    stop_ids = [tok.eos_id, free[0][4]]  # a token row 0 emits mid-way; the other rows may or may not emit it
    expected = [hf_greedy(hf, p, NEW, stop_ids) for p in prompts]
    assert len(expected[0]) <= 4
    assert generate(model, prompts, NEW, stop_ids=stop_ids, pad_id=tok.pad_id) == expected, family


def test_stop_strings_cut_text_and_ids(some_pair):
    family, hf, model, tok = some_pair
    prompts = [tok.encode(t, add_special_tokens=True) for t in TEXTS]
    free = [hf_greedy(hf, p, NEW, [tok.eos_id]) for p in prompts]
    texts = [tok.decode(ids) for ids in free]
    stop = texts[1][len(texts[1]) // 2:][:2]  # two characters from the middle of row 1's completion
    assert stop
    ids = generate(model, prompts, NEW, stop_ids=[tok.eos_id], stop_strings=[stop], tokenizer=tok,
                   pad_id=tok.pad_id, check_every=3)
    for row, text in enumerate(texts):
        if stop in text:  # ids end with the token that completes the stop string
            assert stop in tok.decode(ids[row]) and stop not in tok.decode(ids[row][:-1]), (family, row)
            assert free[row][:len(ids[row])] == ids[row]
        else:
            assert ids[row] == free[row], (family, row)
    completions = generate_text(model, tok, TEXTS, NEW, batch_size=2, stop_strings=[stop])
    assert completions == [t[:t.find(stop)] if stop in t else t for t in texts], family


def test_stop_string_before_a_stop_id_in_the_same_check_window(some_pair):
    from minilora.generate import _check_stop_strings

    _, _, _, tok = some_pair
    ids = tok.encode("x = [1, 2, 3]\ny = {'a': 1}") + [tok.eos_id] + tok.encode("for i in range")
    expected = next(k for k in range(1, len(ids)) if "2, 3" in tok.decode(ids[:k]))
    out = torch.tensor([ids, ids[::-1]])  # row 1: reversed, no "2, 3" before its stop id
    finished, cut = torch.tensor([True, False]), [None, None]  # row 0 already saw its stop id in this window
    _check_stop_strings(out, finished, cut, len(ids), len(ids), {tok.eos_id}, tok, ["2, 3"])
    assert cut == [expected, None] and finished.tolist() == [True, False]


def test_max_new_tokens_and_bad_arguments(some_pair):
    _, _, model, tok = some_pair
    prompts = [tok.encode(t, add_special_tokens=True) for t in TEXTS]
    assert [len(ids) for ids in generate(model, prompts, 3, stop_ids=[], pad_id=tok.pad_id)] == [3, 3, 3]
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [prompts[0], []], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompts, 0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompts, 3, temperature=1.0, top_p=0.0)


def test_argmax_gives_the_first_maximum_as_torch_does():
    """The chunked argmax (first reduction spread over the GPU) against torch.argmax, ties included."""
    gen = torch.Generator().manual_seed(3)
    for V in (512, 1000, 32064, 128256):  # 1000: no chunking (no chunk count of >= 16 tokens divides it)
        logits = torch.randn(4, V, generator=gen)
        logits[1, [7, V // 2, V - 1]] = 100.0  # a tie across chunks: the first chunk's wins
        logits[2, [V - 2, V - 1]] = 100.0  # a tie inside the last chunk
        logits[3] = 0.0  # every token ties
        assert torch.equal(argmax(logits), logits.argmax(-1)), V
        assert argmax(logits).tolist()[1:] == [7, V - 2, 0]


def test_padding_prompts_to_a_bucket_leaves_the_prefill_logits(some_pair):
    """With CUDA graphs, prompts are left-padded to a multiple of PROMPT_BUCKET (one captured prefill serves
    every length in the bucket). Padding is a segment of its own, so the logits are the unpadded ones."""
    _, _, model, tok = some_pair
    prompts = [tok.encode(t, add_special_tokens=True) for t in TEXTS]
    B, longest = len(prompts), max(map(len, prompts))
    assert longest < PROMPT_BUCKET
    assert prefill_length(B, longest, use_graph=False) == longest
    assert prefill_length(B, longest, use_graph=True) == PROMPT_BUCKET
    assert prefill_length(64, 100, use_graph=True) == 100  # 64 x 128 tokens: eager, no padding
    decoder = Decoder(model, B, 2 * PROMPT_BUCKET)
    with torch.no_grad():
        plain = decoder.prefill(*left_pad(prompts, tok.pad_id, "cpu"))
        padded = decoder.prefill(*left_pad(prompts, tok.pad_id, "cpu", length=PROMPT_BUCKET))
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)  # fp32: only the summation order differs


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text"])  # plain; window, softcap; q/k norms, local RoPE
def test_decoding_through_the_attention_kernels_keeps_greedy_tokens(family, tmp_path_factory, monkeypatch):
    """On CUDA a one-token step attends through decode_attention_fused.py (one launch per block); here the
    same kernel runs in Triton's CPU interpreter (fp32) and must give the tokens of the torch path (RoPE, cache
    write, SDPA)."""
    from minilora.generate import StaticKVCache
    from minilora.model import triton_ops

    _, _, model, tok = _pair(family, tmp_path_factory)
    prompts = [tok.encode(t, add_special_tokens=True) for t in TEXTS]
    expected = generate(model, prompts, NEW, stop_ids=[], pad_id=tok.pad_id)
    monkeypatch.setattr(StaticKVCache, "decodes_in_kernels", lambda self, x: True)
    ops, calls = triton_ops(), []
    attend = ops["decode_attention_fused"]
    monkeypatch.setitem(ops, "decode_attention_fused", lambda *args, **kw: calls.append(1) or attend(*args, **kw))
    assert generate(model, prompts, NEW, stop_ids=[], pad_id=tok.pad_id) == expected
    assert len(calls) == (NEW - 1) * len(model.model.layers)  # every decode step, every layer


def test_decoder_made_under_inference_mode_runs_outside_it(some_pair):
    """generate() makes decoders under inference mode (their static buffers are inference tensors, which only
    inference mode may write); a caller reusing one outside it still gets logits, not a RuntimeError."""
    _, _, model, tok = some_pair
    prompts = [tok.encode(TEXTS[0], add_special_tokens=True)]
    with torch.inference_mode():
        decoder = Decoder(model, 1, PROMPT_BUCKET)
        expected = decoder.prefill(*left_pad(prompts, tok.pad_id, "cpu")).clone()
    logits = decoder.prefill(*left_pad(prompts, tok.pad_id, "cpu"))
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    first = torch.tensor([int(logits.argmax())])
    assert decoder.step(first, torch.tensor([len(prompts[0])])).shape == logits.shape


def test_top_p_filter_matches_transformers_warper():
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.randn(6, 50) * 3
    for p in (0.05, 0.3, 0.9, 0.99):
        expected = TopPLogitsWarper(top_p=p)(None, logits.clone())
        got = top_p_filter(logits, p)
        assert torch.equal(got.isinf(), expected.isinf()), p
        assert torch.equal(got[~got.isinf()], logits[~got.isinf()])


def test_sampler_draws_from_the_tempered_nucleus():
    """20,000 draws at T=0.7, top-p 0.8: frequencies within 4 sigma of the exact probabilities."""
    logits = torch.randn(1, 12) * 2
    temperature, top_p, n = 0.7, 0.8, 20_000
    probs = (logits / temperature).softmax(-1)[0]
    order = probs.argsort(descending=True)
    before = probs[order].cumsum(0) - probs[order]
    keep = torch.zeros(12, dtype=torch.bool)
    keep[order[before < top_p]] = True
    exact = torch.where(keep, probs, 0.0) / probs[keep].sum()
    gen = torch.Generator().manual_seed(1)
    draws = sample(logits.expand(n, 12), temperature, top_p, gen)
    freq = torch.bincount(draws, minlength=12).float() / n
    sigma = (exact * (1 - exact) / n).sqrt()
    assert torch.all((freq - exact).abs() <= 4 * sigma + 1e-9), (freq, exact)
    assert torch.all(freq[~keep] == 0)


def test_seeded_sampling_is_reproducible_and_tiny_top_p_is_greedy(some_pair):
    family, _, model, tok = some_pair
    prompts = [tok.encode(t, add_special_tokens=True) for t in TEXTS]

    def sampled(seed, **kw):
        return generate(model, prompts, NEW, temperature=1.0, generator=torch.Generator().manual_seed(seed),
                        stop_ids=[], pad_id=tok.pad_id, **kw)

    assert sampled(0) == sampled(0)
    assert sampled(0) != sampled(1)
    greedy = generate(model, prompts, NEW, stop_ids=[], pad_id=tok.pad_id)
    assert sampled(2, top_p=1e-6) == greedy, family


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_cuda_graph_decode_matches_eager_and_transformers(family, device, tmp_path):
    hf = make_checkpoint(family, tmp_path, seed=5).to(device)
    model, tok = load_model(str(tmp_path), dtype=torch.float32, device=device)
    torch.backends.cuda.matmul.allow_tf32 = False
    prompts = [tok.encode(t, add_special_tokens=True) for t in TEXTS]
    graphed = generate(model, prompts, NEW, stop_ids=tok.stop_ids, pad_id=tok.pad_id, use_graph=True)
    eager = generate(model, prompts, NEW, stop_ids=tok.stop_ids, pad_id=tok.pad_id, use_graph=False)
    assert graphed == eager
    assert generate(model, prompts, NEW, stop_ids=tok.stop_ids, pad_id=tok.pad_id, use_graph=True, compile=True) == eager
    with torch.no_grad():
        expected = [hf.generate(torch.tensor([p], device=device), max_new_tokens=NEW, do_sample=False,
                                pad_token_id=0, eos_token_id=tok.stop_ids)[0, len(p):].tolist() for p in prompts]
    expected = [e[:next((i for i, t in enumerate(e) if t in tok.stop_ids), len(e))] for e in expected]
    assert graphed == expected
    # A second batch of the same shape reuses the captured graph: still right.
    completions = generate_text(model, tok, TEXTS[::-1], NEW, batch_size=3)
    assert completions == [tok.decode(e) for e in expected[::-1]]


@pytest.mark.gpu
def test_cuda_graph_decode_with_nf4_weights(device, tmp_path):
    pytest.importorskip("minilora.nf4")
    make_checkpoint("llama", tmp_path, seed=6)
    model, tok = load_model(str(tmp_path), dtype=torch.bfloat16, device=device, quantize="nf4")
    prompts = [tok.encode(t, add_special_tokens=True) for t in TEXTS]
    graphed = generate(model, prompts, NEW, stop_ids=[], pad_id=tok.pad_id, use_graph=True)
    eager = generate(model, prompts, NEW, stop_ids=[], pad_id=tok.pad_id, use_graph=False)
    assert graphed == eager
    assert all(len(ids) == NEW for ids in graphed)
    # torch.compile'd step inside the graph: fused element-wise kernels; bf16 rounding may differ slightly.
    compiled = generate(model, prompts, NEW, stop_ids=[], pad_id=tok.pad_id, use_graph=True, compile=True)
    agree = sum(a == b for x, y in zip(compiled, eager) for a, b in zip(x, y)) / (len(TEXTS) * NEW)
    assert agree >= 0.9, agree


@pytest.mark.gpu
def test_cuda_graph_greedy_through_the_screened_head(device, tmp_path, monkeypatch):
    """The in-graph greedy loop gives the tokens of the logits loop (eager sampling code at temperature 0), and
    with the int8-screened head the same tokens again (bf16 logits: the screen rounds its exact ones alike)."""
    import minilora.generate as G

    make_checkpoint("llama", tmp_path, seed=6)
    model, tok = load_model(str(tmp_path), dtype=torch.bfloat16, device=device, quantize="nf4")
    prompts = [tok.encode(t, add_special_tokens=True) for t in TEXTS]
    stop_ids = list(tok.stop_ids)
    monkeypatch.setattr(G, "SCREENED_HEAD", False)
    plain = [generate(model, [p], NEW, stop_ids=stop_ids, pad_id=tok.pad_id)[0] for p in prompts]
    many = stop_ids + [tok.vocab_size + i for i in range(G.MAX_STOP_IDS)]  # more than the buffer: the logits loop
    logits_loop = [generate(model, [p], NEW, stop_ids=many, pad_id=tok.pad_id)[0] for p in prompts]
    assert plain == logits_loop
    monkeypatch.setattr(G, "SCREENED_HEAD", True)
    decoder = G.make_decoder(model, 1, PROMPT_BUCKET + NEW)
    assert decoder.head is not None
    screened = [generate(model, [p], NEW, stop_ids=stop_ids, pad_id=tok.pad_id, decoder=decoder)[0] for p in prompts]
    assert screened == plain


def test_generation_benchmark_logic_on_cpu(tmp_path):
    """benchmarks/generate.py --tiny: both stacks load the same checkpoint, agree, and the table is written."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "generate.py")
    spec = importlib.util.spec_from_file_location("benchmark_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = tmp_path / "RESULTS.md"
    assert bench.main(["--tiny", "--repeats", "1", "--workdir", str(tmp_path), "--results", str(results)]) == 0
    text = results.read_text()
    assert "Outputs agree (nf4, prefill logits of 2 prompts): yes" in text
    assert text.count("\n| nf4 | ") == 2 and "Scoring run" in text


def test_decoder_joins_nf4_projections_and_greedy_output_is_unchanged(tmp_path):
    """A Decoder joins each block's 4-bit q/k/v and gate/up (one matmul each); greedy tokens equal those of
    the model's own forward run before any joining (full recomputation per token, no cache)."""
    make_checkpoint("qwen2", tmp_path, seed=7)  # q/k/v biases: the joined bias
    model, tok = load_model(str(tmp_path), dtype=torch.float32, device="cpu", quantize="nf4")
    prompt = tok.encode(TEXTS[0], add_special_tokens=True)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(NEW):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert all(block.self_attn.joined_qkv is None for block in model.model.layers)
    out = generate(model, [prompt], NEW, stop_ids=[], pad_id=tok.pad_id)
    assert all(block.self_attn.joined_qkv is not None and block.mlp.joined_gate_up is not None
               and block.self_attn.joined_o is not None and block.mlp.joined_down is not None
               for block in model.model.layers)
    assert out == [ids[len(prompt):]]


def test_lora_applied_after_joining_takes_the_layers_own_path(tmp_path):
    """evaluate.py's order: the base model decodes (its projections joined), then an adapter wraps the layers:
    the joined matmul no longer applies (LoRA would be skipped), the next decoder drops the stale joins, and a
    zero-initialised adapter leaves the greedy tokens as they were."""
    from minilora.lora import apply_lora

    make_checkpoint("llama", tmp_path, seed=8)
    model, tok = load_model(str(tmp_path), dtype=torch.float32, device="cpu", quantize="nf4")
    prompts = [tok.encode(t, add_special_tokens=True) for t in TEXTS]
    base = generate(model, prompts, NEW, stop_ids=[], pad_id=tok.pad_id)
    attn = model.model.layers[0].self_attn
    assert attn.joined_qkv is not None
    apply_lora(model, r=4, alpha=8)
    with torch.no_grad():
        assert not attn.joined_qkv.applies_to(attn.q_proj, attn.k_proj, attn.v_proj)
    assert generate(model, prompts, NEW, stop_ids=[], pad_id=tok.pad_id) == base
    assert all(block.self_attn.joined_qkv is None and block.mlp.joined_gate_up is None
               and block.self_attn.joined_o is None and block.mlp.joined_down is None
               for block in model.model.layers)


def test_greedy_through_the_screened_head_keeps_the_tokens(monkeypatch, tmp_path):
    """Greedy tokens from the lm_head's int8 screen (minilora/kernels/greedy_head.py, under the interpreter
    here) equal those of the full logits, batched and ragged, with stop ids; the screen is made once per weight
    and made again when the weight changes."""
    import minilora.generate as G

    make_checkpoint("llama", tmp_path, seed=9)
    model, tok = load_model(str(tmp_path), dtype=torch.float32, device="cpu")
    prompts = [tok.encode(t, add_special_tokens=True) for t in TEXTS]
    plain = generate(model, prompts, NEW, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    monkeypatch.setattr(G, "use_triton", lambda x: True)  # only the head's choice: the blocks stay on torch
    monkeypatch.setattr(G, "SCREEN_MAX_BATCH", 16)  # the kernel takes up to 16 rows (generate uses it at 1)
    monkeypatch.setattr(G, "SCREENED_HEAD", True)  # MINILORA_SCREENED_HEAD=1
    decoder = G.make_decoder(model, len(prompts), 64 + NEW)
    assert decoder.head is not None
    assert generate(model, prompts, NEW, stop_ids=tok.stop_ids, pad_id=tok.pad_id, decoder=decoder) == plain
    assert G.screened_head(model, 1) is decoder.head  # kept on the model for the next decoder
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # a new weight: a new screen, and other tokens
    flipped = generate(model, prompts, NEW, stop_ids=tok.stop_ids, pad_id=tok.pad_id, use_graph=False)
    assert G.screened_head(model, 1) is not decoder.head
    monkeypatch.setattr(G, "use_triton", lambda x: False)
    assert generate(model, prompts, NEW, stop_ids=tok.stop_ids, pad_id=tok.pad_id) == flipped
    assert G.screened_head(model, 17) is None
    from minilora.lora import apply_lora

    monkeypatch.setattr(G, "use_triton", lambda x: True)
    apply_lora(model, r=4, alpha=8, targets=["lm_head"])
    assert G.screened_head(model, 1) is None  # a LoRA-wrapped head: its logits, not the base weight's


def test_more_stop_ids_than_the_greedy_buffer_takes_the_logits_loop(some_pair):
    """Greedy decoding tests stops on the device against MAX_STOP_IDS ids; with more it runs the logits loop,
    which gives the same tokens (temperature 0 there is the same argmax)."""
    from minilora.generate import MAX_STOP_IDS

    family, hf, model, tok = some_pair
    prompts = [tok.encode(t, add_special_tokens=True) for t in TEXTS]
    many = list(tok.stop_ids) + [tok.vocab_size + i for i in range(MAX_STOP_IDS)]  # ids no model emits
    assert generate(model, prompts, NEW, stop_ids=many, pad_id=tok.pad_id) == generate(
        model, prompts, NEW, stop_ids=tok.stop_ids, pad_id=tok.pad_id), family
    decoder = Decoder(model, 1, PROMPT_BUCKET)
    with pytest.raises(ValueError, match=f"{MAX_STOP_IDS + 1} stop ids"):
        decoder.start_greedy(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                             list(range(MAX_STOP_IDS + 1)), 0)
