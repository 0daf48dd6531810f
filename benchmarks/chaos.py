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

With `--signal TERM` each stop is a SIGTERM (a pod's eviction or spot preemption) instead:
every stopped process must exit 143 and leave no run RUNNING (checked right after each stop),
and the table adds the time from SIGTERM to exit and the work lost: for each level resumed
from a progress checkpoint, the iteration it stopped at (the step saved in its progress file
at the stop) minus the iteration the next attempt resumed from.

    python benchmarks/chaos.py --config configs/tiny.yaml --kills 12 --seed 22 --signal TERM \
        --set train.iterations=600 --set train.checkpoint_every=50
"""
from __future__ import annotations

import argparse
import io
import os
import re
import resource
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
    stop_s: float | None = None          # SIGTERM to exit, seconds
    stop_cpu_s: float | None = None      # CPU seconds the process used from SIGTERM to exit
    running_after: int = 0               # runs RUNNING right after a SIGTERM
    saved: dict[str, int] = field(default_factory=dict)    # progress file → step at the stop
    resumed: dict[str, int] = field(default_factory=dict)  # progress file → step resumed from


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
    signal: str = "KILL"
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


RESUMED = re.compile(r"resumed from the progress checkpoint at iteration (\d+) of \d+ \((.+)\)")


def resumed_from(stderr: str) -> dict[str, int]:
    """progress file → iteration, from a process's `resumed from ...` lines."""
    return {m.group(2): int(m.group(1)) for m in RESUMED.finditer(stderr)}


def progress_steps(folder: Path) -> dict[str, int]:
    """progress file → the iteration it holds, for every progress checkpoint under `folder`."""
    import torch

    found = {}
    for path in folder.glob("runs/*/replicate_*/level_*/*/progress.pt"):
        body = path.read_bytes().partition(b"\n")[2]
        found[str(path)] = torch.load(io.BytesIO(body), weights_only=True)["step"]
    return found


def run_to_end(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Run uninterrupted; its duration in seconds. A failure is an error."""
    return run_to_end_logged(cmd, cwd, env)[0]


def run_to_end_logged(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    """(duration in seconds, stderr) of an uninterrupted run. A failure is an error."""
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return time.monotonic() - t0, proc.stderr


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a running process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU seconds of every child process waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_killed(cmd: list[str], cwd: Path, env: dict[str, str], delay_s: float,
               store: int, sig: str = "KILL") -> Attempt:
    """Start, send SIGKILL (or SIGTERM) after `delay_s` unless it finished first."""
    proc, lines, err = start(cmd, cwd, env)
    try:
        proc.wait(timeout=delay_s)
    except subprocess.TimeoutExpired:
        phase = phase_of(lines[-1] if lines else "")
        cpu_before, children_before = cpu_s(proc.pid), children_cpu_s()
        sent = time.monotonic()
        proc.send_signal(getattr(signal, f"SIG{sig}"))
        code = proc.wait(timeout=120)
        stop_s = time.monotonic() - sent
        # CPU seconds from the signal to the exit: what a pod needs of its CPU request
        # (the wall time on a shared machine depends on everything else running)
        stop_cpu_s = children_cpu_s() - children_before - cpu_before
        for reader in proc.readers:
            reader.join(timeout=30)
        # -15: died of the signal itself, during interpreter start-up or shutdown (before the
        # CLI's handler exists, or after its work is done: nothing open); a shell or the
        # kubelet reports 143 for it as well.
        outside = not lines or lines[-1].startswith("done:")
        if sig == "TERM" and code != 143 and not (code == -signal.SIGTERM and outside):
            raise RuntimeError(f"SIGTERM: exit {code}, not 143:\n{''.join(err[-20:])}")
        return Attempt(store, delay_s, True, phase, code, stop_s if sig == "TERM" else None,
                       resumed=resumed_from("".join(err)), stop_cpu_s=stop_cpu_s)
    for reader in proc.readers:
        reader.join(timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"resume exited {proc.returncode}:\n{''.join(lines[-5:] + err[-20:])}")
    return Attempt(store, delay_s, False, "finished first", 0,
                   resumed=resumed_from("".join(err)))


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
          overrides: list[str] = (), echo: Callable[[str], None] = print,
          sig: str = "KILL") -> Outcome:
    """The whole procedure (see the module doc); prints a line per kill through `echo`."""
    rng = random.Random(seed)
    name = f"chaos-{seed}" if sig == "KILL" else f"chaos-{sig.lower()}-{seed}"

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
    out, i = Outcome(signal=sig), 0
    while out.kills < kills:
        i += 1
        folder, uri, exp_name = store(i)
        cmd, env = prune_command(config, folder, exp_name, list(overrides)), store_env(uri)
        # No store before the first kill: a kill may land while the store is created
        # (tracker.prepare_store builds it aside and links it into place).
        while out.kills < kills:
            attempt = run_killed(cmd, folder, env, rng.uniform(0, duration), i, sig)
            out.attempts.append(attempt)
            if not attempt.killed:
                break
            out.kills += 1
            attempt.saved = progress_steps(folder)
            if sig == "TERM":
                attempt.running_after = audit(uri, exp_name).running
            echo(f"  kill {out.kills}: store {i}, after {attempt.delay_s:5.1f}s, "
                 f"last reported: {attempt.phase}" + (
                     f"; exit {attempt.returncode} {attempt.stop_s:.2f}s "
                     f"({attempt.stop_cpu_s:.2f} CPU s) after SIGTERM, "
                     f"{attempt.running_after} run(s) RUNNING, progress saved at "
                     f"{sorted(attempt.saved.values()) or 'none'}" if sig == "TERM" else ""))
        else:
            _, err = run_to_end_logged(cmd, folder, env)  # the final resume
            out.attempts.append(Attempt(i, None, False, "final resume", 0,
                                        resumed=resumed_from(err)))
        row = compare(reference, audit(uri, exp_name))
        for k in ("levels_lost", "duplicate_runs", "duplicate_versions", "running"):
            setattr(out, k, getattr(out, k) + row[k])
        out.identical = out.identical and row["identical"]
    return out


def work_lost(attempts: list[Attempt]) -> list[int]:
    """Iterations trained again after each stop that left a progress checkpoint: the step
    saved at the stop minus the step the next attempt of that store resumed from."""
    lost = []
    for stopped, nxt in zip(attempts, attempts[1:]):
        if stopped.killed and nxt.store == stopped.store:
            lost += [step - nxt.resumed[path] for path, step in stopped.saved.items()
                     if path in nxt.resumed]
    return lost


def format_table(out: Outcome) -> str:
    head = ("kills", "levels lost", "duplicate runs", "duplicate model versions",
            "runs left RUNNING", "final metrics identical")
    row = (out.kills, out.levels_lost, out.duplicate_runs, out.duplicate_versions, out.running,
           "yes" if out.identical else "no")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| " + " | ".join(str(v) for v in row) + " |"]
    if out.signal == "TERM":
        stops = [a for a in out.attempts if a.killed]
        times = sorted(a.stop_s for a in stops)
        cpu = sorted(a.stop_cpu_s for a in stops)
        lost = work_lost(out.attempts)
        lines += ["", "| SIGTERMs | exit 143 | RUNNING right after | SIGTERM to exit, median / max "
                  "| CPU s used after SIGTERM, median / max | resumed mid-level "
                  "| iterations trained again, max |", "|---|---|---|---|---|---|---|",
                  f"| {len(stops)} | {sum(a.returncode in (143, -signal.SIGTERM) for a in stops)} | "
                  f"{sum(a.running_after for a in stops)} | {times[len(times) // 2]:.2f} s / "
                  f"{times[-1]:.2f} s | {cpu[len(cpu) // 2]:.2f} / {cpu[-1]:.2f} | {len(lost)} | "
                  f"{max(lost, default=0)} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--seed", type=int, default=None, help="default: random, printed")
    p.add_argument("--tracking-uri", default=None,
                   help="a tracking server (default: a SQLite file per store in a temp folder)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--signal", choices=("KILL", "TERM"), default="KILL",
                   help="SIGKILL (default) or SIGTERM, which must exit 143 leaving nothing RUNNING")
    args = p.parse_args(argv)
    seed = random.randrange(10**6) if args.seed is None else args.seed
    with tempfile.TemporaryDirectory(prefix="ticketsmith-chaos-") as tmp:
        out = chaos(args.config, args.kills, seed, Path(tmp), args.tracking_uri, args.overrides,
                    sig=args.signal)
    print(format_table(out))
    clean = not (out.levels_lost or out.duplicate_runs or out.duplicate_versions or out.running
                 or any(a.running_after for a in out.attempts) or any(work_lost(out.attempts)))
    return 0 if clean and out.identical else 1


if __name__ == "__main__":
    sys.exit(main())
