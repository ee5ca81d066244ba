"""QLoRA training throughput and memory: minilora vs the HF transformers + peft + bitsandbytes stack, plain and
with Liger-Kernel.

Same run, same card, same random weights at the real shapes (written once to disk in bf16 and loaded by
both stacks through their normal loaders), same LoRA (r=16, alpha=16, no dropout, all seven block
linears), same AdamW, same batch, bf16 autocast. Each stack runs in its own subprocess so that peak
memory is its own. Before timing, the loss of the first batch is compared between the stacks.

    python benchmarks/train_step.py                  # the full table, appended to benchmarks/RESULTS.md
    python benchmarks/train_step.py --only llama3.2-3b --steps 4
    python benchmarks/train_step.py --no-table --max-seq   # longest Llama-3.2-3B sequence at batch 1, 16 and 24 GiB

MFU counts the matmul FLOPs a QLoRA step needs (forward 2N, input gradients 2N, N = block linears + head,
per token; attention and gradient-checkpoint recomputation not counted) against the card's dense bf16 peak
(989 TFLOP/s for an H100 SXM).
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}
CASES = [  # (config, batch, seq, gradient checkpointing, HF baseline measured earlier on the same card, tok/s)
    ("llama3.2-3b", 8, 512, True),
    ("llama3.2-3b", 8, 512, False),
    ("qwen2.5-3b", 8, 512, True),
    ("llama3.2-1b", 8, 512, True),
    ("gemma-2b", 8, 512, True),
    ("llama3.2-3b", 2, 2048, True),
]


def write_random_checkpoint(name, directory):
    """Random bf16 weights at the real shapes of `name`, saved as a HF checkpoint + a stub tokenizer."""
    if os.path.exists(os.path.join(directory, "config.json")):
        return
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoModelForCausalLM

    with open(os.path.join(HERE, "configs", f"{name}.json")) as f:
        raw = json.load(f)
    raw.pop("auto_map", None)
    config = AutoConfig.for_model(**raw)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}  # a stub covering every id the configs name
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "t1", "bos_token": "t2", "pad_token": "t0"}, f)
    del model
    torch.cuda.empty_cache()


def batch_of(vocab, batch, seq, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), device="cuda", generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((batch, 1), -100, device="cuda")], dim=1)  # already shifted
    return ids, labels


def minilora_stack(directory, ckpt, uncheckpointed=0):
    from minilora import load_model
    from minilora.lora import apply_lora

    torch.cuda.reset_peak_memory_stats()
    model, _ = load_model(directory, dtype=torch.bfloat16, device="cuda", quantize="nf4")
    load_peak = torch.cuda.max_memory_allocated()
    apply_lora(model, r=16, alpha=16, dropout=0.0, targets=TARGETS, dtype=torch.float32)
    model.gradient_checkpointing, model.uncheckpointed_blocks = ckpt, uncheckpointed
    model.train()

    def loss_fn(ids, labels):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model.loss(ids, labels) / labels.ne(-100).sum()

    return model, loss_fn, load_peak


def hf_stack(directory, ckpt, recipe=True):
    """recipe=True: the QLoRA recipe of the peft docs (prepare_model_for_kbit_training: fp32 norms,
    embeddings and head, input grads, checkpointing); recipe=False: a lean variant without it."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.cuda.reset_peak_memory_stats()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quant, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", device_map={"": 0})
    load_peak = torch.cuda.max_memory_allocated()
    if recipe:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    model.train()

    def loss_fn(ids, labels):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    return model, loss_fn, load_peak


LIGER = {"llama": "apply_liger_kernel_to_llama", "qwen2": "apply_liger_kernel_to_qwen2",
         "gemma": "apply_liger_kernel_to_gemma", "gemma2": "apply_liger_kernel_to_gemma2"}


def liger_stack(directory, ckpt):
    """HF lean (bf16 everywhere, no kbit-training prep) + Liger-Kernel's RMSNorm, RoPE, SwiGLU/GeGLU and fused
    linear cross-entropy (the logits are never materialised), SDPA attention: the strongest peer stack we know
    of for single-GPU QLoRA. Liger patches the model classes, so it is applied before the model is built."""
    import liger_kernel.transformers as liger

    with open(os.path.join(directory, "config.json")) as f:
        model_type = json.load(f)["model_type"]
    getattr(liger, LIGER[model_type])()  # defaults: RoPE, RMSNorm, SwiGLU/GeGLU, fused linear cross-entropy
    model, _, load_peak = hf_stack(directory, ckpt, recipe=False)

    def loss_fn(ids, labels):
        # HF shifts labels inside forward: passing the unshifted ids scores logits[t] against ids[t + 1], the
        # same targets as the other stacks' pre-shifted labels (last position ignored); mean over tokens.
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(input_ids=ids, labels=ids).loss

    return model, loss_fn, load_peak


