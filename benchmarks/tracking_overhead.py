"""What does tracking cost? The same experiment untracked and tracked, side by side.

The work of open_lth's `lottery --default_hparams=mnist_lenet_300_100 --training_steps=2ep
--levels=3`, mapped onto this project's config: LeNet-300-100 on all 60K MNIST training images
(open_lth holds out no validation set), SGD lr 0.1, batch 128, 2 epochs per level, evaluation
once per epoch (469 steps), 3 levels of global magnitude pruning at 20% with the output layer
left dense (open_lth's `pruning_layers_to_ignore=fc.weight`), the ticket only (open_lth's
lottery trains no random re-init control), one replicate.

Each run is `ticketsmith prune` in a fresh subprocess and a fresh folder (its own
`sqlite:///mlflow.db`, run folder and reports), torch at one thread:
  untracked  `--no-tracking`: the engine alone (train, prune, rewind; run folder written)
  tracked    the default: MLflow runs, figures, gates, registry versions and the report, in a
             tracking process beside training (ticketsmith/sidecar.py); `--inline` measures
             `--inline-tracking` instead, all of it in the training process
Runs are interleaved (U T, then T U, ...) after one unrecorded tracked warm-up run, which also
fills MLflow's schema template cache (see tracking/sqlite_store.py; `--cold-store` empties it
before every tracked run). The overhead is median(tracked) - median(untracked), of wall-clock
time and of CPU time (user + system of the process and the tracking process it waits for,
which machine load barely changes). Beside training, tracking costs more CPU than it adds wall
time: it runs on another core. Exits 1 if the judged overhead misses the target.

    python benchmarks/tracking_overhead.py                        # 3 pairs, target 3 s (wall)
    python benchmarks/tracking_overhead.py --repeats 5 --judge cpu  # on a loaded machine
    python benchmarks/tracking_overhead.py --quick                # 0.25 epoch, 2 levels: a check
    python benchmarks/tracking_overhead.py --inline               # tracking in one process
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CONFIG = """\
data: {{name: mnist, root: {root}, val_size: 0}}
model: {{name: lenet_300_100}}
train: {{optimizer: sgd, lr: 0.1, batch_size: 128, epochs: {epochs}, eval_every: 469, device: cpu}}
prune: {{levels: {levels}, fraction: 0.2, scope: global, layer_fractions: {{out.weight: 0.0}}}}
experiment: {{name: openlth_lenet, seed: 0, replicates: 1, variants: [ticket]}}
"""


def run_once(config: Path, tracked: bool, cache: Path, cold_store: bool,
             inline: bool = False) -> tuple[float, float]:
    """(wall s, CPU s of the process and its children) of one `ticketsmith prune` in a fresh
    folder. A failed run stops the benchmark with its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TICKETSMITH_CACHE_DIR=str(cache),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    if cold_store and tracked:
        shutil.rmtree(cache, ignore_errors=True)
    cmd = [sys.executable, "-m", "ticketsmith", "prune", "-c", str(config), "-q"]
    cmd += (["--inline-tracking"] if inline else []) if tracked else ["--no-tracking"]
    with tempfile.TemporaryDirectory(prefix="overhead-") as folder:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{out}")
    return wall, usage.ru_utime + usage.ru_stime


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):6.2f} s  (min {min(values):.2f}, " \
           f"max {max(values):.2f}; n={len(values)})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved pairs (default 3)")
    ap.add_argument("--epochs", type=float, default=2.0, help="epochs per level (default 2)")
    ap.add_argument("--levels", type=int, default=3, help="pruning levels (default 3)")
    ap.add_argument("--quick", action="store_true", help="0.25 epoch, 2 levels, 2 pairs")
    ap.add_argument("--target", type=float, default=3.0, help="overhead target, s (default 3)")
    ap.add_argument("--judge", choices=("wall", "cpu"), default="wall",
                    help="which overhead meets the target (default wall; cpu on a loaded machine)")
    ap.add_argument("--inline", action="store_true",
                    help="track in the training process (--inline-tracking), not beside it")
    ap.add_argument("--cold-store", action="store_true",
                    help="empty the MLflow schema template cache before every tracked run")
    ap.add_argument("--data-root",
                    default=os.environ.get("TICKETSMITH_DATA_ROOT", str(REPO / "data")),
                    help="folder holding MNIST/ (default $TICKETSMITH_DATA_ROOT or <repo>/data)")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.levels, args.repeats = 0.25, 2, 2
    if args.repeats < 1 or args.epochs <= 0 or args.levels < 0:
        ap.error("--repeats >= 1, --epochs > 0 and --levels >= 0 expected")

    with tempfile.TemporaryDirectory(prefix="overhead-bench-") as scratch:
        config, cache = Path(scratch) / "lottery.yaml", Path(scratch) / "cache"
        config.write_text(CONFIG.format(root=Path(args.data_root).resolve(), epochs=args.epochs,
                                        levels=args.levels))
        load_before = os.getloadavg()
        run_once(config, True, cache, args.cold_store, args.inline)  # warm-up: caches, template
        times: dict[str, list[tuple[float, float]]] = {"untracked": [], "tracked": []}
        for i in range(args.repeats):
            order = ("untracked", "tracked") if i % 2 == 0 else ("tracked", "untracked")
            for kind in order:
                times[kind].append(run_once(config, kind == "tracked", cache, args.cold_store,
                                            args.inline))
        load_after = os.getloadavg()
    return report(args, times, load_before, load_after)


def report(args, times, load_before, load_after) -> int:
    import mlflow
    import torch

    print(f"LeNet-300-100 MNIST lottery: {args.epochs:g} epoch(s) x {args.levels + 1} trainings "
          f"(dense + {args.levels} levels), ticket only, torch 1 thread")
    print(f"environment: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, torch {torch.__version__}, mlflow "
          f"{mlflow.__version__}; load average {load_before[0]:.1f} before, {load_after[0]:.1f} "
          f"after (1 min); schema template {'cold' if args.cold_store else 'warm'}; tracking "
          f"{'in the training process' if args.inline else 'beside training'}")
    overhead = {}
    for i, metric in enumerate(("wall", "cpu")):
        for kind in ("untracked", "tracked"):
            print(f"  {metric:<4} {kind:<9} {spread([t[i] for t in times[kind]])}")
        med = {k: statistics.median(t[i] for t in v) for k, v in times.items()}
        overhead[metric] = med["tracked"] - med["untracked"]
        pairs = [t[i] - u[i] for t, u in zip(times["tracked"], times["untracked"])]
        print(f"  {metric:<4} overhead {overhead[metric]:6.2f} s of {med['untracked']:.2f} s "
              f"({overhead[metric] / med['untracked']:+.0%}); per pair "
              f"{', '.join(f'{p:.2f}' for p in pairs)}")
    met = overhead[args.judge] < args.target
    print(f"target: {args.judge} overhead < {args.target:g} s: "
          f"{'met' if met else 'NOT met'} ({overhead[args.judge]:.2f} s)")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
