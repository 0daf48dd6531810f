"""Tracking beside training (`ticketsmith.sidecar`), on real `ticketsmith prune` processes: the
store ends the same as with `--inline-tracking`, the training process never imports MLflow, an
error met there is the command's error, and the tracking process never outlives training."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from conftest import load_benchmark

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
# `ticketsmith prune`, then whether this (the training) process imported MLflow.
DRIVER = ("import sys; from ticketsmith.cli import main; rc = main(sys.argv[1:]); "
          "print('mlflow imported:', 'mlflow' in sys.modules); sys.exit(rc)")
# Figures differ in their bytes only (timestamps in the PNG); timings are timings.
UNSTABLE_METRICS = ("wall_time_s",)

chaos = load_benchmark("chaos")


def prune(folder: Path, *extra: str, sets=("prune.levels=1",), env=None,
          timeout=600) -> subprocess.CompletedProcess:
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", DRIVER, "prune", "--config", TINY, "-q",
           "--report-dir", str(folder / "reports"),
           *[a for s in (f"experiment.output_dir={folder / 'runs'}", *sets)
             for a in ("--set", s)], *extra]
    env = env or {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    return subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True,
                          timeout=timeout)


def artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return sorted(found)


def store_contents(folder: Path) -> dict:
    """Every run of experiment `tiny` by its key: status, metrics, tag names and artifacts;
    the registered versions: level, gate verdict and aliases."""
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = {}
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        tags = run.data.tags
        key = tuple(tags.get(f"ticketsmith.{k}") for k in ("role", "replicate", "level",
                                                             "variant"))
        assert key not in runs, f"two runs of {key}"
        runs[key] = {"status": run.info.status,
                     "metrics": {k: v for k, v in run.data.metrics.items()
                                 if k not in UNSTABLE_METRICS and not k.startswith("system/")},
                     "tags": sorted(k for k in tags if not k.startswith("mlflow.")),
                     "artifacts": artifacts(client, run.info.run_id)}
    versions = {}
    for found in client.search_model_versions(max_results=100):
        mv = client.get_model_version(found.name, found.version)  # a search leaves out aliases
        versions[mv.version] = (mv.tags.get("ticketsmith.level"), mv.tags.get("quality_gate"),
                                sorted(mv.aliases))
    return {"runs": runs, "versions": versions}


def lines(out: str, folder: Path) -> list[str]:
    return [re.sub(r"experiments/\d+", "experiments/N", line.replace(str(folder), "<dir>"))
            for line in out.splitlines()]


@pytest.mark.slow
def test_tracking_beside_training_records_what_one_process_records(tmp_path):
    levels = ("prune.levels=2",)  # level 2's ticket is the champion: the registry moves
    beside = prune(tmp_path / "beside", sets=levels)
    inline = prune(tmp_path / "inline", "--inline-tracking", sets=levels)
    assert beside.returncode == 0, beside.stderr
    assert inline.returncode == 0, inline.stderr
    # The default tracks in another process: this one never imported MLflow, yet it is all there.
    assert beside.stdout.splitlines()[-1] == "mlflow imported: False"
    assert inline.stdout.splitlines()[-1] == "mlflow imported: True"
    assert lines(beside.stdout, tmp_path / "beside")[:-1] == \
        lines(inline.stdout, tmp_path / "inline")[:-1]
    found, expected = store_contents(tmp_path / "beside"), store_contents(tmp_path / "inline")
    assert sorted(found["runs"]) == sorted(expected["runs"])
    for key, run in expected["runs"].items():
        assert found["runs"][key] == run, key
    assert found["versions"] == expected["versions"]
    assert any("champion" in aliases for _, _, aliases in found["versions"].values())
    for folder in ("beside", "inline"):
        assert len(list((tmp_path / folder / "reports").glob("tiny-*/executive_summary.md"))) == 1


@pytest.mark.slow
def test_the_tracking_process_ends_with_a_killed_training_process(tmp_path):
    """SIGKILL, as a pod's end or the OOM killer sends it: the tracking process goes too (no
    orphan writing on), and the next run finishes the experiment with nothing duplicated."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = chaos.prune_command(TINY, tmp_path, "tiny", ["prune.levels=1"])
    env = chaos.store_env(uri)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    children: list[psutil.Process] = []
    try:
        seen = []
        for line in proc.stdout:  # answered by the tracking process: it is running now
            seen.append(line)
            if line.startswith("experiment "):
                break
        else:
            pytest.fail(f"no 'experiment' line: {seen}")
        children = [p for p in psutil.Process(proc.pid).children()
                    if "ticketsmith.sidecar" in " ".join(p.cmdline())]
        assert len(children) == 1
        proc.kill()
        proc.wait(timeout=60)
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, "the tracking process outlived the training process"
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
        for child in children:
            if child.is_running():
                child.kill()
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr
    found = chaos.audit(uri, "tiny")
    assert found.running == 0 and found.duplicate_runs == 0 and found.duplicate_versions == 0
    assert len(found.finished) == 3  # dense + level 1's ticket and random re-init


def test_an_error_in_the_tracking_process_is_the_commands_error(tmp_path):
    """The tracking process refuses a store that dies with the pod: the command exits 2 with
    that one line, as in one process, and leaves no process behind."""
    folder = tmp_path / "pod"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
           "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    env.pop("TICKETSMITH_ALLOW_LOCAL_TRACKING", None)
    out = prune(folder, env=env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        f"error: MLFLOW_TRACKING_URI: 'sqlite:///{folder / 'mlflow.db'}' is local to this pod "
        "and is lost with it; point it at the shared tracking server (see docs/kubernetes.md) "
        "or set TICKETSMITH_ALLOW_LOCAL_TRACKING=1"]
    assert out.stdout.splitlines()[-1] == "mlflow imported: False"
    left = [p for p in psutil.process_iter(["cmdline", "cwd"])  # ours: started in `folder`
            if "ticketsmith.sidecar" in " ".join(p.info["cmdline"] or [])
            and p.info["cwd"] == str(folder)]
    assert left == []