def worker(args):
    """Time one stack. minilora runs the trainer's own step (minilora.trainer.optimizer_step: token-normalised
    loss, clip, fused AdamW, NaN guard with its host syncs), with CUDA-graph micro-steps ("minilora", the
    train.py default on a GPU) or eagerly ("minilora-eager")."""
    kept = args.uncheckpointed_blocks
    if args.no_merge:  # A/B of the merged-weight LoRA node: every layer takes the LoRA-branch path instead
        from minilora.kernels import lora

        lora.MERGE_MIN_ROWS = sys.maxsize
    if args.torch_lora_grads:  # A/B of minilora/kernels/lora_backward.py: the merged node's dA, dB from cuBLAS GEMMs
        from minilora.kernels import lora

        def torch_lora_grads(x, g, lora_A, lora_B, scaling):
            a_s, b_s = (lora_A * scaling).to(x.dtype), (lora_B * scaling).to(x.dtype)
            return torch.mm((g @ b_s).t(), x).float(), torch.mm(g.t(), x @ a_s.t()).float()

        lora.lora_grads = torch_lora_grads
    stack = {"minilora": lambda d, c: minilora_stack(d, c, kept), "minilora-eager": lambda d, c: minilora_stack(d, c, kept),
             "hf": hf_stack, "hf-lean": lambda d, c: hf_stack(d, c, recipe=False), "hf-liger": liger_stack}[args.worker]
    model, loss_fn, load_peak = stack(args.dir, args.ckpt == "on")
    after_load = torch.cuda.memory_allocated()
    vocab = model.config.vocab_size
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=True)
    ids, labels = batch_of(vocab, args.batch, args.seq, seed=1)
    with torch.no_grad():
        first_loss = loss_fn(*batch_of(vocab, 2, 128, seed=0)).item()
    torch.cuda.reset_peak_memory_stats()
    if args.worker.startswith("minilora"):
        from minilora.config import TrainConfig
        from minilora.trainer import GraphedMicroSteps, optimizer_step

        config = TrainConfig(max_grad_norm=0.3, pack=False, offload_activations=args.offload)
        graphed = (GraphedMicroSteps(model, params, False, torch.bfloat16, 0)
                   if args.worker == "minilora" and not args.offload else None)
        batch = {"input_ids": ids, "labels": labels}

        def step():
            return optimizer_step(model, optimizer, params, [batch], 2e-4, config, torch.device("cuda"),
                                  torch.bfloat16, graphed)[0]
    else:
        import contextlib

        # HF's best effort at long context: torch's own offload of every saved activation to pinned CPU memory
        offload = torch.autograd.graph.save_on_cpu(pin_memory=True) if args.offload else contextlib.nullcontext()

        def step():
            with offload:
                loss = loss_fn(ids, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.3)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

    step()
    torch.cuda.synchronize()
    # resident between steps: weights, LoRA, gradients (None after zero_grad(set_to_none)), optimizer moments
    steady = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        last = step()
    float(last)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    result = dict(stack=args.worker, resident=resident_bytes(model, optimizer), first_loss=first_loss, step_s=seconds,
                  tokens_per_s=args.batch * args.seq / seconds, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                  load_peak_gib=load_peak / 2**30, trainable=sum(p.numel() for p in params),
                  after_load_gib=after_load / 2**30, steady_gib=steady / 2**30,
                  reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
    print("RESULT " + json.dumps(result), flush=True)


def resident_bytes(model, optimizer):
    """GiB of the tensors that stay on the GPU between steps, by kind (each storage counted once)."""
    seen, kinds = set(), {}

    def add(kind, t):
        if t is None or not t.is_cuda or t.untyped_storage().data_ptr() in seen:
            return
        seen.add(t.untyped_storage().data_ptr())
        kinds[kind] = kinds.get(kind, 0) + t.untyped_storage().nbytes() / 2**30

    for name, p in model.named_parameters():
        add("trainable" if p.requires_grad else ("embedding/head" if "embed" in name or "lm_head" in name
                                                 else "frozen float" if p.is_floating_point() else "frozen 4-bit"), p)
        add("grads", p.grad)
    for name, b in model.named_buffers():
        add("frozen 4-bit" if not b.is_floating_point() or "absmax" in name or "quant" in name else "buffers", b)
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                add("optimizer", v)
    return {k: round(v, 3) for k, v in kinds.items()}


def linear_params(name):
    with open(os.path.join(HERE, "configs", f"{name}.json")) as f:
        c = json.load(f)
    D, F, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    Dh = c.get("head_dim") or D // c["num_attention_heads"]
    attn = D * Dh * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    return L * (attn + 3 * D * F) + V * D


def run_worker(stack, directory, batch, seq, ckpt, steps, offload=False, uncheckpointed=0):
    cmd = [sys.executable, __file__, "--worker", stack, "--dir", directory, "--batch", str(batch), "--seq", str(seq),
           "--ckpt", "on" if ckpt else "off", "--steps", str(steps), "--uncheckpointed-blocks", str(uncheckpointed)]
    cmd += ["--offload"] if offload else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (out.stdout + out.stderr)[-1500:]
    return {"stack": stack, "error": tail}


def card():
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), 989e12)
    return name, peak


