"""Tokens per second of GPT tickets against their dense model, side by side in one process.

For each width (default 128 with 4 layers and 4 heads, and 384 with 6 layers and 6 heads;
byte vocabulary, context 256) a GPT with random weights (GPT-2's initialisation: the
timing does not depend on what was learned) is masked two ways: 90% of every block Linear's
weights by magnitude (unstructured) and half of every block's heads and MLP hidden units
(structured). Each ticket runs `serving.lm_benchmark.benchmark_lm_model`: dense with the KV
cache against the compacted model and the per-layer measured sparse kernels, prefill of a
128-token prompt and decode of 128 tokens at batch 1 and 8, dense also against itself.

    python benchmarks/lm_serving.py [--widths 128,384] [--trials 5] [--threads 1]
                                    [--output lm_serving.json]

Prints one line per ticket, format and batch (decode and prefill speedups with their bounds,
dollars per million tokens) and writes every figure to the JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ticketsmith.engine.transformer import GPT
from ticketsmith.serving.lm_benchmark import benchmark_lm_model, format_lm_scorecard

SIZES = {128: (4, 4), 384: (6, 6)}  # width -> (layers, heads)


def unstructured(model: GPT, sparsity: float = 0.9) -> GPT:
    """Each block Linear pruned to `sparsity` by magnitude (in place)."""
    for b in model.blocks:
        for w in (b.attn.qkv.weight, b.attn.proj.weight, b.mlp.fc.weight, b.mlp.proj.weight):
            cut = w.abs().flatten().kthvalue(int(sparsity * w.numel())).values
            w.mul_(w.abs() > cut)
    return model


def structured(model: GPT) -> GPT:
    """Half the heads and half the MLP hidden units of every block zeroed (in place): their
    output columns, and the rows that feed them, as a structured ticket leaves them."""
    for b in model.blocks:
        a, d = b.attn, b.attn.head_dim
        half = a.heads // 2 * d
        a.proj.weight[:, :half] = 0
        for j in range(3):
            a.qkv.weight[j * a.heads * d:j * a.heads * d + half] = 0
        b.mlp.proj.weight[:, ::2] = 0
        b.mlp.fc.weight[::2] = 0
    return model


def gpt(width: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    layers, heads = SIZES.get(width, (4, max(1, width // 32)))
    return GPT(256, 256, layers, heads, width).eval().requires_grad_(False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="128,384")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--output", default="lm_serving.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = {}
    for width in (int(w) for w in args.widths.split(",")):
        for name, mask in (("unstructured_90", unstructured), ("structured_half", structured)):
            result = benchmark_lm_model(mask(gpt(width)), trials=args.trials,
                                        batch_sizes=[int(b) for b in args.batch_sizes.split(",")])
            out[f"width_{width}/{name}"] = result
            print(f"== width {width}, {name}")
            print(format_lm_scorecard(result), flush=True)
    Path(args.output).write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
