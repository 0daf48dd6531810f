"""SIGTERM and SIGKILL on a real `ticketsmith prune` process (a pod's eviction, a spot
preemption, a node lost): SIGTERM exits 143 with one line and no run left RUNNING, and every
stopped level resumes from its progress checkpoint, also on a machine without the run folder
(from the artifact store), ending bit-identical to an uninterrupted run on CPU.

Every signal is sent on an observable event (a stdout line, a progress file appearing), never
after a sleep.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import load_benchmark
from ticketsmith.base.config import load_config
from ticketsmith.engine import checkpoint as ckpt
from ticketsmith.engine.lottery import run_experiment
from ticketsmith.engine.progress import read_progress

REPO = Path(__file__).resolve().parents[2]
TERMINATED = ("terminated (SIGTERM): finished levels and the level's progress are kept; run "
              "the same command again to resume")
RESUMED = re.compile(r"resumed from the progress checkpoint at iteration (\d+) of (\d+)")
# Long enough levels that a signal sent when the first progress file appears lands mid-level.
SETS = ["train.iterations=600", "train.eval_every=100", "train.checkpoint_every=50",
        "train.upload_every_s=0", "prune.levels=2"]
KEYS = ("test_accuracy", "test_loss", "best_val_accuracy", "early_stop_iteration", "density")

chaos = load_benchmark("chaos")


def default_signals() -> None:
    """The child gets Python's usual SIGINT/SIGTERM, whatever this process inherited (a
    background job of a non-interactive shell ignores SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Prune:
    """One real `ticketsmith prune` process; its stdout/stderr lines collected as they come."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str]):
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     preexec_fn=default_signals)
        self.out: list[str] = []
        self.err: list[tuple[float, str]] = []
        self.readers = [threading.Thread(target=self._read_out, daemon=True),
                        threading.Thread(target=self._read_err, daemon=True)]
        for r in self.readers:
            r.start()

    def _read_out(self):
        self.out.extend(self.proc.stdout)

    def _read_err(self):
        self.err.extend((time.monotonic(), line) for line in self.proc.stderr)

    def wait_for(self, seen) -> None:
        """Poll until `seen()` is true (an event, not a time); fail if the process ends first."""
        while not seen():
            try:
                self.proc.wait(timeout=0.02)  # the polling interval, not a timing assumption
            except subprocess.TimeoutExpired:
                continue
            if not seen():
                pytest.fail(f"exited {self.proc.returncode} before the event:\n"
                            + "".join(self.out[-5:]) + "".join(l for _, l in self.err[-20:]))

    def stop(self, sig: int) -> tuple[int, list[str]]:
        """Send `sig`; (exit code, stderr lines written after it)."""
        sent = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=300)
        for r in self.readers:
            r.join(timeout=30)
        return code, [line.rstrip("\n") for t, line in self.err if t >= sent]

    def finish(self) -> str:
        code = self.proc.wait(timeout=600)
        for r in self.readers:
            r.join(timeout=30)
        err = "".join(line for _, line in self.err)
        assert code == 0, err[-3000:]
        return err


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same experiment uninterrupted, engine alone: records and run folder."""
    out = tmp_path_factory.mktemp("reference")
    cfg = load_config(REPO / "configs" / "tiny.yaml", [*SETS, f"experiment.output_dir={out}"])
    return run_experiment(cfg, progress=False, echo=lambda line: None)


def same_as_reference(reference, run_root: Path, finished: dict) -> None:
    """Every level's metrics and final weights bit for bit equal to the reference."""
    expected = {(r["replicate"], r["level"], r["variant"]): r for r in reference.records}
    assert set(finished) == set(expected)
    for key, record in expected.items():
        assert {k: finished[key][k] for k in KEYS} == {k: record[k] for k in KEYS}, key
        a = ckpt.load_checkpoint(reference.run_root / "/".join(
            [f"replicate_{key[0]}", f"level_{key[1]}", key[2], "checkpoint.safetensors"]))
        b = ckpt.load_checkpoint(run_root / "/".join(
            [f"replicate_{key[0]}", f"level_{key[1]}", key[2], "checkpoint.safetensors"]))
        assert all(torch.equal(a.state[k], b.state[k]) for k in a.state), key


def progress_file(root: Path, level: int, variant: str):
    return next(root.glob(f"runs/*/replicate_0/level_{level}/{variant}/progress.pt"), None)


