"""What one level of `prune` with `experiment.benchmark` costs for a language model: wall-clock
and CPU seconds of `benchmark_lm_model` at the `serving` section's quick defaults (32-token
prompt, 32 new tokens, batch 1 and 8, 3 rounds, prefill timed 3 times per turn), on
`imp_lm_quick.yaml`'s model (width 128, 4 layers, 4 heads, context 64) with random weights
pruned to 87% by magnitude (about level 4), one thread. The memory-bandwidth measurement, done
once per experiment, is timed on its own.

    python benchmarks/lm_level_time.py [--levels 3]

Prints per model: seconds (wall, CPU) and decode tokens/s per format at batch 1.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from lm_serving import unstructured  # benchmarks/ is the script's folder, so on sys.path
from ticketsmith.engine.transformer import GPT
from ticketsmith.serving.lm_benchmark import benchmark_lm_model, memory_bandwidth


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", type=int, default=3, help="models timed (seeds 0..n-1)")
    args = p.parse_args()
    torch.set_num_threads(1)
    t = time.perf_counter()
    bandwidth = memory_bandwidth()
    print(f"memory bandwidth {bandwidth / 1e9:.1f} GB/s, measured in "
          f"{time.perf_counter() - t:.2f} s (once per experiment)")
    wall, cpu = [], []
    for seed in range(args.levels):
        torch.manual_seed(seed)
        model = unstructured(GPT(256, 64, 4, 4, 128).eval().requires_grad_(False), 0.87)
        t, c = time.perf_counter(), time.process_time()
        result = benchmark_lm_model(model, batch_sizes=[1, 8], prompt_tokens=32, new_tokens=32,
                                    trials=3, prefill_reps=3, bandwidth=bandwidth)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        formats = ", ".join(f"{r['format']} {r['decode_tokens_per_s']:.0f} tok/s"
                            for r in result["results"] if r["batch_size"] == 1)
        print(f"level model {seed}: {wall[-1]:.2f} s wall, {cpu[-1]:.2f} s CPU; batch 1: {formats}")
    print(f"median over {args.levels}: {statistics.median(wall):.2f} s wall, "
          f"{statistics.median(cpu):.2f} s CPU; {torch.get_num_threads()} thread; load average "
          + " ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
