"""Run an exported GGUF in llama.cpp (llama-cpp-python) and compare it with minilora's model + adapter.

    python scripts/compare_llama_cpp.py --model BASE --adapter ADAPTER --gguf FILE.gguf --data DATA.json \
        [--prompts 4] [--new-tokens 32]

For a few held-out records (the test split train.py uses: same fraction and seed), both greedy-decode from
the same prompt ids (Alpaca prompt, data.format_prompt); the script prints whether the continuations are
identical, where they first differ, and the largest difference between the two models' log-probabilities of
the tokens minilora chose (llama.cpp scores our continuation, so a divergence does not hide the others).
Writes nothing; the numbers go to docs/export.md by hand.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from minilora.config import TrainConfig  # noqa: E402
from minilora.data import format_prompt, load_records, split_records  # noqa: E402
from minilora.loading import load_model  # noqa: E402


def greedy_ours(model, prompt, new_tokens, stop_ids):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(token)
            if token in stop_ids:
                break
    return ids[len(prompt):]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    import llama_cpp

    defaults = TrainConfig()
    _, test = split_records(load_records(args.data), test_fraction=defaults.test_fraction, seed=defaults.split_seed)
    model, tok = load_model(args.model, adapter=args.adapter)
    llm = llama_cpp.Llama(args.gguf, n_ctx=1024, logits_all=True, verbose=False, n_threads=2, seed=0)
    print(f"llama-cpp-python {llama_cpp.__version__}, torch {torch.__version__}")
    worst = 0.0
    for i, record in enumerate(test[: args.prompts]):
        prompt = tok.encode(format_prompt(record), add_special_tokens=True)
        ours = greedy_ours(model, prompt, args.new_tokens, set(tok.stop_ids))
        llm.reset()
        llm.eval(prompt)
        theirs = []
        for _ in range(args.new_tokens):  # greedy in llama.cpp: argmax of its logits, one token at a time
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            theirs.append(token)
            if token in tok.stop_ids:
                break
            llm.eval([token])
        llm.reset()
        llm.eval(prompt + ours)  # llama.cpp's log-probabilities of our tokens
        logits_cpp = torch.tensor(np.array(llm.scores[len(prompt) - 1: len(prompt) - 1 + len(ours)]))
        with torch.no_grad():
            logits_ours = model(torch.tensor([prompt + ours]))[0, len(prompt) - 1: len(prompt) - 1 + len(ours)]
        target = torch.tensor(ours)[:, None]
        lp_cpp = torch.log_softmax(logits_cpp.float(), -1).gather(1, target)
        lp_ours = torch.log_softmax(logits_ours.float(), -1).gather(1, target)
        diff = (lp_cpp - lp_ours).abs()
        worst = max(worst, diff.max().item())
        same = ours == theirs
        first = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        print(f"prompt {i}: {len(prompt)} prompt tokens, {len(ours)} new; greedy identical: {same}"
              + ("" if same else f" (first difference at token {first})")
              + f"; |log p| difference max {diff.max().item():.4f}, mean {diff.mean().item():.4f}")
        print(f"  ours:      {tok.decode(ours)!r}")
        if not same:
            print(f"  llama.cpp: {tok.decode(theirs)!r}")
    print(f"largest per-token log-probability difference: {worst:.4f}")


if __name__ == "__main__":
    main()
