"""Serving speed of a real LeNet-300-100 ticket: every format against dense, side by side.

Runs (or reuses, when its run directory is complete) the quick experiment in
configs/imp_mnist.yaml - about 4 minutes on a 2-core CPU the first time - then benchmarks the
sparsest level's ticket at batch 1 and 256, once per thread count, and prints each format's
measured speedup over dense beside the ideal of the bytes-moved model (and of a
multiply-add count, the bound that matters once large batches make dense compute-bound).

    python benchmarks/serving.py [--output-dir runs] [--threads N[,M]] [--trials 30]

Threads default to all cores, as `ticketsmith benchmark` and `prune` use. The last lines set
the serving plan that ships with the registered ticket (its fastest checked route per batch
size) against the targets: >= 2.5x at batch 1 and >= 5x at batch 256.

Ratios only: every speedup is measured in one process against dense, interleaved round by
round, so machine noise hits both sides; the JSON of each run lands next to the checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ticketsmith.serving.plan.layout import HEADLINE_BATCH_SIZES

REPO = Path(__file__).resolve().parents[1]
# the best checked in-process format against dense, at each headline batch size
TARGETS = dict(zip(HEADLINE_BATCH_SIZES, (2.5, 5.0)))


def summary(runs: dict[int, dict]) -> str:
    from ticketsmith.serving.plan.layout import shipped

    first = next(iter(runs.values()))
    m, env = first["model"], first["environment"]
    sizes = sorted({r["batch_size"] for r in first["results"]})
    lines = [f"\n{m['name']} level {m.get('level')} ticket, sparsity {m['sparsity']:.2%} "
             f"({m['nonzero_params']:,} of {m['total_params']:,} parameters nonzero); "
             f"{env['cpu']}, torch {env['torch']}, load average {env.get('load_average')}",
             "speedup over dense: measured (ideal by bytes moved / by multiply-adds)",
             f"{'format':<16}{'threads':>8}" + "".join(f"{'batch ' + str(b):>28}" for b in sizes)]
    for threads, result in runs.items():
        rows = {(r["format"], r["batch_size"]): r for r in result["results"]}
        for fmt in dict.fromkeys(r["format"] for r in result["results"]):
            cells = []
            for b in sizes:
                r = rows[(fmt, b)]
                cells.append(f"{r['speedup']:.2f}x ({r['ideal_speedup']:.2f}x / "
                             f"{r['ideal_speedup_macs']:.2f}x)" if r["correct"] else "failed")
            lines.append(f"{fmt:<16}{threads:>8}" + "".join(f"{c:>28}" for c in cells))
        plan = result["plan"]["formats"]
        lines.append(f"{'':<16}{threads:>8}  auto plan: "
                     + ", ".join(f"{k}={v}" for k, v in plan.items()))
        serving = result.get("serving")
        if serving:
            lines.append(f"{'':<16}{threads:>8}  serving plan (ships): " + ", ".join(
                f"batch {b}: {shipped(serving)[int(b)]} {s:.2f}x (target {TARGETS.get(int(b), '-')}x"
                f"{'' if s is None or int(b) not in TARGETS else (', met' if s >= TARGETS[int(b)] else ', missed')})"
                for b, s in serving["speedup"].items() if s is not None))
        floor = result["environment"]["noise_floor"]
        lines.append(f"{'':<16}{threads:>8}  noise floor (dense vs itself, range over rounds): "
                     + ", ".join(f"batch {b} {v['speedup_min']:.2f}-{v['speedup_max']:.2f}x"
                                 for b, v in floor.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ticketsmith.serving.benchmark import benchmark_checkpoint, format_scorecard, write_benchmark
    from ticketsmith.base.config import load_config
    from ticketsmith.engine.lottery import run_experiment
    from ticketsmith.engine.store import RunStore

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default=str(REPO / "runs"), help="experiment run directory")
    p.add_argument("--data-root", default=str(REPO / "data"), help="MNIST folder")
    p.add_argument("--threads", default=None,
                   help="comma-separated thread counts (default: all cores)")
    p.add_argument("--trials", type=int, default=30, help="interleaved rounds per batch size")
    args = p.parse_args(argv)

    cfg = load_config(REPO / "configs" / "imp_mnist.yaml",
                      ["experiment.benchmark=false", f"experiment.output_dir={args.output_dir}",
                       f"data.root={args.data_root}"])
    experiment = run_experiment(cfg, progress=False)
    ckpt = RunStore(experiment.run_root).checkpoint_path(0, cfg.prune.levels, "ticket")
    runs = {}
    from ticketsmith.serving.plan.layout import default_threads

    for threads in (int(t) for t in (args.threads or str(default_threads())).split(",")):
        result = benchmark_checkpoint(ckpt, batch_sizes=HEADLINE_BATCH_SIZES, threads=threads,
                                      trials=args.trials, data_root=args.data_root)
        write_benchmark(result, ckpt.with_name(f"benchmark_serving_t{threads}.json"))
        print(f"\n{format_scorecard(result)}")
        runs[threads] = result
    print(summary(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
