"""The MLproject, as MLflow's own project loader reads it, and each entry point's command run.

MLflow runs docker_env projects only inside Docker, which this machine lacks; so the test
renders every entry point's command with MLflow's loader (exactly what the container would
execute) and runs it here in the current environment against a temporary SQLite store.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.projects import _project_spec

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project():
    return _project_spec.load_project(str(REPO))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("mlproject")


def run_rendered(project, entry: str, params: dict, workdir: Path) -> subprocess.CompletedProcess:
    command = project.get_entry_point(entry).compute_command(params, str(workdir / "storage"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "TICKETSMITH_SWEEP_STORAGE": f"sqlite:///{workdir / 'sweeps.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(command, shell=True, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


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


def test_benchmark_entry_point(project, workdir):
    ckpts = sorted((workdir / "runs").glob("*/replicate_0/level_2/ticket/checkpoint.safetensors"))
    assert ckpts, "run test_prune_then_train_then_gate_entry_points first (same module)"
    out = run_rendered(project, "benchmark", {"checkpoint": str(ckpts[0]), "batch_sizes": "1,64"},
                       workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "speedup" in out.stdout.lower()


def test_report_entry_point(project, workdir):
    out = run_rendered(project, "report", {"experiment": "tiny",
                                           "output_dir": str(workdir / "reports")}, workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    assert list((workdir / "reports").rglob("executive_summary.md"))


def test_sweep_entry_point(project, workdir):
    out = run_rendered(project, "sweep", {"config": "configs/sweep_tiny.yaml", "n_trials": "2",
                                          "overrides": f"experiment.output_dir={workdir / 'sweep'}"},
                       workdir)
    assert out.returncode == 0, out.stderr[-2000:]