@pytest.mark.slow
def test_sigterm_in_training_at_a_boundary_in_registration_and_report(tmp_path, reference):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = chaos.prune_command(str(REPO / "configs" / "tiny.yaml"), tmp_path, "term", SETS)
    env = chaos.store_env(uri)

    def stopped_cleanly(p: Prune) -> list[str]:
        code, after = p.stop(signal.SIGTERM)
        assert (code, after) == (143, [TERMINATED])
        assert chaos.audit(uri, "term").running == 0
        return [line for _, line in p.err]

    # 1. Inside training: level 1's ticket has written its first progress checkpoint.
    p = Prune(cmd, tmp_path, env)
    p.wait_for(lambda: progress_file(tmp_path, 1, "ticket") is not None)
    stopped_cleanly(p)
    saved = saved_step(progress_file(tmp_path, 1, "ticket"))
    assert 50 <= saved < 600  # mid-level, saved where the SIGTERM found it
    shutil.rmtree(tmp_path / "runs")  # a new pod on another node: no run folder

    # 2. At a level boundary; the level resumes from the copy in the artifact store.
    p = Prune(cmd, tmp_path, env)
    p.wait_for(lambda: any(line.lstrip().startswith("r0 level 1") for line in p.out))
    err = stopped_cleanly(p)
    assert [m.groups() for m in map(RESUMED.search, err) if m] == [(str(saved), "600")]
    assert any("fetched the progress checkpoint" in line for line in p.out)

    # 3. During gating and registration, 4. during the report.
    for moment in ("quality gates", "release check"):
        p = Prune(cmd, tmp_path, env)
        p.wait_for(lambda: any(line.startswith(moment) for line in p.out))
        stopped_cleanly(p)

    Prune(cmd, tmp_path, env).finish()
    found = chaos.audit(uri, "term")
    assert found.running == 0 and found.duplicate_runs == 0 and found.duplicate_versions == 0
    run_root = next((tmp_path / "runs").iterdir())
    same_as_reference(reference, run_root, found.finished)
    assert not list(run_root.glob("replicate_*/level_*/*/progress.pt"))  # deleted when done


def saved_step(path: Path) -> int:
    """The iteration a (whole) progress file holds."""
    body = path.read_bytes().partition(b"\n")[2]
    identity = torch.load(io.BytesIO(body), weights_only=True)["identity"]
    return read_progress(path, identity)["step"]


def records(run_root: Path) -> dict:
    """(replicate, level, variant) → the record of every finished level in a run folder."""
    found = (json.loads(f.read_text()) for f in run_root.glob("replicate_*/level_*/*/metrics.json"))
    return {(r["replicate"], r["level"], r["variant"]): r for r in found}


@pytest.mark.slow
def test_sigkill_resumes_from_the_last_checkpoint_and_bad_ones_are_refused(tmp_path, reference):
    """A node lost (SIGKILL, nothing saved at the stop): the level resumes from its last
    periodic checkpoint, so at most `checkpoint_every` (50) iterations are trained again. In
    the same resume, a corrupt progress file (level 2's ticket) and a foreign one (level 1's
    control holding the ticket's) are refused with one line each naming the file, those levels
    start from their beginning, and nothing recorded is lost."""
    cmd = [*chaos.prune_command(str(REPO / "configs" / "tiny.yaml"), tmp_path, "kill", SETS),
           "--no-tracking"]
    p = Prune(cmd, tmp_path, os.environ.copy())
    p.wait_for(lambda: progress_file(tmp_path, 1, "ticket") is not None)
    p.proc.send_signal(signal.SIGSTOP)  # frozen: the file now is the one the kill leaves
    ticket = progress_file(tmp_path, 1, "ticket")
    saved = saved_step(ticket)
    assert p.stop(signal.SIGKILL)[0] == -signal.SIGKILL
    # Reached at most saved + 49: at saved + 50 it would have written the next checkpoint.
    assert saved % 50 == 0 and 50 <= saved < 600

    run_root = next((tmp_path / "runs").iterdir())
    level0 = {f: f.read_bytes() for f in (run_root / "replicate_0" / "level_0").rglob("*")
              if f.is_file()}
    foreign = ticket.parent.parent / "random_reinit" / "progress.pt"
    corrupt = ticket.parent.parent.parent / "level_2" / "ticket" / "progress.pt"
    for path in (foreign, corrupt):
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ticket, path)
    raw = bytearray(corrupt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(raw))

    err = Prune(cmd, tmp_path, os.environ.copy()).finish().splitlines()
    assert [m.groups() for m in map(RESUMED.search, err) if m] == [(str(saved), "600")]
    refused = [line for line in err if line.startswith("refused:")]
    assert len(refused) == 2, err
    assert str(foreign) in refused[0] and "'variant': 'ticket'" in refused[0]
    assert str(corrupt) in refused[1] and "checksum mismatch" in refused[1]
    assert {f: f.read_bytes() for f in level0} == level0  # the finished level untouched
    same_as_reference(reference, run_root, records(run_root))
    assert not list(run_root.glob("replicate_*/level_*/*/progress.pt"))
