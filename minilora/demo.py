"""The demo: the study's pipeline in miniature, offline on a CPU in a few minutes. `python -m minilora.demo`.

1. the embedded task set (minilora/tasks: small Python functions from 43 families, written for this
   project), written to OUT/data/ (train.json, held_out.jsonl); or `--data FILE`, any CodeAlpaca-layout
   JSON/JSONL file or hub dataset id;
2. a byte-level BPE tokenizer trained now, with `tokenizers`, on the training records;
3. a small Llama-architecture model (the `PRESET`, ~4M parameters) from random weights, "pretrained" here for
   a few minutes (`pretrain`, all weights, a plain AdamW loop) on raw text alone, texts separated by EOS:
   the training tasks as documented code (signature, docstring, body, one assert; `pretraining_texts`), or
   with --data the training rows' answers. It stands in for a pretrained base that knows code but has never
   seen an instruction. Written as an ordinary Hugging Face checkpoint directory (config.json, model.safetensors,
   tokenizer files), so every step below is the code a real model goes through;
4. held-out scores of the untuned base: ROUGE-L of its answers against the reference solutions, and
   pass@1, each answer run against the task's tests in `execution`'s sandbox (greedy decoding);
5. QLoRA training through trainer.train: NF4 base, LoRA on every linear layer and the output head, on the
   instruction-formatted training records (the eval loss is logged before the first step and during
   training, so OUT/train/loss.png starts from a baseline);
6. the same scores with the adapter, and the before/after table.

Held-out tasks are functions of the families trained on, with function names and constants that no
training task of that family uses: to pass, the model must read the instruction, not recall a training
row. With `--data FILE` the ROUGE-L rows are that file's held-out split instead (the train/test split of
train.py), and pass@1 is still measured on the embedded held-out tasks.

What it shows: the pipeline end to end (tokenizer, loader, NF4, LoRA, the training loop, checkpoints, batched
generation, scoring, sandboxed execution) and the study's mechanism at toy scale: instruction tuning teaches
a base model to answer the request it is given. What it does not show: the study's numbers; for real models
see docs/results.md.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch

from .cli import HelpFormatter

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>")  # ids 0, 1, 2

# A Llama 3.2-shaped miniature: GQA, SwiGLU, RMSNorm, RoPE, tied embeddings.
PRESET = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
LORA_RANK, LORA_ALPHA = 64, 64.0  # scaling 1: a base trained minutes ago has no broad skills to keep close to
# lm_head too: it is tied to the frozen embeddings; an adapter on it lets tuning change the output directly.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
PRETRAINING = dict(steps=60, batch_size=16, seq_len=256, learning_rate=3e-3, warmup_steps=10)
DEMO_TRAINING = dict(lora_r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, lora_targets=LORA_TARGETS,
                     learning_rate=3e-3,
                     lr_schedule="cosine", warmup_steps=10, max_grad_norm=1.0, micro_batch_size=8, grad_accum_steps=2,
                     max_seq_len=256, gradient_checkpointing=False, eval_every=20, eval_examples=32, save_every=0)
DEMO_STEPS, EVAL_TASKS = 100, 86  # 86 held-out tasks: two of each family


def train_tokenizer(records, directory, vocab_size):
    """A byte-level BPE tokenizer of the Alpaca prompts and answers; BOS prepended like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from .data import format_prompt

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((format_prompt(r) + r["output"] for r in records), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, f, indent=2)


