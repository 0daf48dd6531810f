"""Tokens per second and dollars per million tokens for every level of a finished language-model
experiment: what `experiment.benchmark` runs during `prune`, and what the run, the MLflow UI and
the report read back.

Each level's served model of replicate 0 (level 0: dense; level k: the ticket) is timed by
`lm_benchmark.benchmark_lm_model` side by side with its own masked model in dense torch, which
does exactly the dense network's work (same shapes, zeros stored): so every level's speedup and
cost are against dense, measured in one process. The settings come from the config's `serving`
section; a level whose `benchmark.json` was made with the same settings is read, not re-run.

What a level ships, per batch size (`served`): the fastest exact format by decode tokens/s,
dense included (a deployment keeps dense where nothing beats it); level 0 ships dense.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ticketsmith.engine.store import RunStore
from ticketsmith.serving.benchmark import write_benchmark
from ticketsmith.serving.lm_benchmark import benchmark_lm_checkpoint, memory_bandwidth
from ticketsmith.serving.plan.layout import default_threads

log = logging.getLogger("ticketsmith.benchmark")
# Dense against itself beyond this range: the machine was too busy for a single ratio.
NOISE_RANGE = (0.5, 2.0)


def noisy(result: dict[str, Any]) -> bool:
    """Whether dense timed against itself strayed beyond `NOISE_RANGE` in any phase/batch."""
    lo, hi = NOISE_RANGE
    return any(v["min"] < lo or v["max"] > hi
               for v in result["environment"].get("noise_floor", {}).values())


def served(result: dict[str, Any], bs: int) -> dict[str, Any] | None:
    """The row a deployment of this level would run at batch `bs` (see the module docstring)."""
    rows = [r for r in result.get("results", []) if r["batch_size"] == bs]
    if result.get("model", {}).get("level") == 0:
        rows = [r for r in rows if r["format"] == "dense"]
    return max(rows, key=lambda r: r["decode_tokens_per_s"], default=None)


def dense_row(result: dict[str, Any], bs: int) -> dict[str, Any] | None:
    return next((r for r in result.get("results", [])
                 if r["batch_size"] == bs and r["format"] == "dense"), None)


def benchmark_lm_experiment(run_root: str | Path, records: list[dict], settings: dict[str, Any],
                            *, threads: int | None = None, device: str = "cpu",
                            allow_factory: bool | str | None = False,
                            force: bool = False) -> list[dict[str, Any]]:
    """Benchmark each level's replicate-0 served model; return the results in level order,
    each with `level`, `variant` and `path` (of its benchmark.json, written next to the
    checkpoint) added. settings: `benchmark_lm_model` keywords (batch_sizes, prompt_tokens,
    new_tokens, trials, prefill_reps, usd_per_hour, node)."""
    threads = threads or default_threads()
    store = RunStore(Path(run_root))
    levels = sorted({r["level"] for r in records if r.get("replicate", 0) == 0
                     and r["variant"] == ("dense" if r["level"] == 0 else "ticket")})
    request = json.loads(json.dumps({"threads": threads, "device": device, **settings}))
    out, bandwidth = [], None
    for level in levels:
        variant = "dense" if level == 0 else "ticket"
        target = store.benchmark_path(0, level, variant)
        where = {"level": level, "variant": variant, "path": str(target)}
        if target.is_file() and not force:
            old = json.loads(target.read_text())
            if old.get("settings", {}).get("request") == request:
                out.append({**old, **where})
                continue
        path = store.checkpoint_path(0, level, variant)
        bandwidth = bandwidth or memory_bandwidth()  # one machine: measured once (seconds)
        result = benchmark_lm_checkpoint(path, threads=threads, device=device,
                                         allow_factory=allow_factory, bandwidth=bandwidth,
                                         **settings)
        if noisy(result) and threads > 1:
            # Shared cores stall multi-threaded turns (docs/serving.md): measure again at one
            # thread, which such stalls do not reach, rather than record wild ratios.
            log.warning("level %d: dense against itself strayed beyond %s-%sx; measuring again "
                        "at 1 thread", level, *NOISE_RANGE)
            result = benchmark_lm_checkpoint(path, threads=1, device=device,
                                             allow_factory=allow_factory, bandwidth=bandwidth,
                                             **settings)
            result["environment"]["first_attempt"] = {"threads": threads, "noisy": True}
        result["settings"]["request"] = request
        write_benchmark(result, target)
        out.append({**result, **where})
    return out
