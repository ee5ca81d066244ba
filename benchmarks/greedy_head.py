"""The greedy LM head at decode batch sizes: bf16 logits + argmax vs the int8 screen (`greedy_tokens`).

    python benchmarks/greedy_head.py [--results FILE] [--batches 1,8]

Per head shape (V, D) of the target models: hidden rows like a final RMSNorm's output (unit RMS) and a weight
drawn as HF initialises it, N(0, 0.02). A pretrained head is not at hand on the GPU machine, so each row also
prints how many rows the exact pass had to read: the screen's cost grows with that count. Both paths are
checked to give the same tokens first; time = µs per call inside a CUDA graph (the weights, 0.4-1 GB,
do not fit L2, so every call reads them from HBM). The plain path is what `Transformer.logits` + generate's
`argmax` run.
"""
import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

HEADS = {"llama3.2-1b": (128256, 2048), "llama3.2-3b": (128256, 3072), "qwen2.5-3b": (151936, 2048),
         "gemma-2b": (256000, 2048)}


def graph_us(fn, reps=50):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def main():
    from minilora.generate import argmax
    from minilora.kernels.greedy_head import count_candidates, greedy_tokens, greedy_tokens_reference, screen_head

    parser = argparse.ArgumentParser()
    parser.add_argument("--results")
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()
    lines = [f"## Greedy LM head: bf16 logits + argmax vs the int8 screen ({datetime.date.today().isoformat()})", "",
             f"Card: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}. Command: "
             "`python benchmarks/greedy_head.py`. µs per call in a CUDA graph; W ~ N(0, 0.02) bf16, hidden rows of "
             "unit RMS; tokens checked equal to fp32-summed logits' argmax first; candidates = rows whose exact logit the screen had to compute.", "",
             "| head | V × D | batch | bf16 logits + argmax µs | screened µs | speedup | candidates per row |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, (V, D) in HEADS.items():
        torch.manual_seed(0)
        weight = torch.randn(V, D, device="cuda", dtype=torch.bfloat16) * 0.02
        screened = screen_head(weight)
        for B in map(int, args.batches.split(",")):
            hidden = torch.randn(B, D, device="cuda", dtype=torch.bfloat16)
            plain = lambda: argmax(F.linear(hidden, weight).float())  # noqa: E731
            fast = lambda: greedy_tokens(hidden, weight, screened)  # noqa: E731
            exact = greedy_tokens_reference(hidden, weight)  # fp32 sums; cuBLAS may reduce split-K in bf16
            if not torch.equal(exact, fast()):
                raise AssertionError(f"{name} B={B}: tokens differ {exact.tolist()} vs {fast().tolist()}")
            if not torch.equal(exact, plain()):
                print(f"{name} B={B}: cuBLAS logits pick {plain().tolist()}, fp32 sums {exact.tolist()}")
            count = count_candidates(hidden, weight, screened).float().mean().item()
            t_plain, t_fast = graph_us(plain), graph_us(fast)
            lines.append(f"| {name} | {V} × {D} | {B} | {t_plain:.1f} | {t_fast:.1f} | {t_plain / t_fast:.2f}× | "
                         f"{count:,.0f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
