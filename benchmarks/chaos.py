"""Kill a real experiment at random moments; show that nothing is lost or duplicated.

Runs `python -m ticketsmith.prune` as a real process against a real tracking store (a SQLite
file per store in a temporary folder, or `--tracking-uri` for a server). First one
uninterrupted run in a fresh store: the reference, and the measured duration. Then SIGKILL
at N seeded random moments spread over that duration (start-up, training, artifact upload,
gating, registry, report); after each kill the same command runs again, and may itself be
killed. A run that finishes before its kill lands completes that store; the next kill starts
a fresh one. Every store is finally compared with the reference:

    levels lost          finished (replicate, level, variant) runs of the reference missing
    duplicate runs       non-deleted runs sharing hash/replicate/level/variant
    duplicate versions   model versions of one registered model for the same run key
    left RUNNING         non-deleted runs still RUNNING after the final resume
    identical            every final metric bitwise equal to the reference (CPU)

    python benchmarks/chaos.py --config configs/tiny.yaml --kills 20
    python benchmarks/chaos.py --config configs/tiny.yaml --kills 4 --seed 7 \
        --tracking-uri http://127.0.0.1:5000
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mlflow import MlflowClient
from mlflow.entities import ViewType

from ticketsmith.tracking.tracker import TAG

TIMEOUT_S = 900  # one prune process; a hang is a finding, not a wait
# Metrics that measure time, not results: never compared.
TIMING = ("wall_time_s", "speedup_")


@dataclass
class Attempt:
    """One start of the prune process in a store."""
    store: int
    delay_s: float | None   # when the kill was due (None: run to the end)
    killed: bool
    phase: str              # what the process last reported before the kill
    returncode: int | None


@dataclass
class Audit:
    """What a tracking store holds of one experiment."""
    finished: dict[tuple, dict[str, float]]   # (replicate, level, variant) → final metrics
    duplicate_runs: int
    duplicate_versions: int
    running: int


@dataclass
class Outcome:
    kills: int = 0
    levels_lost: int = 0
    duplicate_runs: int = 0
    duplicate_versions: int = 0
    running: int = 0
    identical: bool = True
    attempts: list[Attempt] = field(default_factory=list)


def prune_command(config: str, store_dir: Path, name: str, overrides: list[str]) -> list[str]:
    """The experiment as a user runs it, with its run folder and report inside `store_dir`."""
    sets = [f"experiment.output_dir={store_dir / 'runs'}", f"experiment.name={name}", *overrides]
    return [sys.executable, "-m", "ticketsmith.prune", "--config", str(Path(config).resolve()),
            "-q", "--report-dir", str(store_dir / "reports"),
            *[a for s in sets for a in ("--set", s)]]


def store_env(tracking_uri: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"}


def phase_of(line: str) -> str:
    """What the process is doing after printing `line` (its last stdout line)."""
    text = line.strip()
    if not text or text.startswith("tracking:"):
        return "start-up"
    if text.startswith("experiment "):
        return "training level 0"
    if text.startswith("r") and " level " in text:
        level = int(text.split(" level ")[1].split()[0])
        return f"level {level} logged, next level or gating"
    if text[0].isdigit():  # a row of the gate table
        return "gating/registry"
    for prefix, phase in (("quality gates", "gating/registry"), ("level", "gating/registry"),
                          ("registry:", "registry"), ("release check", "report"),
                          ("report:", "finishing"), ("done:", "finishing"),
                          ("benchmark:", "gating")):
        if text.startswith(prefix):
            return phase
    return "running"


def start(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen, list[str],
                                                                 list[str]]:
    """Start the process; its stdout and stderr lines collect in the returned lists."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    err: list[str] = []
    proc.readers = [threading.Thread(target=lambda s=s, ls=ls: ls.extend(s), daemon=True)
                    for s, ls in ((proc.stdout, out), (proc.stderr, err))]
    for reader in proc.readers:
        reader.start()
    return proc, out, err