def main_table(args):
    name, peak = card()
    rows = []
    for model_name, batch, seq, ckpt in CASES:
        if args.only and not {model_name, f"{model_name}@{batch}x{seq}"} & set(args.only.split(",")):
            continue
        directory = os.path.join(args.workdir, model_name)
        write_random_checkpoint(model_name, directory)
        hf = run_worker("hf", directory, batch, seq, ckpt, args.steps)
        lean = run_worker("hf-lean", directory, batch, seq, ckpt, args.steps) if args.lean else {"error": "not run"}
        liger = run_worker("hf-liger", directory, batch, seq, ckpt, args.steps)
        for kept in _uncheckpointed(args.uncheckpointed, model_name) if ckpt else [0]:
            rows.append(_row(args, model_name, directory, batch, seq, ckpt, kept, hf, lean, liger, peak))
            print(json.dumps(rows[-1]), flush=True)
    return name, rows


def _uncheckpointed(spec, model_name):
    """'0,4' for every model, or 'gemma-2b:0/11,llama3.2-3b:0/4' per model (0 for a model not named)."""
    if ":" not in spec:
        return [int(n) for n in spec.split(",")]
    per_model = dict(item.split(":") for item in spec.split(","))
    return [int(n) for n in per_model.get(model_name, "0").split("/")]


def _row(args, model_name, directory, batch, seq, ckpt, kept, hf, lean, liger, peak):
    """minilora timed against the HF runs of the same case (`kept`: blocks left out of checkpointing)."""
    ours = run_worker("minilora", directory, batch, seq, ckpt, args.steps, uncheckpointed=kept)
    graphed = (run_worker("minilora-eager", directory, batch, seq, ckpt, args.steps, uncheckpointed=kept)
               if args.eager else {"error": "not run"})
    row = dict(model=model_name, batch=batch, seq=seq, ckpt=ckpt, kept=kept, minilora=ours, hf=hf, hf_lean=lean,
               hf_liger=liger, graph=graphed)
    if "error" in ours or "error" in hf:
        return row
    row["loss_agree"] = abs(ours["first_loss"] - hf["first_loss"]) <= 0.02 * abs(hf["first_loss"])
    row["speedup"] = ours["tokens_per_s"] / hf["tokens_per_s"]
    row["memory_ratio"] = ours["peak_gib"] / hf["peak_gib"]
    row["mfu"] = ours["tokens_per_s"] * 4 * linear_params(model_name) / peak
    row["mfu_hf"] = hf["tokens_per_s"] * 4 * linear_params(model_name) / peak
    if "error" not in graphed:
        row["speedup_graph"] = graphed["tokens_per_s"] / hf["tokens_per_s"]
    if "error" not in liger:
        row["speedup_liger"] = ours["tokens_per_s"] / liger["tokens_per_s"]
        row["memory_ratio_liger"] = ours["peak_gib"] / liger["peak_gib"]
        row["loss_agree_liger"] = abs(ours["first_loss"] - liger["first_loss"]) <= 0.02 * abs(liger["first_loss"])
    if "error" not in lean:
        row["speedup_lean"] = ours["tokens_per_s"] / lean["tokens_per_s"]
        row["memory_ratio_lean"] = ours["peak_gib"] / lean["peak_gib"]
    return row


