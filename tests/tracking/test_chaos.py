"""Kills for real: SIGKILL a real `ticketsmith prune` process, or its tracking server, and
show that the resumed experiment lost and duplicated nothing (benchmarks/chaos.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import free_port, load_benchmark, start_mlflow_server, stop
from ticketsmith.base.processes import kill_group

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
# Two pruning levels: a kill or an outage still lands in start-up, training, between levels,
# gating, registry or report, with a level left to train after the first.
LEVELS = ["prune.levels=2"]
chaos = load_benchmark("chaos")


@pytest.mark.slow
def test_kills_lose_and_duplicate_nothing(tmp_path):
    lines = []
    out = chaos.chaos(TINY, kills=3, seed=3, workdir=tmp_path, overrides=LEVELS,
                      echo=lines.append)
    assert out.kills == 3
    assert (out.levels_lost, out.duplicate_runs, out.duplicate_versions, out.running) == \
        (0, 0, 0, 0), lines
    assert out.identical, lines
    assert "| 3 | 0 | 0 | 0 | 0 | yes |" in chaos.format_table(out)


def test_the_audit_sees_duplicates_running_runs_and_changed_metrics():
    """The comparison can fail: each kind of damage shows in its own column."""
    ref = chaos.Audit({(0, 0, "dense"): {"test_accuracy": 0.5},
                       (0, 1, "ticket"): {"test_accuracy": 0.25}}, 0, 0, 0)
    damaged = chaos.Audit({(0, 0, "dense"): {"test_accuracy": 0.5000000000000001}}, 2, 1, 1)
    assert chaos.compare(ref, damaged) == {"levels_lost": 1, "duplicate_runs": 2,
                                           "duplicate_versions": 1, "running": 1,
                                           "identical": False}
    assert chaos.compare(ref, ref)["identical"]


@pytest.mark.slow
def test_a_tracking_server_outage_is_waited_out_or_fails_in_one_line(tmp_path):
    """Kill the `mlflow server` while level 1 trains, restart it on the same store and port:
    the experiment waits it out (tracking.retry) or exits 1 with the one-line tracking error;
    a rerun completes with nothing lost or duplicated."""
    root = tmp_path / "server"
    root.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(root, port)
    cmd, env = chaos.prune_command(TINY, tmp_path, "outage", LEVELS), chaos.store_env(uri)
    try:
        with open(tmp_path / "stderr.txt", "w") as err:
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                    stderr=err, text=True)
            for line in proc.stdout:  # level 0 is tracked; level 1 is training now
                if line.startswith("  r0 level 0"):
                    break
            kill_group(server)  # the server with its uvicorn: port and store let go
            server = start_mlflow_server(root, port)
            proc.stdout.read()
            rc = proc.wait(timeout=600)
        stderr = (tmp_path / "stderr.txt").read_text()
        assert "Traceback" not in stderr
        if rc == 1:
            errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
            assert len(errors) == 1 and errors[0].startswith("error: tracking failed"), stderr
        else:
            assert rc == 0, stderr
        print(f"outage outcome: exit {rc}")
        again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=600)
        assert again.returncode == 0, again.stderr
        found = chaos.audit(uri, "outage")
    finally:
        stop(server)
    assert (found.duplicate_runs, found.duplicate_versions, found.running) == (0, 0, 0)
    assert len(found.finished) == 5  # dense + 2 levels x (ticket, random re-init)
    for (rep, level, variant), metrics in found.finished.items():
        local = tmp_path / "runs" / next((tmp_path / "runs").iterdir()).name / \
            f"replicate_{rep}" / f"level_{level}" / variant / "metrics.json"
        assert metrics["test_accuracy"] == json.loads(local.read_text())["test_accuracy"]


def test_secret_values_survive_a_variable_removed_while_reading_the_environment():
    """Found by the kills: MLflow's telemetry thread removes `_MLFLOW_TELEMETRY_SESSION_ID`
    while the experiment reads os.environ, which raised KeyError from `redact`."""
    from collections.abc import Mapping

    from ticketsmith.base.secrets import secret_values

    class Racing(Mapping):  # one name vanishes between listing and reading, once
        def __init__(self):
            self.data, self.gone = {"DB_PASSWORD": "s3cret-value"}, False

        def __iter__(self):
            names = [*self.data, *([] if self.gone else ["_MLFLOW_TELEMETRY_SESSION_ID"])]
            self.gone = True
            return iter(names)

        def __getitem__(self, name):
            return self.data[name]

        def __len__(self):
            return len(self.data)

    assert "s3cret-value" in secret_values(Racing())
