"""The MLproject, as MLflow's own project loader reads it, and each entry point's command run.

MLflow runs docker_env projects only inside Docker, which this machine lacks; so the test
renders every entry point's command with MLflow's loader (exactly what the container would
execute) and runs it here in the current environment against a temporary SQLite store.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.projects import _project_spec

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def project():
    return _project_spec.load_project(str(REPO))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("mlproject")


def run_rendered(project, entry: str, params: dict, workdir: Path,
                 cwd: Path = REPO) -> subprocess.CompletedProcess:
    """cwd: where the command runs; it needs `entrypoints/` there (the project's root)."""
    command = project.get_entry_point(entry).compute_command(params, str(workdir / "storage"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "TICKETSMITH_SWEEP_STORAGE": f"sqlite:///{workdir / 'sweeps.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def in_workdir(workdir: Path) -> Path:
    """`workdir` with the project's entry points, so outputs written to the current folder
    (benchmark.json) land in the test's folder, not the checkout."""
    link = workdir / "entrypoints"
    if not link.exists():
        link.symlink_to(REPO / "entrypoints", target_is_directory=True)
    return workdir


def test_project_declares_entry_points_with_typed_parameters(project):
    assert project.name == "ticketsmith"
    assert project.docker_env["image"].startswith("ticketsmith")
    for name in ("prune", "train", "benchmark", "report", "sweep"):
        ep = project.get_entry_point(name)
        assert ep.command.startswith(f"python entrypoints/{name}.py")
        assert (REPO / "entrypoints" / f"{name}.py").is_file()
        # a config path plus an overrides string, not a copy of every option
        assert len(ep.parameters) <= 3, ep.parameters


def test_conda_env_matches_package_dependencies():
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(pip) == sorted(deps)


def test_prune_then_train_then_gate_entry_points(project, workdir):
    out = run_rendered(project, "prune", {
        "config": "configs/tiny.yaml",
        "overrides": f"experiment.output_dir={workdir / 'runs'} prune.levels=2",
    }, workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "level 2" in out.stdout and "release check: PASS" in out.stdout
    out = run_rendered(project, "train", {"config": "configs/tiny.yaml", "overrides": ""}, workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "test accuracy" in out.stdout
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    gate = subprocess.run([sys.executable, "-m", "ticketsmith", "gate", "--experiment", "tiny"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert gate.returncode == 0, gate.stderr[-2000:]
    assert "accuracy_drop" in gate.stdout and "release check: PASS" in gate.stdout
    strict = subprocess.run([sys.executable, "-m", "ticketsmith", "gate", "--experiment", "tiny",
                             "--set", "gate.release_min_sparsity=0.99"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert strict.returncode == 1
    assert "release check: FAIL" in strict.stdout


FORMATS = {"dense", "csr", "compacted", "compacted_int8", "auto", "onnxruntime", "numpy",
           "onnxruntime_int8",
           "onnxruntime_dense", "numpy_dense"}


def test_benchmark_entry_point(project, workdir):
    from ticketsmith.engine.checkpoint import load_checkpoint

    ckpts = sorted((workdir / "runs").glob("*/replicate_0/level_2/ticket/checkpoint.safetensors"))
    assert ckpts, "run test_prune_then_train_then_gate_entry_points first (same module)"
    out = run_rendered(project, "benchmark", {"checkpoint": str(ckpts[0]), "batch_sizes": "1,64"},
                       workdir, cwd=in_workdir(workdir))
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((workdir / "benchmark.json").read_text())
    rows = result["results"]
    assert {(r["format"], r["batch_size"]) for r in rows} == {(f, b) for f in FORMATS
                                                              for b in (1, 64)}
    for r in rows:  # every format was checked against the masked model, then timed
        assert r["correct"] and r["speedup"] > 0 and r["ideal_speedup"] >= 1.0, r
        assert r["accuracy"] is not None
    assert {r["speedup"] for r in rows if r["format"] == "dense"} == {1.0}
    assert result["model"]["sparsity"] == pytest.approx(load_checkpoint(ckpts[0]).mask.sparsity())
    # the printed scorecard: one line per format and batch size, with its speedup
    for r in rows:
        assert re.search(rf"^{r['format']}\s+{r['batch_size']}\s+yes\s.*{r['speedup']:.2f}x",
                         out.stdout, re.M), (r["format"], r["batch_size"])
    assert "noise floor, dense against itself" in out.stdout


def test_report_entry_point(project, workdir):
    from ticketsmith.base.config import load_config

    out = run_rendered(project, "report", {"experiment": "tiny",
                                           "output_dir": str(workdir / "reports")}, workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    h = load_config(REPO / "configs" / "tiny.yaml").hash()
    md = workdir / "reports" / f"tiny-{h}" / "executive_summary.md"
    assert str(md) in out.stdout and md.with_suffix(".html").is_file()
    text = md.read_text()
    # the level table: dense, then ticket and random re-init at each of the 2 levels
    rows = re.findall(r"^\| (dense|ticket|random re-init) \| (\d+) \|", text, re.M)
    assert sorted(rows) == sorted([("dense", "0"), ("ticket", "1"), ("ticket", "2"),
                                   ("random re-init", "1"), ("random re-init", "2")])
    assert f"Registered model `tiny-{h}`" in text
    figures = {p.name for p in (md.parent / "figures").glob("*.png")}
    assert {"accuracy_vs_weights.png", "early_stop_vs_weights.png"} <= figures


def test_sweep_entry_point(project, workdir):
    import optuna

    out = run_rendered(project, "sweep", {"config": "configs/sweep_tiny.yaml", "n_trials": "2",
                                          "overrides": f"experiment.output_dir={workdir / 'sweep'}"},
                       workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    study = optuna.load_study(study_name="sweep-tiny", storage=f"sqlite:///{workdir / 'sweeps.db'}")
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert len(study.trials) == 2 and all(t.state in done for t in study.trials)
    # each trial is a tracked experiment of its own, under the sweep's MLflow run
    runs = {t.user_attrs.get("mlflow_run_id") for t in study.trials}
    assert None not in runs and len(runs) == 2
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert all(client.get_run(run_id).data.tags.get("ticketsmith.hash") for run_id in runs)
    assert "best" in out.stdout and "gated sparsity" in out.stdout
