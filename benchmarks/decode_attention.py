"""Decode-step attention, three ways at Llama-3.2-3B's heads: the torch path model.py takes without kernels (RoPE
kernel, two index_copy_, SDPA with the additive mask); minilora/kernels/decode_attention.py's two launches (RoPE + cache
write, attention) plus a combine launch when split; minilora/kernels/decode_attention_fused.py's one launch.

    python benchmarks/decode_attention.py [--heads 24 --kv-heads 8 --head-dim 128]

Each variant is captured 20 times in a row in one CUDA graph (as a decode step runs it) and replayed; µs per
call, median of 5 replays. Every kernel variant's output and written cache row are checked against the torch
path first. Key counts S are the cache lengths evaluate.py and benchmarks/generate.py use; the query sits at
slot S / 2 (half the cache filled).
"""
import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minilora.kernels.decode_attention import decode_attention, plan_splits, rope_cache_write  # noqa: E402
from minilora.kernels.decode_attention_fused import decode_attention_fused  # noqa: E402
from minilora.kernels.rope import rope_triton  # noqa: E402

REPEATS = 20


def graph_us(fn):
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPEATS):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / REPEATS)
    return statistics.median(times)


def case(B, S, H, Hkv, Dh):
    dev, dt = "cuda", torch.bfloat16
    slot = torch.tensor(S // 2, device=dev)
    qkv = torch.randn(B, (H + 2 * Hkv) * Dh, device=dev, dtype=dt)
    q, k, v = qkv.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
    angles = torch.rand(B, Dh, device=dev) * 6
    cos, sin = angles.cos().to(dt), angles.sin().to(dt)
    keys = torch.randn(B, Hkv, S, Dh, device=dev, dtype=dt)
    values = torch.randn_like(keys)
    positions = torch.arange(S, device=dev).expand(B, S).contiguous()
    segments = torch.where(positions <= S // 2, 1, -1)
    additive = torch.zeros(B, 1, 1, S, device=dev, dtype=dt).masked_fill_((segments != 1)[:, None, None], float("-inf"))
    scale = Dh ** -0.5

    def torch_path():
        qr, kr = rope_triton(q.view(B, 1, H, Dh).transpose(1, 2), k.view(B, 1, Hkv, Dh).transpose(1, 2),
                             cos[:, None], sin[:, None])
        keys.index_copy_(2, slot.reshape(1), kr)
        values.index_copy_(2, slot.reshape(1), v.view(B, 1, Hkv, Dh).transpose(1, 2))
        return F.scaled_dot_product_attention(qr, keys, values, attn_mask=additive, scale=scale, enable_gqa=True)

    def separate(splits):  # 2 launches, 3 when split
        def run():
            qr = rope_cache_write(q, k, v, cos, sin, keys, values, slot)
            return decode_attention(qr, keys, values, positions, segments, slot, scale, splits=splits)
        return run

    def fused(splits):  # 1 launch
        return lambda: decode_attention_fused(q, k, v, cos, sin, keys, values, positions, segments, slot, scale,
                                              splits=splits)

    expected = torch_path()[:, :, 0].float()
    written = keys[:, :, S // 2].clone(), values[:, :, S // 2].clone()
    rows = {"torch (rope, index_copy x2, SDPA)": graph_us(torch_path)}
    default = plan_splits(B, Hkv, S, Dh)[0]
    for splits in sorted({plan_splits(B, Hkv, S, Dh, n)[0] for n in (1, 2, 4, 8, default)}):
        label = f"{splits} split{'s' if splits > 1 else ''}{' (default)' if splits == default else ''}"
        for name, make in (("two/three launches", separate), ("fused, one launch", fused)):
            keys[:, :, S // 2], values[:, :, S // 2] = 0, 0  # the call must write the slot's rows again
            error = (make(splits)().float() - expected).abs().max().item()
            row_error = (keys[:, :, S // 2] - written[0]).abs().max().item()
            assert error < 0.05 and row_error < 0.05 and torch.equal(values[:, :, S // 2], written[1]), \
                (B, S, name, splits, error, row_error)
            rows[f"{name}, {label}"] = graph_us(make(splits))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, H={args.heads} Hkv={args.kv_heads} Dh={args.head_dim}, bf16; µs per call")
    print("| batch | cache slots S | path | µs |\n|---:|---:|---|---:|")
    for B, S in [(1, 256), (1, 512), (1, 2048), (8, 256), (8, 512), (64, 512)]:
        for name, us in case(B, S, args.heads, args.kv_heads, args.head_dim).items():
            print(f"| {B} | {S} | {name} | {us:.1f} |")


if __name__ == "__main__":
    main()
