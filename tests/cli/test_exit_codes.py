"""Exit codes are one contract for every command and door (README, "Exit codes"):

    0 success · 1 release check failed or tracking unavailable · 2 bad input · 130 interrupted

Each case runs a real subprocess through one of the three doors: the `ticketsmith` console
script, `python -m ticketsmith.<module>` and the MLproject shims `entrypoints/<cmd>.py`.
Bad-input cases return before any training; "tracking unavailable" is a real HTTP server
that refuses every request (as a tracking server does to a client without access).
"""
from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import with_default_sigint
from ticketsmith.base.config import load_config

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
MODULES = {"train": "ticketsmith.train", "prune": "ticketsmith.prune", "gate": "ticketsmith",
           "benchmark": "ticketsmith.benchmark_cli", "report": "ticketsmith.report",
           "sweep": "ticketsmith.sweep"}


def door_command(door: str, command: str) -> list[str]:
    if door == "console":
        script = Path(sys.executable).with_name("ticketsmith")
        return [str(script), command]
    if door == "module":
        module = MODULES[command]
        return [sys.executable, "-m", module] + ([command] if module == "ticketsmith" else [])
    return [sys.executable, str(REPO / "entrypoints" / f"{command}.py")]


class Refuse(http.server.BaseHTTPRequestHandler):
    """Every request refused the way an MLflow server without access answers."""

    def _refuse(self) -> None:
        body = json.dumps({"error_code": "PERMISSION_DENIED",
                           "message": "Permission denied"}).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_DELETE = _refuse

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def refusing_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store holding one tracked tiny experiment (dense + one level, no registry)."""
    import mlflow
    from mlflow import MlflowClient

    from ticketsmith.pipeline import run_prune

    tmp = tmp_path_factory.mktemp("exit-codes")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        cfg = load_config(TINY, [f"experiment.output_dir={tmp / 'runs'}", "prune.levels=1",
                                 "experiment.variants=[ticket]", "tracking.register_model=false"])
        run_prune(cfg, client=MlflowClient(uri), progress=False, echo=lambda s: None)
    mlflow.set_tracking_uri(None)
    return tmp, uri


def run(door: str, command: str, args: list[str], cwd: Path, uri: str,
        timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1",
           "TICKETSMITH_SWEEP_STORAGE": f"sqlite:///{cwd / 'sweeps.db'}"}
    return subprocess.run([*door_command(door, command), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


BAD_CONFIG = ["--config", "no-such.yaml"]

# Every command, in process: (command + arguments, tracking store, exit code, the one
# error line names). The code is decided in one place (cli.main) whichever door is used.
COMMANDS = [
    (["train", *BAD_CONFIG], "store", 2, "no-such.yaml"),
    (["prune", "--config", TINY, "--set", "train.lr=-1"], "store", 2, "train.lr"),
    (["benchmark", "--checkpoint", "x", "--batch-sizes", "1,a"], "store", 2, "--batch-sizes"),
    (["benchmark", "--checkpoint", "no-such.safetensors"], "store", 2, "no-such.safetensors"),
    (["export", "--checkpoint", "no-such.safetensors"], "store", 2, "no-such.safetensors"),
    (["gate", "--experiment", "no-such-experiment"], "store", 2, "no-such-experiment"),
    (["report", "--experiment", "no-such-experiment"], "store", 2, "no-such-experiment"),
    (["sweep", *BAD_CONFIG], "store", 2, "no-such.yaml"),
    (["data", "--set", "data.name=text", "--set", "data.path=no-such.txt"], "store", 2,
     "no-such.txt"),
    (["gate", "--experiment", "tiny", "--set", "gate.release_min_sparsity=0.99"], "store", 1,
     None),
    (["gate", "--experiment", "tiny"], "store", 0, None),
    (["gate", "--experiment", "tiny"], "refusing", 1, "tracking failed"),
    (["report", "--experiment", "tiny"], "refusing", 1, "tracking failed"),
    (["prune", "--config", TINY, "--set", "prune.levels=1"], "refusing", 1, "tracking failed"),
]


def one_error_line(err: str, says: str) -> None:
    """One line, no traceback, naming what went wrong."""
    assert "Traceback" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], err[-2000:]


@pytest.mark.parametrize("argv,tracking,code,says", COMMANDS,
                         ids=[f"{a[0]}-{code}-{i}" for i, (a, _, code, _) in enumerate(COMMANDS)])
def test_every_command_keeps_the_contract(argv, tracking, code, says, store, refusing_server,
                                          monkeypatch, capsys):
    import mlflow

    from ticketsmith.cli import main

    tmp, uri = store
    uri = uri if tracking == "store" else refusing_server
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("TICKETSMITH_SWEEP_STORAGE", f"sqlite:///{tmp / 'sweeps.db'}")
    mlflow.set_tracking_uri(uri)
    try:
        assert main(argv) == code
    finally:
        mlflow.set_tracking_uri(None)
    out, err = capsys.readouterr()
    if says:
        one_error_line(err, says)
    if argv[0] == "gate" and tracking == "store" and code != 2:
        assert f"release check: {'PASS' if code == 0 else 'FAIL'}" in out


# Every door, as a subprocess: each exit code through each door at least once.
DOORS = [
    ("console", "prune", ["--config", TINY, "--set", "train.lr=-1"], "store", 2, "train.lr"),
    ("console", "gate", ["--experiment", "tiny", "--set", "gate.release_min_sparsity=0.99"],
     "store", 1, None),
    ("module", "train", BAD_CONFIG, "store", 2, "no-such.yaml"),
    ("module", "report", ["--experiment", "tiny"], "refusing", 1, "tracking failed"),
    ("entrypoint", "benchmark", ["--checkpoint", "x", "--batch-sizes", "a"], "store", 2,
     "--batch-sizes"),
    ("entrypoint", "prune", ["--config", TINY, "--overrides", "prune.levels=1"], "refusing", 1,
     "tracking failed"),
    ("entrypoint", "train", ["--config", TINY, "--overrides", "train.iterations=20"], "store",
     0, None),
]


@pytest.mark.parametrize("door,command,args,tracking,code,says", DOORS,
                         ids=[f"{d}-{c}-{code}" for d, c, _, _, code, _ in DOORS])
def test_every_door_keeps_the_contract(door, command, args, tracking, code, says, store,
                                       refusing_server):
    tmp, uri = store
    out = run(door, command, args, tmp, uri if tracking == "store" else refusing_server)
    assert out.returncode == code, out.stdout[-1500:] + out.stderr[-1500:]
    if says:
        one_error_line(out.stderr, says)
    if code == 0:
        assert "test accuracy" in out.stdout


@pytest.mark.parametrize("door", ["console", "module"])
def test_interrupt_exits_130_with_one_line(door, tmp_path):
    """Ctrl-C during training: one line, exit 130 (interrupts in depth: test_interrupts)."""
    cmd = [*door_command(door, "prune"), "--config", TINY, "--no-tracking", "-q",
           "--set", f"experiment.output_dir={tmp_path}", "--set", "train.iterations=1000000"]
    # faulthandler: a child still running after the wait is sent SIGABRT, and the failure
    # shows where its threads were instead of a bare timeout.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONFAULTHANDLER": "1"}
    # SIGINT at its default in the child, also when the suite runs as a background job
    proc = subprocess.Popen(with_default_sigint(cmd), cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()  # the experiment has started once it prints
        assert first.startswith("experiment tiny"), first + proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            _, err = proc.communicate(timeout=30)
            pytest.fail(f"still running 120 s after SIGINT; its threads:\n{err[-4000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()][-1].startswith("interrupted:")


@pytest.mark.parametrize("door", ["console", "module", "entrypoint"])
def test_sigterm_exits_143_with_one_line(door, tmp_path):
    """SIGTERM (a pod's eviction) at the start of training, through every door: one line, exit
    143 (SIGTERM in depth: tests/cli/test_sigterm.py, tests/engine/test_progress.py)."""
    cmd = [*door_command(door, "prune"), "--config", TINY, "--no-tracking", "-q",
           "--set", f"experiment.output_dir={tmp_path}", "--set", "train.iterations=1000000"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    try:
        first = proc.stdout.readline()  # the experiment has started once it prints
        assert first.startswith("experiment tiny"), first + proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert [line for line in err.splitlines() if line.strip()] == [
        "terminated (SIGTERM): finished levels and the level's progress are kept; run the same "
        "command again to resume"]
