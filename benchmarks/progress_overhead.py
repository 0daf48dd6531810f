"""What do progress checkpoints cost training? (goal: under 1% at the default interval)

Trains a masked LeNet-300-100 (20% density) on MNIST for `--iterations` through
`ticketsmith.engine.train.train`, without progress checkpoints and with one every `--every`
iterations (the default `train.checkpoint_every`), side by side in one process, repeats
interleaved (A B, then B A, ...) so drift in machine load hits both alike. Prints the median
wall time of each, their ratio, and the median time of one checkpoint write (weights, Adam
state, RNG states; written atomically with its checksum). Both runs must end with
bit-identical weights (a checkpoint never changes a result); the script checks it. Times are
CPU seconds of this process (`time.process_time`), which a shared machine disturbs far less
than wall time.

    python benchmarks/progress_overhead.py                     # MNIST from <repo>/data
    python benchmarks/progress_overhead.py --data synthetic --iterations 3000 --repeats 5
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ticketsmith.base.config import TrainConfig
from ticketsmith.engine.masks import prune_to_density
from ticketsmith.engine.models import build_model, prunable_weights
from ticketsmith.engine.progress import Progress
from ticketsmith.engine.train import train

from train_loop import load_data  # noqa: E402 (benchmarks/ is run as a folder of scripts)


class Timed(Progress):
    """A Progress that records the CPU seconds of each write (this process, all threads)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.writes: list[float] = []

    def save(self, *args) -> None:
        t0 = time.process_time()
        super().save(*args)
        self.writes.append(time.process_time() - t0)


def one_run(data, cfg: TrainConfig, every: int | None, folder: Path):
    """(CPU seconds, final weights, checkpoint write CPU seconds) of one masked training run.
    CPU time, not wall time: on a shared machine the wall clock measures the neighbours."""
    torch.manual_seed(0)
    model = build_model("lenet_300_100", data.input_shape, data.num_classes)
    weights = prunable_weights(model)
    mask = prune_to_density(weights, {n: 0.2 for n in weights})
    keeper = None
    if every is not None:
        path = folder / "progress.pt"
        path.unlink(missing_ok=True)
        keeper = Timed(path, {"iterations": cfg.iterations}, every)
    t0 = time.process_time()
    train(model, data, cfg, seed=1, masked=weights, mask=mask, progress=False, checkpoints=keeper)
    cpu = time.process_time() - t0
    return cpu, model.state_dict(), (keeper.writes if keeper else [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=("mnist", "synthetic"), default="mnist")
    p.add_argument("--iterations", type=int, default=3000)
    p.add_argument("--every", type=int, default=TrainConfig.model_fields["checkpoint_every"].default)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data(args.data, torch.device("cpu"))
    cfg = TrainConfig(optimizer="adam", lr=1.2e-3, batch_size=60, iterations=args.iterations,
                      eval_every=100, device="cpu")
    times: dict[str, list[float]] = {"without": [], "with": []}
    writes: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            order = ("without", "with") if i % 2 == 0 else ("with", "without")
            finals = {}
            for kind in order:
                wall, state, w = one_run(data, cfg, args.every if kind == "with" else None,
                                         Path(tmp))
                times[kind].append(wall)
                writes += w
                finals[kind] = state
            assert all(torch.equal(finals["with"][k], finals["without"][k]) for k in state)
    a, b = statistics.median(times["without"]), statistics.median(times["with"])
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), {args.data}, LeNet-300-100 at 20% density, batch 60, "
          f"{args.iterations} iterations, {args.repeats} interleaved repeats")
    print(f"without progress checkpoints: {a:.2f} CPU s (median)")
    print(f"with one every {args.every} iterations: {b:.2f} CPU s (median), "
          f"{len(writes)} writes, median write {statistics.median(writes) * 1000:.1f} CPU ms")
    print(f"overhead: {(b / a - 1) * 100:+.2f}% of training time (ratio {b / a:.4f}); "
          f"per interval: one write = {statistics.median(writes) / (a / args.iterations * args.every) * 100:.2f}% "
          f"of {args.every} iterations")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