def write_random_model(directory, seed, preset=PRESET):
    """config.json + model.safetensors of a random Llama-architecture model (GPT-2-style init, std 0.02)."""
    from safetensors.torch import save_file

    from .config import config_from_dict
    from .model import Transformer

    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **preset, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "tie_word_embeddings": True, "hidden_act": "silu", "pad_token_id": 0,
           "eos_token_id": 1, "bos_token_id": 2, "torch_dtype": "float32"}
    torch.manual_seed(seed)
    model = Transformer(config_from_dict(raw, "demo preset"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:  # embeddings and linears; the output projections scaled down by depth (GPT-2)
                std = 0.02 / math.sqrt(2 * preset["num_hidden_layers"]) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                p.normal_(0.0, std)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: one copy
    os.makedirs(directory, exist_ok=True)
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    return sum(p.numel() for p in model.parameters())


def pretrain(model_dir, texts, steps, batch_size, seq_len, learning_rate, warmup_steps, seed):
    """Train every weight of the checkpoint in `model_dir` on raw `texts` (next-token loss, texts joined by EOS
    and cut into `seq_len + 1` windows), then write the weights back. Returns the losses."""
    from safetensors.torch import save_file

    from .loading import load_model

    model, tok = load_model(model_dir, dtype=torch.float32, device="cpu")
    stream = [t for text in texts for t in tok.encode(text) + [tok.eos_id]]
    windows = torch.tensor(stream[: len(stream) // (seq_len + 1) * (seq_len + 1)]).view(-1, seq_len + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for step in range(steps):
        # linear warmup, then cosine to 10% (the nanoGPT schedule)
        progress = max(0.0, (step - warmup_steps) / max(1, steps - warmup_steps))
        lr = learning_rate * min(1.0, (step + 1) / warmup_steps) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = windows[torch.randint(len(windows), (batch_size,), generator=generator)]
        loss = model.loss(batch[:, :-1], batch[:, 1:]) / batch[:, 1:].numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            print(f"[demo] pretraining step {step + 1}/{steps}: loss {losses[-1]:.3f}", flush=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(state, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
    return losses



def pretraining_texts(tasks):
    """What the base is pretrained on: each training task as a file of documented code with a test: the
    function with its docstring (the task's `prompt`, then the solution's body) and one of its asserts. It
    stands in for the docstring-and-code text real base models see; it never shows an instruction."""
    texts = []
    for t in tasks:
        body = t["output"].split("\n", 1)[1]  # the solution without its `def` line, which the prompt has
        check = t["test"].splitlines()[1].strip().replace("candidate(", f"{t['entry_point']}(", 1)
        texts.append(f"{t['prompt']}{body}\n{check}\n")
    return texts


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minilora.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--data", default="", help="a CodeAlpaca-layout JSON/JSONL file or hub dataset id to train "
                        "on instead of the embedded task set ('' = the embedded tasks)")
    parser.add_argument("--out", default="runs/demo", help="output directory")
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAINING["steps"],
                        help="full-weight steps on raw text before the instruction tuning (16 x 256 tokens each)")
    parser.add_argument("--no-pretrain", action="store_true", help="QLoRA on the random weights themselves")
    parser.add_argument("--steps", type=int, default=DEMO_STEPS, help="QLoRA optimizer steps (16 rows each)")
    parser.add_argument("--eval-tasks", type=int, default=EVAL_TASKS,
                        help="held-out tasks (and --data rows) scored before and after; 0 = all")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generated tokens per answer, at most")
    parser.add_argument("--quantize", default="nf4", choices=("nf4", "none"), help="base weights (nf4 = QLoRA)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random base and the training")
    parser.add_argument("--tiny", action="store_true", help="a much smaller model and budget (for the tests)")
    parser.add_argument("--unsafe-no-sandbox", action="store_true", help="where bubblewrap is missing, run the "
                        "generated programs for pass@1 without a sandbox (by default pass@1 is then not scored)")
    return parser.parse_args(argv)


def load_demo_data(data, out):
    """(training records, pretraining texts, held-out problems, ROUGE-L rows). The embedded task set is also
    written to OUT/data/, to be read and reused (train.py --data OUT/data/train.json)."""
    from .config import TrainConfig
    from .data import load_records, split_records
    from .tasks import generate_tasks, held_out_problems, train_records, write_tasks

    problems = held_out_problems()
    if data:
        records = load_records(data, skip_bad_rows=True)
        split = TrainConfig()  # train.py's split: the ROUGE-L rows are the ones training holds out
        train_rows, test_rows = split_records(records, test_fraction=split.test_fraction, seed=split.split_seed)
        return train_rows, [r["output"] for r in train_rows], problems, [r for r in test_rows if r["output"].strip()]
    write_tasks(os.path.join(out, "data"))
    tasks, _ = generate_tasks()
    return train_records(), pretraining_texts(tasks), problems, problems


def run_tests(problems, completions, run_code):
    """(pass@1, statuses): one greedy completion per problem, each run against its tests in execution's
    bubblewrap sandbox. The one place the demo executes model output. run_code: "sandbox", "unsandboxed"
    (--unsafe-no-sandbox where bubblewrap is missing) or "no" (pass@1 is then None, nothing runs)."""
    from .execution import check_completions, pass_at_k_scores

    if run_code == "no":
        return None, ["not run"] * len(problems)
    results = check_completions(problems, [[c] for c in completions], workers=2,
                                allow_unsandboxed=run_code == "unsandboxed")
    return pass_at_k_scores(results, ks=(1,))["pass@1"], [r[0].status for r in results]


def how_to_run_code(unsafe_no_sandbox):
    """"sandbox" where bubblewrap works here; otherwise "unsandboxed" if the user opted out, else "no" (the demo
    still trains and scores ROUGE-L, and says how to get pass@1)."""
    from .sandbox import sandbox_status

    ok, why = sandbox_status()
    if ok:
        return "sandbox"
    if unsafe_no_sandbox:
        print(f"[demo] WARNING: {why}; --unsafe-no-sandbox: the generated programs run WITHOUT a sandbox", flush=True)
        return "unsandboxed"
    print(f"[demo] pass@1 will not be scored: {why}. Install it (Debian/Ubuntu: sudo apt-get install -y "
          "bubblewrap) or pass --unsafe-no-sandbox to run the generated programs without one.", flush=True)
    return "no"


def dequantize_once(model):
    """Replace every NF4 linear by an nn.Linear holding its dequantized weight. On a CPU in fp32 the products are
    the same ones (the reference 4-bit matmul dequantizes to fp32 and calls F.linear), but the weights are
    unpacked once instead of at every generated token, which is most of a CPU decode step's time here."""
    from .nf4 import Linear4bit

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Linear4bit):
                weight = child.dequantize().detach()
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                         dtype=weight.dtype)
                linear.weight = torch.nn.Parameter(weight, requires_grad=False)
                if child.bias is not None:
                    linear.bias = torch.nn.Parameter(child.bias.detach(), requires_grad=False)
                setattr(module, name, linear)
    return model


def score(model_dir, adapter, quantize, problems, rows, max_new_tokens, out, run_code="sandbox"):
    """Held-out ROUGE-L (on `rows`) and pass@1 (on `problems`) of the model (+ adapter), greedy; writes
    OUT/predictions.jsonl and OUT/summary.json; returns the summary."""
    from .data import format_prompt
    from .evaluation import EvalConfig, load_for_eval, write_atomic
    from .generate import generate_text
    from .metrics import rouge_l_scores

    started = time.perf_counter()
    model, tok = load_for_eval(EvalConfig(model=model_dir, adapter=adapter or "", quantize=quantize, device="cpu"))
    dequantize_once(model)
    same = rows is problems  # the embedded tasks: one generation serves both scores
    prompts = [format_prompt(p) for p in problems] + ([] if same else [format_prompt(r) for r in rows])
    answers = [a.strip() for a in generate_text(model, tok, prompts, max_new_tokens, batch_size=32)]
    code, text = answers[:len(problems)], answers[:len(problems)] if same else answers[len(problems):]
    pass1, statuses = run_tests(problems, [c + "\n" for c in code], run_code)
    rouge = rouge_l_scores(text, [r["output"] for r in rows])
    rows_out = [{"task_id": p["task_id"], "instruction": p["instruction"], "input": p["input"], "reference": p["output"],
                 "prediction": c, "status": s} | ({"rouge_l": v} if same else {})
                for p, c, s, v in zip(problems, code, statuses, rouge if same else [None] * len(code))]
    if not same:
        rows_out += [{"row": i, "instruction": r["instruction"], "input": r["input"], "reference": r["output"],
                      "prediction": a, "rouge_l": v} for i, (r, a, v) in enumerate(zip(rows, text, rouge))]
    summary = {"rouge_l": sum(rouge) / len(rouge), "pass@1": pass1, "problems": len(problems), "rouge_rows": len(rows),
               "passed": statuses.count("passed"), "seconds": round(time.perf_counter() - started, 1),
               "model": model_dir, "adapter": adapter}
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, "predictions.jsonl"), "".join(json.dumps(r) + "\n" for r in rows_out))
    write_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv=None):
    from .config import TrainConfig, config_from_values
    from .errors import MiniloraError
    from .trainer import train

    args = parse_args(argv)
    preset, training = dict(PRESET), dict(DEMO_TRAINING)
    if args.tiny:
        preset.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16)
        training.update(lora_r=16, lora_alpha=16.0, micro_batch_size=4, grad_accum_steps=1, max_seq_len=128,
                        eval_examples=4, eval_every=2)
    out = os.path.abspath(args.out)
    started = time.perf_counter()
    run_code = how_to_run_code(args.unsafe_no_sandbox)  # said before minutes of training, not after
    try:
        train_rows, texts, problems, rouge_rows = load_demo_data(args.data, out)
        if args.eval_tasks:  # an even spread over the families
            problems = problems[::max(1, len(problems) // args.eval_tasks)][:args.eval_tasks]
            rouge_rows = rouge_rows[:args.eval_tasks] if args.data else problems
        data_file = args.data or os.path.join(out, "data", "train.json")
        model_dir = os.path.join(out, "base")
        print(f"[demo] {len(train_rows)} training records from {data_file}; tokenizer and random base model in "
              f"{model_dir}", flush=True)
        train_tokenizer(train_rows, model_dir, preset["vocab_size"])  # held-out rows never seen, even here
        n_params = write_random_model(model_dir, args.seed, preset)
        print(f"[demo] Llama-architecture base: {n_params / 1e6:.1f}M parameters, random weights, "
              f"{preset['num_hidden_layers']} layers x {preset['hidden_size']} wide", flush=True)
        pretrain_losses, pretrain_seconds = [], 0.0
        if not args.no_pretrain and args.pretrain_steps:
            t0 = time.perf_counter()
            settings = {**PRETRAINING, "steps": args.pretrain_steps}
            if args.tiny:
                settings.update(batch_size=4, seq_len=64, warmup_steps=1)
            pretrain_losses = pretrain(model_dir, texts, seed=args.seed, **settings)
            pretrain_seconds = time.perf_counter() - t0

        print(f"[demo] scoring the untuned base on {len(problems)} held-out tasks (greedy) ...", flush=True)
        before = score(model_dir, None, args.quantize, problems, rouge_rows, args.max_new_tokens, os.path.join(out, "before"),
                       run_code)
        config = config_from_values({**training, "model": model_dir, "data": data_file, "out": os.path.join(out, "train"),
                                     "quantize": args.quantize, "device": "cpu", "max_steps": args.steps,
                                     "skip_bad_rows": True, "seed": args.seed, "progress": False,
                                     "overwrite": True}, TrainConfig,
                                    source="demo")
        print(f"[demo] {'QLoRA (NF4 base)' if args.quantize == 'nf4' else 'LoRA'} training: {args.steps} steps, "
              f"r={config.lora_r} on every linear layer and the head ...", flush=True)
        t0 = time.perf_counter()
        result = train(config)
        train_seconds = time.perf_counter() - t0
        print("[demo] scoring again with the adapter ...", flush=True)
        after = score(model_dir, result["adapter"], args.quantize, problems, rouge_rows, args.max_new_tokens,
                      os.path.join(out, "after"), run_code)
    except MiniloraError as e:
        print(f"error ({type(e).__name__}): {e}", file=sys.stderr)
        return 1
    report = {"before": before, "after": after, "train": result, "train_seconds": round(train_seconds, 1),
              "pretrain_losses": pretrain_losses, "pretrain_seconds": round(pretrain_seconds, 1),
              "seconds": round(time.perf_counter() - started, 1), "preset": preset, "training": config.to_dict(),
              "out": out, "data": data_file}
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(demo_table(report), end="")
    return 0


def demo_table(report):
    """The before/after table and where everything was written (paths relative to the working directory)."""
    before, after, out = report["before"], report["after"], report["out"]
    base = "untuned (pretrained-here base)" if report["pretrain_losses"] else "untuned (random base)"
    lines = ["\n| model | held-out ROUGE-L | held-out pass@1 | tasks passed |", "|---|---|---|---|"]
    lines += [f"| {name} | {100 * s['rouge_l']:.2f} | "
              + (f"{100 * s['pass@1']:.2f} | {s['passed']} / {s['problems']} |" if s["pass@1"] is not None
                 else "not run (no sandbox) | |")
              for name, s in ((base, before), ("+ QLoRA adapter", after))]
    if report["pretrain_losses"]:
        losses = report["pretrain_losses"]
        lines.append(f"\npretraining (all weights, raw text): {len(losses)} steps in {report['pretrain_seconds']:.0f} s, "
                     f"loss {losses[0]:.2f} -> {losses[-1]:.2f}")
    lines.append(f"QLoRA training: {report['train']['steps']} steps in {report['train_seconds']:.0f} s, final train loss "
                 f"{report['train']['train_loss']:.3f}, eval loss {report['train']['eval_loss']:.3f}; "
                 f"whole demo {report['seconds']:.0f} s.")

    def where(*parts):
        return os.path.relpath(os.path.join(out, *parts))

    data = f"{where('data')}/ (train.json, held_out.jsonl)" if report["data"].startswith(out) else report["data"]
    lines += ["\nWritten:",
              f"  data         {data}",
              f"  base model   {where('base')}/ (config.json, model.safetensors, tokenizer.json)",
              f"  adapter      {where('train', 'adapter')}/ (PEFT format)",
              f"  loss plot    {where('train', 'loss.png')} (per step: {where('train', 'metrics.jsonl')})",
              f"  predictions  {where('before', 'predictions.jsonl')}, {where('after', 'predictions.jsonl')}",
              f"  summary      {where('demo.json')}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
