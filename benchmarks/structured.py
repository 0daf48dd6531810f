"""Serving speed of a structured LeNet-300-100 ticket (whole neurons removed) against dense.

Runs (or reuses, when its run directory is complete) the quick structured experiment in
configs/imp_mnist_structured.yaml, takes every ticket level that removes between `--low` and
`--high` of the weights and passes the quality gate (accuracy within the gate's points of
dense), and benchmarks each as `dense` against `compacted` (the smaller dense network
the structured mask compacts into) at batch 1 and 256, in each runtime the serving plan uses
(torch, ONNX Runtime, numpy), each against the dense network in the same runtime, at the
default thread count (all cores). The
benchmark is repeated `--repeats` times; each repeat is a side-by-side ratio over interleaved
rounds, and the median over repeats is the figure (a noisy machine shifts single repeats).

    python benchmarks/structured.py [--output-dir runs] [--repeats 5] [--trials 30]
        [--targets 1=1.8,256=4] [--config configs/imp_mnist_structured.yaml] [--set KEY=VALUE]

Targets (issue 14): >= 1.8x at batch 1 and >= 4x at batch 256 for a ticket that removes ~80%.
Exit code 1 when a benchmarked level misses a target in any runtime (its row says "NOT met"),
0 when every one is met.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import median

from ticketsmith.serving.plan.layout import HEADLINE_BATCH_SIZES

REPO = Path(__file__).resolve().parents[1]
TARGETS = dict(zip(HEADLINE_BATCH_SIZES, (1.8, 4.0)))  # compacted vs dense, per batch size


def pick_levels(records: list[dict], low: float, high: float, max_drop: float) -> list[dict]:
    """Replicate-0 tickets with sparsity in [low, high] that pass the accuracy gate."""
    dense = next(r for r in records if r["level"] == 0 and r["replicate"] == 0)
    ok = [r for r in records if r["variant"] == "ticket" and r["replicate"] == 0
          and low <= r["sparsity"] <= high
          and 100 * (dense["test_accuracy"] - r["test_accuracy"]) <= max_drop]
    if not ok:
        raise SystemExit(f"no ticket with {low:.0%}-{high:.0%} sparsity passes the gate")
    return sorted(ok, key=lambda r: r["level"])


RUNTIMES = ("torch", "onnxruntime", "numpy")  # compacted against dense, each in its own runtime
FORMATS = ["compacted", "onnxruntime", "numpy", "onnxruntime_dense", "numpy_dense"]


def bench_level(run_root: Path, level: int, repeats: int, trials: int, data_root: str,
                batch_sizes: tuple[int, ...] = tuple(TARGETS)):
    """Per runtime and batch size, the compacted-vs-dense speedups of `repeats` runs.

    torch: `compacted` against `dense`; onnxruntime / numpy: the serving plan's route against
    the uncompacted network with dense kernels in the same runtime (`<route>_dense`)."""
    from ticketsmith.engine.store import RunStore
    from ticketsmith.serving.benchmark import benchmark_checkpoint

    ckpt = RunStore(run_root).checkpoint_path(0, level, "ticket")
    speedups = {(rt, bs): [] for rt in RUNTIMES for bs in batch_sizes}
    floors: dict[int, list[float]] = {bs: [] for bs in batch_sizes}
    result: dict = {}
    for _ in range(repeats):
        result = benchmark_checkpoint(ckpt, batch_sizes=batch_sizes, formats=FORMATS,
                                      trials=trials, data_root=data_root)
        for r in result["results"]:
            if r["format"] == "compacted" and r["correct"]:
                speedups[("torch", r["batch_size"])].append(r["speedup"])
        same = (result.get("serving") or {}).get("same_runtime", {})
        for rt, by_bs in same.items():
            for bs, x in by_bs.items():
                speedups[(rt, int(bs))].append(x)
        for bs, v in result["environment"]["noise_floor"].items():
            floors[int(bs)].append(v["speedup"])
    return speedups, floors, result


def parse_targets(text: str) -> dict[int, float]:
    """'1=1.8,256=4' -> {1: 1.8, 256: 4.0}: the speedup each batch size must reach."""
    try:
        out = {int(b): float(x) for b, x in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCH=SPEEDUP[,BATCH=SPEEDUP...], got "
                                         f"{text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return out


def print_level(pick: dict, reinit: dict | None, shape: str, speedups: dict, floors: dict,
                targets: dict[int, float]) -> bool:
    """One row per runtime and batch size; whether every row met its target."""
    met = True
    for (rt, bs), got_all in speedups.items():
        got = median(got_all) if got_all else float("nan")
        ok = got >= targets[bs]  # an unmeasured runtime (nan) misses its target
        met &= ok
        print(f"{pick['level']:>5}{pick['sparsity']:>9.1%}{pick['test_accuracy']:>8.2%}"
              f"{reinit['test_accuracy'] if reinit else float('nan'):>9.2%}{shape:>50}"
              f"{rt:>12}{bs:>6}{got:>17.2f}x{', '.join(f'{s:.2f}' for s in got_all):>40}"
              f"{median(floors[bs]):>11.2f}x{'met' if ok else 'NOT met':>8}")
    return met


def main(argv: list[str] | None = None) -> int:
    """0 when every benchmarked level meets every target, 1 when one is missed."""
    from ticketsmith.base.config import load_config
    from ticketsmith.engine.lottery import run_experiment
    from ticketsmith.serving.plan.layout import shipped

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default=str(REPO / "runs"), help="experiment run directory")
    p.add_argument("--data-root", default=str(REPO / "data"), help="MNIST folder")
    p.add_argument("--repeats", type=int, default=5, help="benchmark repeats (median taken)")
    p.add_argument("--trials", type=int, default=30, help="interleaved rounds per batch size")
    p.add_argument("--low", type=float, default=0.7, help="lowest sparsity benchmarked")
    p.add_argument("--high", type=float, default=0.9, help="highest sparsity benchmarked")
    p.add_argument("--targets", type=parse_targets, default=dict(TARGETS),
                   help="speedup to reach per batch size (default: "
                   f"{','.join(f'{b}={x}' for b, x in TARGETS.items())})")
    p.add_argument("--config", default=str(REPO / "configs" / "imp_mnist_structured.yaml"),
                   help="the structured experiment")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (repeatable)")
    args = p.parse_args(argv)
    targets = args.targets

    cfg = load_config(args.config, ["experiment.benchmark=false",
                                    f"experiment.output_dir={args.output_dir}",
                                    f"data.root={args.data_root}", *args.set])
    experiment = run_experiment(cfg, progress=False)
    records = experiment.records
    dense = next(r for r in records if r["level"] == 0)
    print(f"{'level':>5}{'removed':>9}{'ticket':>8}{'re-init':>9}{'compacted to':>50}"
          f"{'runtime':>12}{'batch':>6}{'speedup (median)':>18}{'repeats':>40}"
          f"{'noise floor':>12}{'target':>8}")
    env: dict = {}
    met = True
    for pick in pick_levels(records, args.low, args.high, cfg.gate.max_accuracy_drop):
        level = pick["level"]
        reinit = next((r for r in records if r["level"] == level
                       and r["variant"] == "random_reinit"), None)
        speedups, floors, result = bench_level(experiment.run_root, level, args.repeats,
                                               args.trials, args.data_root, tuple(targets))
        env = result["environment"]
        note = next(r["note"] for r in result["results"] if r["format"] == "compacted")
        shape = note.split(", ", 1)[1] if ", " in note else note
        met &= print_level(pick, reinit, shape, speedups, floors, targets)
        serving = result.get("serving") or {}
        if serving:
            print(f"{'':>5} shipped plan against torch dense: " + ", ".join(
                f"batch {b}: {shipped(serving)[int(b)]} {s:.2f}x"
                for b, s in serving["speedup"].items() if s))
    print(f"dense test accuracy {dense['test_accuracy']:.2%}; {env.get('cpu')}, torch "
          f"{env.get('torch')}, threads {env.get('threads')} (all cores), load average "
          f"{env.get('load_average')}; {args.repeats} repeats x {args.trials} interleaved rounds; "
          f"targets: {', '.join(f'>= {t}x at batch {b}' for b, t in targets.items())}: "
          + ("met" if met else "NOT met"))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