def max_sequence(args, budgets=(16, 24)):
    """Longest Llama-3.2-3B sequence that trains at batch 1 (checkpointing on) within each budget in GiB, for
    minilora with and without --offload-activations and for HF lean + Liger with and without torch's
    save_on_cpu. Peak memory grows linearly with the length, so two probes give a line; the length it predicts
    for each budget (rounded down to 1,024) is then run, and stepped down until it fits."""
    directory = os.path.join(args.workdir, "llama3.2-3b")
    write_random_checkpoint("llama3.2-3b", directory)
    found = {}
    for stack, offload in (("minilora", False), ("minilora", True), ("hf-liger", False), ("hf-liger", True)):
        probes = {}
        for seq in (4096, 8192):
            r = run_worker(stack, directory, 1, seq, True, 1, offload)
            probes[seq] = r
        if any("error" in r for r in probes.values()):
            found[(stack, offload)] = {"error": next(r["error"] for r in probes.values() if "error" in r)[-300:]}
            continue
        slope = (probes[8192]["peak_gib"] - probes[4096]["peak_gib"]) / 4096
        base = probes[4096]["peak_gib"] - slope * 4096
        found[(stack, offload)] = {}
        for budget in budgets:
            seq = int((budget - base) / slope) // 1024 * 1024
            for _ in range(4):
                r = run_worker(stack, directory, 1, seq, True, 1, offload)
                if "error" not in r and r["peak_gib"] <= budget:
                    found[(stack, offload)][budget] = (seq, r["peak_gib"], r["tokens_per_s"])
                    break
                seq = int(seq * 0.95) // 1024 * 1024
        print(json.dumps({"stack": stack, "offload": offload, "found": found[(stack, offload)]}), flush=True)
    return found