def run_to_end(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Run uninterrupted; its duration in seconds. A failure is an error."""
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return time.monotonic() - t0


def run_killed(cmd: list[str], cwd: Path, env: dict[str, str], delay_s: float,
               store: int) -> Attempt:
    """Start, SIGKILL after `delay_s` unless it finished first."""
    proc, lines, err = start(cmd, cwd, env)
    try:
        proc.wait(timeout=delay_s)
    except subprocess.TimeoutExpired:
        phase = phase_of(lines[-1] if lines else "")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        return Attempt(store, delay_s, True, phase, None)
    if proc.returncode != 0:
        for reader in proc.readers:
            reader.join(timeout=30)
        raise RuntimeError(f"resume exited {proc.returncode}:\n{''.join(lines[-5:] + err[-20:])}")
    return Attempt(store, delay_s, False, "finished first", 0)


def audit(tracking_uri: str, experiment_name: str) -> Audit:
    """Read back what the store holds of `experiment_name` (see the module doc)."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        return Audit({}, 0, 0, 0)
    every = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=50000)
    key = {r.info.run_id: tuple(r.data.tags.get(TAG + k) for k in
                                ("hash", "replicate", "level", "variant")) for r in every}
    live = [r for r in every if r.info.lifecycle_stage == "active"]
    counts: dict[tuple, int] = {}
    for r in live:
        counts[key[r.info.run_id]] = counts.get(key[r.info.run_id], 0) + 1
    finished = {(int(r.data.tags[TAG + "replicate"]), int(r.data.tags[TAG + "level"]),
                 r.data.tags[TAG + "variant"]):
                {k: v for k, v in r.data.metrics.items() if not k.startswith(TIMING)}
                for r in live if r.info.status == "FINISHED"
                and r.data.tags.get(TAG + "role") == "child"}
    versions: dict[tuple, int] = {}
    for mv in client.search_model_versions(max_results=10000):
        if mv.run_id in key:
            k = (mv.name, key[mv.run_id])
            versions[k] = versions.get(k, 0) + 1
    return Audit(finished, sum(n - 1 for n in counts.values()),
                 sum(n - 1 for n in versions.values()),
                 sum(r.info.status == "RUNNING" for r in live))


def compare(reference: Audit, found: Audit) -> dict[str, Any]:
    """One store against the reference: the table's columns for it."""
    lost = [k for k in reference.finished if k not in found.finished]
    same = all(repr(sorted(found.finished[k].items())) == repr(sorted(m.items()))
               for k, m in reference.finished.items() if k in found.finished)
    extra = [k for k in found.finished if k not in reference.finished]
    return {"levels_lost": len(lost), "duplicate_runs": found.duplicate_runs,
            "duplicate_versions": found.duplicate_versions, "running": found.running,
            "identical": same and not lost and not extra}


def chaos(config: str, kills: int, seed: int, workdir: Path, tracking_uri: str | None = None,
          overrides: list[str] = (), echo: Callable[[str], None] = print) -> Outcome:
    """The whole procedure (see the module doc); prints a line per kill through `echo`."""
    rng = random.Random(seed)
    name = f"chaos-{seed}"

    def store(i: int) -> tuple[Path, str, str]:
        folder = workdir / f"store_{i}"
        folder.mkdir(parents=True, exist_ok=True)
        uri = tracking_uri or f"sqlite:///{folder / 'mlflow.db'}"
        return folder, uri, f"{name}-{i}"

    folder, uri, ref_name = store(0)
    duration = run_to_end(prune_command(config, folder, ref_name, list(overrides)), folder,
                          store_env(uri))
    reference = audit(uri, ref_name)
    echo(f"seed {seed}: uninterrupted run {duration:.1f}s, {len(reference.finished)} runs; "
         f"kills at uniform random moments in [0, {duration:.1f}] s")
    out, i = Outcome(), 0
    while out.kills < kills:
        i += 1
        folder, uri, exp_name = store(i)
        cmd, env = prune_command(config, folder, exp_name, list(overrides)), store_env(uri)
        # No store before the first kill: a kill may land while the store is created
        # (tracker.prepare_store builds it aside and links it into place).
        while out.kills < kills:
            attempt = run_killed(cmd, folder, env, rng.uniform(0, duration), i)
            out.attempts.append(attempt)
            if not attempt.killed:
                break
            out.kills += 1
            echo(f"  kill {out.kills}: store {i}, after {attempt.delay_s:5.1f}s, "
                 f"last reported: {attempt.phase}")
        else:
            run_to_end(cmd, folder, env)  # the final resume
        row = compare(reference, audit(uri, exp_name))
        for k in ("levels_lost", "duplicate_runs", "duplicate_versions", "running"):
            setattr(out, k, getattr(out, k) + row[k])
        out.identical = out.identical and row["identical"]
    return out


def format_table(out: Outcome) -> str:
    head = ("kills", "levels lost", "duplicate runs", "duplicate model versions",
            "runs left RUNNING", "final metrics identical")
    row = (out.kills, out.levels_lost, out.duplicate_runs, out.duplicate_versions, out.running,
           "yes" if out.identical else "no")
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      "| " + " | ".join(str(v) for v in row) + " |"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--seed", type=int, default=None, help="default: random, printed")
    p.add_argument("--tracking-uri", default=None,
                   help="a tracking server (default: a SQLite file per store in a temp folder)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    seed = random.randrange(10**6) if args.seed is None else args.seed
    with tempfile.TemporaryDirectory(prefix="ticketsmith-chaos-") as tmp:
        out = chaos(args.config, args.kills, seed, Path(tmp), args.tracking_uri, args.overrides)
    print(format_table(out))
    clean = not (out.levels_lost or out.duplicate_runs or out.duplicate_versions or out.running)
    return 0 if clean and out.identical else 1


if __name__ == "__main__":
    sys.exit(main())
