"""Why the merged-weight LoRA node's loss curve leaves the bf16 reference's early on: which one is right?

CPU, SmolLM2-135M-Instruct real weights (NF4 base), LoRA r=16 alpha=32 on all seven linears, no dropout, AdamW
lr 2e-4, clip 0.3, 8 steps of 4 CodeAlpaca rows (<= 96 tokens). Five runs from the same seed:
  fp32 reference  - everything in fp32 (the plain LoRALinear): the yardstick
  fp32 merged     - minilora/kernels/lora.py's merged-weight node in fp32 (W + s B A, gradients in fp32)
  bf16 reference  - the plain LoRALinear in bf16 (what benchmarks/loss_agreement.py's reference path computes)
  bf16 fused      - minilora/kernels/lora.py's LoRA-branch node in bf16 (the fast path before the merged node)
  bf16 merged     - the merged-weight node in bf16: W' = bf16(W + s B A)
The Triton kernels are swapped for torch equivalents (`merged_weight`, `lora_grads` below: same formulas) so the
nodes run on the CPU. Takes ~15 minutes on 2 cores.

    python benchmarks/lora_precision.py --model DIR --data code_alpaca_2k.json
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import minilora.kernels.lora as fused  # noqa: E402
import minilora.lora as lora  # noqa: E402
from minilora.data import collate_padded, load_records, tokenize_records  # noqa: E402
from minilora.loading import load_model  # noqa: E402
from minilora.nf4 import dequantize_nf4  # noqa: E402
from minilora.tokenizer import load_tokenizer  # noqa: E402

RUNS = [("fp32 reference", torch.float32, None), ("fp32 merged", torch.float32, True),
        ("bf16 reference", torch.bfloat16, None), ("bf16 fused", torch.bfloat16, False),
        ("bf16 merged", torch.bfloat16, True)]


def merged_weight(base, lora_A, lora_B, scaling, dtype):
    return (dequantize_nf4(base.state, torch.float32) + scaling * (lora_B.double() @ lora_A.double()).float()).to(dtype)


def lora_grads(x, g, lora_A, lora_B, scaling):
    x, g = x.float(), g.float()
    return scaling * (g @ lora_B.float()).t() @ x, scaling * g.t() @ (x @ lora_A.float().t())


def train(directory, examples, pad_id, dtype, merge, steps):
    """Losses of `steps` AdamW steps; merge None = plain LoRALinear, False/True = the fused node without/with
    the merged weight."""
    torch.manual_seed(0)
    model, _ = load_model(directory, dtype=dtype, quantize="nf4", backend="torch")
    lora.apply_lora(model, 16, 32)
    model.train()
    lora._fused = (lambda x: merge is not None)
    fused._merges = lambda base, rows, mask, device: bool(merge)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    losses = []
    for step in range(steps):
        batch = collate_padded(examples[step * 4:(step + 1) * 4], pad_id)
        loss = model.loss(batch["input_ids"], batch["labels"]) / (batch["labels"] != -100).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    fused._merged_weight, fused.lora_grads = merged_weight, lora_grads
    tok = load_tokenizer(args.model)
    examples = tokenize_records(load_records(args.data)[:4 * args.steps], tok, 96)
    examples = examples[0] if isinstance(examples, tuple) else examples
    pad_id = tok.pad_id if tok.pad_id is not None else 0
    rows = {name: train(args.model, examples, pad_id, dtype, merge, args.steps) for name, dtype, merge in RUNS}
    print("| run | " + " | ".join(f"step {i + 1}" for i in range(args.steps)) + " |")
    print("|---|" + "---:|" * args.steps)
    for name, losses in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in losses) + " |")


if __name__ == "__main__":
    main()