def render(name, rows, max_seq, versions):
    today = datetime.date.today().isoformat()
    lines = [f"## Training step: minilora vs HF transformers + peft + bitsandbytes ({today})", "",
             f"Card: {name}. {versions}. Command: `python benchmarks/train_step.py`. Random weights at the real "
             "shapes, LoRA r=16 on all seven block linears, AdamW (fused), bf16 autocast, SDPA attention, each "
             "stack in its own process; the first-batch loss of both stacks is compared before timing.", "",
             "HF = the peft QLoRA recipe (`prepare_model_for_kbit_training`, which keeps norms, embeddings and head in "
             "fp32); HF lean = the same stack without that preparation (bf16 everywhere), a stronger baseline. "
             "minilora = the trainer's own step (`minilora.trainer.optimizer_step`) with its default CUDA-graph "
             "micro-steps; minilora eager = the same step without CUDA graphs.", "",
             "HF + Liger = HF lean with Liger-Kernel's RMSNorm, RoPE, SwiGLU/GeGLU and fused linear cross-entropy "
             "(no logits in memory), the strongest peer stack measured here.", "",
             "| model | batch × seq | grad ckpt | minilora tok/s, peak GiB | HF recipe tok/s, peak GiB | speedup, memory ratio vs HF recipe | HF + Liger tok/s, peak GiB | speedup, memory ratio vs HF + Liger | HF lean tok/s, peak GiB | minilora eager tok/s, peak GiB | MFU minilora / HF | first losses (minilora, HF, Liger) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, h, le, li = r["minilora"], r["hf"], r["hf_lean"], r["hf_liger"]
        ckpt = "off" if not r["ckpt"] else "on" if not r.get("kept") else f"on, last {r['kept']} blocks not"
        if "speedup" not in r:
            lines.append(f"| {r['model']} | {r['batch']} × {r['seq']} | {ckpt} | error | | | | | | | | |")
            continue
        pair = lambda x: f"{x['tokens_per_s']:,.0f}, {x['peak_gib']:.2f}" if "error" not in x else "not run"
        lines.append(f"| {r['model']} | {r['batch']} × {r['seq']} | {ckpt} | {pair(o)} | {pair(h)} | "
                     f"{r['speedup']:.2f}×, {r['memory_ratio']:.2f} | {pair(li)} | "
                     + (f"{r['speedup_liger']:.2f}×, {r['memory_ratio_liger']:.2f}" if "speedup_liger" in r else "")
                     + f" | {pair(le)} | {pair(r['graph'])} | {100 * r['mfu']:.0f}% / {100 * r['mfu_hf']:.0f}% | "
                     f"{o['first_loss']:.3f}, {h['first_loss']:.3f}, "
                     + (f"{li['first_loss']:.3f}" if "error" not in li else "-")
                     + f" ({'agree' if r['loss_agree'] and r.get('loss_agree_liger', True) else 'DIFFER'}) |")
    loads = [f"{r['model']}: {r['minilora']['load_peak_gib']:.2f} GiB (HF {r['hf']['load_peak_gib']:.2f})"
             for r in rows if "speedup" in r and r["ckpt"] and r["batch"] == 8 and not r["kept"]]
    if loads:
        lines += ["", "Peak GPU memory while loading + quantizing to NF4: " + "; ".join(loads) + "."]
    for r in rows:
        if "speedup" in r and r["model"] == "llama3.2-3b" and r["ckpt"] and r["batch"] == 8 and not r["kept"]:
            lines += ["", f"Where the memory goes, {r['model']} {r['batch']} × {r['seq']} with checkpointing (GiB; "
                      "resident = tensors kept between steps, each storage once; peak = torch.cuda.max_memory_allocated):"]
            for key, label in (("minilora", "minilora"), ("hf_liger", "HF + Liger"), ("hf", "HF recipe")):
                x = r[key]
                if "error" not in x:
                    kinds = ", ".join(f"{k} {v:.2f}" for k, v in sorted(x["resident"].items(), key=lambda kv: -kv[1]))
                    lines.append(f"- {label}: {kinds}; resident {x['steady_gib']:.2f}, peak {x['peak_gib']:.2f} "
                                 f"(so {x['peak_gib'] - x['steady_gib']:.2f} for activations, gradients and workspace)")
    if max_seq is not None:
        names = {("minilora", False): "minilora", ("minilora", True): "minilora, --offload-activations",
                 ("hf-liger", False): "HF lean + Liger", ("hf-liger", True): "HF lean + Liger, save_on_cpu"}
        lines += ["", "Longest Llama-3.2-3B training sequence at batch 1 (gradient checkpointing on), peak GiB and "
                  "tok/s at that length:", "", "| stack | within 16 GiB | within 24 GiB |", "|---|---|---|"]
        for key, cells in max_seq.items():
            if "error" in cells:
                lines.append(f"| {names[key]} | error | error |")
                continue
            lines.append(f"| {names[key]} | " + " | ".join(
                f"{cells[b][0]:,} ({cells[b][1]:.1f} GiB, {cells[b][2]:,.0f} tok/s)" if b in cells else "not found"
                for b in (16, 24)) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", choices=["minilora", "minilora-eager", "hf", "hf-lean", "hf-liger"])
    parser.add_argument("--dir")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--ckpt", choices=["on", "off"], default="on")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--only", help="comma-separated CASES to run: model names, or name@BATCHxSEQ")
    parser.add_argument("--max-seq", action="store_true", help="longest Llama-3.2-3B sequence within 16 and 24 GiB, "
                        "minilora and HF lean + Liger, each with and without activation offload")
    parser.add_argument("--offload", action="store_true", help=argparse.SUPPRESS)  # worker: activations to CPU
    parser.add_argument("--eager", action="store_true", help="also time minilora without CUDA graphs")
    parser.add_argument("--lean", action="store_true", help="also run the lean HF variant (no kbit-training prep)")
    parser.add_argument("--uncheckpointed", default="0", help="numbers of last blocks left out of gradient "
                        "checkpointing (model.uncheckpointed_blocks), one minilora row each: '0,4', or per model "
                        "'gemma-2b:0/11,llama3.2-3b:0/4'")
    parser.add_argument("--uncheckpointed-blocks", type=int, default=0, help=argparse.SUPPRESS)  # worker
    parser.add_argument("--no-table", action="store_true")
    parser.add_argument("--no-merge", action="store_true", help="worker: minilora without the merged-weight LoRA "
                        "node (minilora/kernels/lora.py MERGE_MIN_ROWS), for A/B runs")
    parser.add_argument("--torch-lora-grads", action="store_true", help="worker: the merged node's LoRA gradients "
                        "from cuBLAS instead of minilora/kernels/lora_backward.py, for A/B runs")
    parser.add_argument("--workdir", default="/tmp/minilora-bench")
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    import peft
    import transformers

    try:
        import bitsandbytes
        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = "absent"
    versions = (f"torch {torch.__version__}, triton {__import__('triton').__version__}, transformers "
                f"{transformers.__version__}, peft {peft.__version__}, bitsandbytes {bnb_version}")
    name, rows = main_table(args) if not args.no_table else (card()[0], [])
    max_seq = max_sequence(args) if args.max_seq else None
    text = render(name, rows, max_seq, versions)
    print(text)
    with open(args.results, "a") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    main()
