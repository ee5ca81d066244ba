"""Generation speed: minilora (preallocated KV cache, CUDA-graph decode step, NF4 kernels) vs HF transformers
+ bitsandbytes `generate`, in the same process on the same card and the same random weights.

Llama-3.2-3B shape (benchmarks/configs/llama3.2-3b.json), random weights written once in bf16 and loaded by
both stacks through their normal loaders, quantized to NF4 on load (bitsandbytes: nf4, double quantization,
bf16 compute). 128-token prompts, exactly 128 new tokens (no early stop: minilora gets no stop ids, HF gets
min_new_tokens=128), greedy, batch 1 and 8. tokens/s = batch x 128 / wall time of one whole generate call
(prefill included), after one full-length warm-up call; median of 3. Before timing, the prefill logits of the
two stacks are compared (cosine similarity, top-1 agreement). minilora is timed with its default decode
(CUDA graph) and with `compile=True` (torch.compile'd step inside the graph).

`--scoring` also times what evaluate.py does on CodeAlpaca at this size: 2,000 prompts whose lengths follow
the CodeAlpaca 2k sample's Alpaca prompts (characters / 4, about Llama 3's rate on English and code), at most
256 new tokens, batched by length. Random weights never emit EOS, so every row runs all 256 tokens: an
upper bound on the real time.

    python benchmarks/generate.py                 # GPU: the table, appended to benchmarks/RESULTS.md
    python benchmarks/generate.py --tiny          # CPU: a tiny model and budget, to check the logic
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
DATA = ""  # --data: the CodeAlpaca 2k sample, whose prompt lengths benchmarks/RESULTS.md's scoring runs copied
TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 128,
               "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 32, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
               "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
TARGETS = {("nf4", 1): 15.0, ("nf4", 8): 8.0}  # targets: speedup over HF + bitsandbytes NF4


def write_random_checkpoint(raw, directory, device):
    """Random weights (HF's init) for config dict `raw`, saved as a HF checkpoint plus a stub tokenizer."""
    if os.path.exists(os.path.join(directory, "config.json")):
        return
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = {k: v for k, v in raw.items() if k != "auto_map"}
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**raw), dtype=torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(raw["vocab_size"])}  # covers every id the config names (bos, eos)
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "t1", "bos_token": "t2", "pad_token": "t0"}, f)
    del model


def load_ours(directory, dtype, device, quantize):
    from minilora import load_model

    return load_model(directory, dtype=dtype, device=device, quantize=quantize)[0]


def load_hf(directory, dtype, device, quantize):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = None
    if quantize == "nf4":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=quant, dtype=dtype,
                                                attn_implementation="sdpa", device_map={"": device}).eval()


def random_prompts(vocab, batch, length, seed, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).to(device)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


_DECODERS = {}  # (model, batch, compile) -> the Decoder the warm-up call made, reused as evaluate.py reuses one


def ours_generate(model, prompts, new_tokens, compile=False, reuse=True):
    from minilora.generate import generate, make_decoder

    key = (id(model), prompts.shape[0], compile)
    decoder = make_decoder(model, prompts.shape[0], prompts.shape[1] + new_tokens - 1, previous=_DECODERS.get(key),
                           compile=compile) if reuse else None
    _DECODERS[key] = decoder
    return generate(model, prompts.tolist(), new_tokens, stop_ids=(), pad_id=0, compile=compile, decoder=decoder)


def ours_fresh_generate(model, prompts, new_tokens):
    """A new cache and CUDA graph in every call: what a caller that passes no decoder pays (capture included)."""
    return ours_generate(model, prompts, new_tokens, reuse=False)


def ours_compiled_generate(model, prompts, new_tokens):
    return ours_generate(model, prompts, new_tokens, compile=True)


def hf_generate(model, prompts, new_tokens):
    with torch.no_grad():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, prompts.shape[1]:].tolist()


