"""Serving speed of a structured LeNet-300-100 ticket (whole neurons removed) against dense.

Runs (or reuses, when its run directory is complete) the quick structured experiment in
configs/imp_mnist_structured.yaml, picks the sparsest ticket level that removes at most
`--max-sparsity` of the weights and passes the quality gate (mean accuracy within the gate's
points of dense), and benchmarks it as `dense` against `compacted` (the smaller dense network
the structured mask compacts into) at batch 1 and 256, at torch's default thread count. The
benchmark is repeated `--repeats` times; each repeat is a side-by-side ratio over interleaved
rounds, and the median over repeats is the figure (a noisy machine shifts single repeats).

    python benchmarks/structured.py [--output-dir runs] [--repeats 5] [--trials 30]

Targets (issue 14): >= 1.8x at batch 1 and >= 4x at batch 256 for a ticket that removes ~80%.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
TARGETS = {1: 1.8, 256: 4.0}


def pick_level(records: list[dict], max_sparsity: float, max_drop: float) -> dict:
    """The sparsest replicate-0 ticket within `max_sparsity` that passes the accuracy gate."""
    dense = next(r for r in records if r["level"] == 0 and r["replicate"] == 0)
    ok = [r for r in records if r["variant"] == "ticket" and r["replicate"] == 0
          and r["sparsity"] <= max_sparsity
          and 100 * (dense["test_accuracy"] - r["test_accuracy"]) <= max_drop]
    if not ok:
        raise SystemExit(f"no ticket within {max_sparsity:.0%} sparsity passes the gate")
    return max(ok, key=lambda r: r["sparsity"])


def main(argv: list[str] | None = None) -> int:

    from ticketsmith.serving.benchmark import benchmark_checkpoint
    from ticketsmith.config import load_config
    from ticketsmith.engine.lottery import run_experiment
    from ticketsmith.engine.store import RunStore

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default=str(REPO / "runs"), help="experiment run directory")
    p.add_argument("--data-root", default=str(REPO / "data"), help="MNIST folder")
    p.add_argument("--repeats", type=int, default=5, help="benchmark repeats (median taken)")
    p.add_argument("--trials", type=int, default=30, help="interleaved rounds per batch size")
    p.add_argument("--max-sparsity", type=float, default=0.82,
                   help="pick the sparsest passing ticket at or below this sparsity")
    args = p.parse_args(argv)

    cfg = load_config(REPO / "configs" / "imp_mnist_structured.yaml",
                      ["experiment.benchmark=false", f"experiment.output_dir={args.output_dir}",
                       f"data.root={args.data_root}"])
    experiment = run_experiment(cfg, progress=False)
    records = experiment.records
    pick = pick_level(records, args.max_sparsity, cfg.gate.max_accuracy_drop)
    level = pick["level"]
    dense = next(r for r in records if r["level"] == 0)
    reinit = next((r for r in records if r["level"] == level and r["variant"] == "random_reinit"),
                  None)
    ckpt = RunStore(experiment.run_root).checkpoint_path(0, level, "ticket")
    speedups: dict[int, list[float]] = {bs: [] for bs in TARGETS}
    floors: dict[int, list[float]] = {bs: [] for bs in TARGETS}
    result = {}
    for _ in range(args.repeats):
        result = benchmark_checkpoint(ckpt, batch_sizes=tuple(TARGETS), formats=["compacted"],
                                      trials=args.trials, data_root=args.data_root)
        for r in result["results"]:
            if r["format"] == "compacted" and r["correct"]:
                speedups[r["batch_size"]].append(r["speedup"])
        for bs, v in result["environment"]["noise_floor"].items():
            floors[int(bs)].append(v["speedup"])
    env, model = result["environment"], result["model"]
    shape = [r["note"] for r in result["results"] if r["format"] == "compacted"][:1]
    print(f"structured ticket: level {level}, {pick['sparsity']:.1%} of the weights removed "
          f"({model['nonzero_params']:,} of {model['total_params']:,} parameters nonzero); "
          f"compacted: {shape[0] if shape else '?'}")
    print(f"test accuracy: dense {dense['test_accuracy']:.2%}, ticket {pick['test_accuracy']:.2%}"
          + (f", random re-init of the same structure {reinit['test_accuracy']:.2%}" if reinit else ""))
    print(f"{env['cpu']}, torch {env['torch']}, threads {env['threads']} (torch default), "
          f"load average {env.get('load_average')}; {args.repeats} repeats x {args.trials} rounds")
    print(f"{'batch':>6}{'compacted vs dense (median)':>30}{'repeats':>40}{'noise floor':>14}{'target':>8}")
    ok = True
    for bs, target in TARGETS.items():
        got = median(speedups[bs]) if speedups[bs] else float("nan")
        ok &= got >= target
        print(f"{bs:>6}{got:>29.2f}x{', '.join(f'{s:.2f}' for s in speedups[bs]):>40}"
              f"{median(floors[bs]):>13.2f}x{target:>7.1f}x")
    print("targets met" if ok else "targets NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