def tokens_per_s(run, model, prompts, new_tokens, repeats, device):
    """Median tokens/s over `repeats` whole generate calls, after one full-length warm-up call."""
    out = run(model, prompts, new_tokens)
    assert all(len(row) == new_tokens for row in out), "a row stopped early"
    rates = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run(model, prompts, new_tokens)
        _sync(device)
        rates.append(prompts.numel() // prompts.shape[1] * new_tokens / (time.perf_counter() - start))
    return statistics.median(rates), min(rates), max(rates)


def agreement(ours, hf, prompts):
    """Cosine similarity and top-1 agreement of the two stacks' logits on the prompts."""
    with torch.no_grad():
        a = ours(prompts).float().flatten(0, 1)
        b = hf(input_ids=prompts).logits.float().flatten(0, 1)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()
    return {"min_cosine": cosine, "top1_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
            "max_abs_diff": (a - b).abs().max().item(), "ok": cosine > 0.99}


def scoring_lengths(n, scale, data=DATA):
    """Prompt lengths in tokens like CodeAlpaca's Alpaca prompts (characters / 4), `n` of them."""
    try:
        from minilora.data import format_prompt, load_records

        lengths = [max(8, len(format_prompt(r)) // 4) for r in load_records(data, skip_bad_rows=True)]
    except Exception:  # no data file: a plausible spread
        lengths = [40 + (37 * i) % 120 for i in range(2000)]
    return [max(4, int(lengths[i % len(lengths)] * scale)) for i in range(n)]


def time_scoring(model, lengths, new_tokens, batch_size, vocab, device):
    """Seconds to generate `new_tokens` for every prompt, batched by length as evaluate.py does."""
    from minilora.generate import generate, make_decoder

    g = torch.Generator().manual_seed(3)
    prompts = sorted((torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths), key=len)
    _sync(device)
    start, decoder, produced = time.perf_counter(), None, 0
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        decoder = make_decoder(model, len(batch), len(batch[-1]) + new_tokens - 1, previous=decoder)
        produced += sum(map(len, generate(model, batch, new_tokens, stop_ids=(), pad_id=0, decoder=decoder)))
    _sync(device)
    return time.perf_counter() - start, produced


def run(args):
    tiny = args.tiny
    device = "cpu" if tiny else "cuda"
    raw = TINY_CONFIG if tiny else json.load(open(os.path.join(HERE, "configs", "llama3.2-3b.json")))
    directory = os.path.join(args.workdir, "tiny-llama" if tiny else "llama3.2-3b")
    write_random_checkpoint(raw, directory, device)
    prompt_len, new_tokens, batches = (16, 8, (1, 2)) if tiny else (128, 128, (1, 8))
    weight_kinds = [("nf4", torch.float32 if tiny else torch.bfloat16)]
    if not tiny and not args.no_bf16:
        weight_kinds.append(("bf16", torch.bfloat16))
    rows, checks = [], {}
    for kind, dtype in weight_kinds:
        quantize = "nf4" if kind == "nf4" else None
        ours, hf = load_ours(directory, dtype, device, quantize), load_hf(directory, dtype, device, quantize)
        checks[kind] = agreement(ours, hf, random_prompts(raw["vocab_size"], 2, prompt_len, 0, device))
        print(kind, "agreement", checks[kind], flush=True)
        for batch in batches:
            prompts = random_prompts(raw["vocab_size"], batch, prompt_len, batch, device)
            mine = tokens_per_s(ours_generate, ours, prompts, new_tokens, args.repeats, device)
            compiled = None if tiny or args.no_compile else tokens_per_s(ours_compiled_generate, ours, prompts,
                                                                         new_tokens, args.repeats, device)
            fresh = None if args.no_fresh else tokens_per_s(ours_fresh_generate, ours, prompts, new_tokens,
                                                            args.repeats, device)
            theirs = tokens_per_s(hf_generate, hf, prompts, new_tokens, args.repeats, device)
            rows.append({"weights": kind, "batch": batch, "minilora": mine, "compiled": compiled, "fresh": fresh, "hf": theirs,
                         "speedup": mine[0] / theirs[0], "target": TARGETS.get((kind, batch))})
            print(json.dumps(rows[-1]), flush=True)
        scoring = None
        if kind == "nf4" and args.scoring:
            n, limit, bs = (8, 8, 4) if tiny else (args.scoring, 256, args.scoring_batch)
            seconds, produced = time_scoring(ours, scoring_lengths(n, 0.25 if tiny else 1.0, args.data), limit, bs,
                                             raw["vocab_size"], device)
            scoring = {"prompts": n, "new_tokens": limit, "batch": bs, "seconds": seconds, "tokens": produced}
            print("scoring", json.dumps(scoring), flush=True)
            checks["scoring"] = scoring
        del ours, hf
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows, checks, (prompt_len, new_tokens)


def screened_head_on():
    from minilora.generate import SCREENED_HEAD

    return SCREENED_HEAD


def render(rows, checks, shape, args):
    import transformers

    try:
        import bitsandbytes
        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = "absent"
    card = "CPU (--tiny: logic check only, not a measurement)" if args.tiny else torch.cuda.get_device_name()
    prompt_len, new_tokens = shape
    lines = [f"## Generation: minilora vs HF transformers + bitsandbytes `generate` ({datetime.date.today().isoformat()})", "",
             f"Card: {card}. torch {torch.__version__}, transformers {transformers.__version__}, bitsandbytes {bnb}. "
             f"Command: `python benchmarks/generate.py{' --tiny' if args.tiny else ''}`. "
             f"{'Tiny Llama' if args.tiny else 'Llama-3.2-3B shape'}, random weights, {prompt_len}-token prompts, "
             f"{new_tokens} new tokens (greedy, no early stop), tokens/s = batch × new tokens / generate wall time "
             f"(prefill included), median of {args.repeats} after a full-length warm-up (min–max in brackets). minilora "
             "decodes with a CUDA graph of the step (the default), reusing the KV cache and graph the warm-up call "
             "made (`make_decoder`, as evaluate.py reuses one across batches); the torch.compile column also fuses "
             "the step's element-wise kernels (its compile time, ~10-40 s per shape, is in the warm-up); the "
             "'new decoder' column makes a fresh cache and captures a fresh graph inside every timed call (what "
             "`generate` costs when no decoder is passed). Speedup and target use the default. Greedy head at batch 1: "
             f"{'int8-screened (the default)' if screened_head_on() else 'bf16 logits + argmax'}.", "",
             "| weights | batch | minilora tok/s | minilora + torch.compile tok/s | minilora, new decoder per call | HF tok/s | speedup | target | met |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        m, h = r["minilora"], r["hf"]
        target = f"≥ {r['target']:.0f}×" if r["target"] else "—"
        met = "—" if not r["target"] else ("yes" if r["speedup"] >= r["target"] else "no")
        c = r["compiled"]
        compiled = "—" if c is None else f"{c[0]:,.1f} ({c[1]:,.1f}–{c[2]:,.1f}), {c[0] / h[0]:.1f}×"
        fr = r["fresh"]
        fresh = "—" if fr is None else f"{fr[0]:,.1f} ({fr[1]:,.1f}–{fr[2]:,.1f})"
        lines.append(f"| {r['weights']} | {r['batch']} | {m[0]:,.1f} ({m[1]:,.1f}–{m[2]:,.1f}) | {compiled} | {fresh} | "
                     f"{h[0]:,.1f} ({h[1]:,.1f}–{h[2]:,.1f}) | {r['speedup']:.1f}× | {target} | {met} |")
    lines.append("")
    for kind in ("nf4", "bf16"):
        if kind in checks:
            c = checks[kind]
            lines.append(f"Outputs agree ({kind}, prefill logits of 2 prompts): {'yes' if c['ok'] else 'NO'} — min cosine "
                         f"{c['min_cosine']:.5f}, top-1 agreement {100 * c['top1_agree']:.1f}%, max abs diff "
                         f"{c['max_abs_diff']:.3g}.")
    if "scoring" in checks:
        s = checks["scoring"]
        lines.append(f"\nScoring run (minilora, NF4): {s['prompts']:,} prompts with CodeAlpaca-like lengths, {s['new_tokens']} "
                     f"new tokens each (no EOS: worst case), batch {s['batch']}: {s['seconds']:.1f} s "
                     f"({s['tokens'] / s['seconds']:,.0f} tok/s){'' if args.tiny else '; target ≤ 180 s'}.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny model: check the logic (not a measurement)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 rows")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--no-fresh", action="store_true", help="skip the new-decoder-per-call column")
    parser.add_argument("--scoring", type=int, default=2000, help="prompts of the scoring run (0 = skip)")
    parser.add_argument("--scoring-batch", type=int, default=64)
    parser.add_argument("--data", default=DATA, help="a CodeAlpaca file whose prompt lengths the scoring run copies "
                        "(RESULTS.md used the 2k sample); without one, a fixed spread of 40-159 tokens")
    parser.add_argument("--workdir", default="/tmp/minilora-bench")
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (use --tiny to check the logic on a CPU)")
    rows, checks, shape = run(args)
    text = render(rows, checks, shape, args)
    print(text)
    with open(args.results, "a") as f:
        f.write("\n" + text)
    return 0 if all(c["ok"] for k, c in checks.items() if k != "scoring") else 1


if __name__ == "__main__":
    sys.exit(main())
