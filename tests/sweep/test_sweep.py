"""Optuna sweeps: real tiny studies on SQLite, worker processes, heartbeats, trial pruning,
the MLproject entry point, sweep configs and the cluster manifests.

Every trial really trains (generated 8x8 data, a 32-unit MLP, 1-3 levels: seconds each). One level
unless a test needs more: a level is all a trial's objective, run tree or worker sharing needs.
Waiting on other processes always polls the study storage with a deadline; the only clocks
are Optuna's own heartbeat settings.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from ticketsmith.cli import main
from ticketsmith.base.config import load_config
from ticketsmith.sweep.config import STORAGE_ENV, load_sweep_config

REPO = Path(__file__).resolve().parents[2]
TAG = "ticketsmith."
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
SPACE = {"prune.fraction": {"type": "float", "low": 0.3, "high": 0.8},
         "train.lr": {"type": "float", "low": 0.005, "high": 0.03, "log": True},
         "prune.scope": {"type": "categorical", "choices": ["layerwise", "global"]}}


def write_sweep(tmp_path: Path, name: str = "s", *, overrides=(), search_space=None,
                **study) -> Path:
    """A sweep over configs/tiny.yaml (1 level, ticket only) with storage and runs in tmp."""
    doc = {"base": str(REPO / "configs" / "tiny.yaml"),
           "overrides": [f"experiment.output_dir={tmp_path / 'runs'}", "prune.levels=1",
                         "experiment.variants=[ticket]", *overrides],
           "study": {"name": name, "storage": f"sqlite:///{tmp_path / 'sweeps.db'}",
                     "heartbeat_interval": 2, "grace_period": 20, **study},
           "search_space": search_space or SPACE}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def load(tmp_path: Path, name: str = "s") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'sweeps.db'}")


def runs(client: MlflowClient, role: str, **tags: str):
    flt = " and ".join([f"tags.`{TAG}role` = '{role}'",
                        *(f"tags.`{TAG}{k}` = '{v}'" for k, v in tags.items())])
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, flt, max_results=1000)


def artifact(client: MlflowClient, run_id: str, path: str, tmp_path: Path) -> Path:
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                    dst_path=str(tmp_path / "dl"),
                                                    tracking_uri=client.tracking_uri))


def assert_run_tree(client: MlflowClient, study: optuna.Study) -> dict[int, object]:
    """sweep run → one run per trial (number + sampled params) → that trial's replicate runs."""
    (sweep,) = runs(client, "sweep", **{"sweep.study": study.study_name})
    assert study.user_attrs["mlflow_run_id"] == sweep.info.run_id
    trial_runs = {}
    for t in study.get_trials(states=DONE):
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == sweep.info.run_id
        assert run.data.tags[TAG + "sweep.trial_number"] == str(t.number)
        assert run.data.tags[TAG + "sweep.state"] == t.state.name
        assert run.data.params["trial_number"] == str(t.number)
        for key, value in t.params.items():
            assert run.data.params[key] == str(value)
        reps = runs(client, "parent", hash=t.user_attrs["hash"])
        assert [r.data.tags["mlflow.parentRunId"] for r in reps] == [run.info.run_id]
        assert run.info.status == ("FINISHED" if t.state == TrialState.COMPLETE else "KILLED")
        trial_runs[t.number] = run
    return trial_runs


# --- whole sweeps ---------------------------------------------------------------------------

def test_tiny_sweep_single_objective_then_continued(tmp_path, sqlite_uri):
    path = write_sweep(tmp_path, trial_pruning={"pruner": "median", "n_startup_trials": 2})
    assert main(["sweep", "--config", str(path), "--n-trials", "3"]) == 0
    study = load(tmp_path)
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state in DONE for t in study.trials)
    client = MlflowClient(sqlite_uri)
    trial_runs = assert_run_tree(client, study)
    best = study.best_trial
    assert 0 < best.value < 1 and best.value == best.user_attrs["sparsity"]
    # Objective = sparsity of the champion level: the gate table of the trial's own experiment.
    champion = client.get_run(best.user_attrs["mlflow_run_id"]).data.metrics
    assert champion["sparsity"] == best.value and champion["champion_level"] >= 1
    assert 0 < champion["gated_sparsity"] <= best.value + 1e-12
    (sweep,) = runs(client, "sweep")
    assert sweep.info.status == "FINISHED" and sweep.data.metrics["best_gated_sparsity"] == best.value
    table = artifact(client, sweep.info.run_id, "sweep/best_trials.md", tmp_path).read_text()
    assert f"| {best.number} | " in table and trial_runs[best.number].info.run_id in table
    png = artifact(client, sweep.info.run_id, "sweep/pareto.png", tmp_path).read_bytes()
    assert png.startswith(b"\x89PNG")
    best_cfg = load_config(artifact(client, sweep.info.run_id, "sweep/best_config.yaml", tmp_path))
    assert best_cfg.hash() == best.user_attrs["hash"]
    assert best_cfg.prune.fraction == best.params["prune.fraction"]
    assert best_cfg.tracking.register_model is False and best_cfg.experiment.name == "s"

    # Continued later: the same command with a larger target adds exactly the missing trial,
    # under the same sweep run; the earlier trials are untouched.
    assert main(["sweep", "--config", str(path), "--n-trials", "4"]) == 0
    study = load(tmp_path)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert len(runs(client, "sweep")) == 1 and len(runs(client, "trial")) == 4
    assert_run_tree(client, study)
    # The sweep run charts each completed trial's objective once, over the trial number.
    history = client.get_metric_history(sweep.info.run_id, "objective/highest_gated_sparsity")
    done = {t.number: t.value for t in study.trials if t.state.name == "COMPLETE"}
    assert sorted(m.step for m in history) == sorted(done)
    assert all(m.value == done[m.step] for m in history)


def test_multi_objective_sweep_gives_a_pareto_front(tmp_path, sqlite_uri):
    path = write_sweep(tmp_path, "mo", objective="pareto", objectives=["accuracy", "density"],
                       sampler="random")
    assert main(["sweep", "--config", str(path), "--n-trials", "3"]) == 0
    study = load(tmp_path, "mo")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 3  # no trial pruning in a multi-objective study
    for t in done:
        assert t.values == [t.user_attrs["accuracy"], t.user_attrs["density"]]
    front = study.best_trials
    assert front
    for t in front:  # nobody is at least as good on both and better on one
        assert not any(o.values[0] >= t.values[0] and o.values[1] <= t.values[1]
                       and o.values != t.values for o in done)
    client = MlflowClient(sqlite_uri)
    assert_run_tree(client, study)
    (sweep,) = runs(client, "sweep")
    table = artifact(client, sweep.info.run_id, "sweep/best_trials.md", tmp_path).read_text()
    assert "Pareto front" in table
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(front)
    assert artifact(client, sweep.info.run_id, "sweep/pareto.png", tmp_path).stat().st_size > 1000
    for i, name in enumerate(("accuracy", "density")):
        history = client.get_metric_history(sweep.info.run_id, f"objective/{name}")
        assert {m.step: m.value for m in history} == {t.number: t.values[i] for t in done}


def test_two_worker_processes_share_one_study_exactly(tmp_path, sqlite_uri):
    path = write_sweep(tmp_path, "w2", trial_pruning={"pruner": "none"})
    assert main(["sweep", "--config", str(path), "--n-trials", "4", "--workers", "2"]) == 0
    study = load(tmp_path, "w2")
    trials = study.trials
    assert [t.number for t in trials] == [0, 1, 2, 3]           # none lost, none extra
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}  # both processes ran trials
    client = MlflowClient(sqlite_uri)
    trial_runs = runs(client, "trial")
    numbers = sorted(int(r.data.tags[TAG + "sweep.trial_number"]) for r in trial_runs)
    assert numbers == [0, 1, 2, 3]                             # one MLflow run per trial
    assert_run_tree(client, study)


def test_pareto_on_measured_speedup_uses_the_benchmark_of_the_champion(tmp_path, sqlite_uri):
    path = write_sweep(tmp_path, "sp", objective="pareto", objectives=["accuracy", "speedup"],
                       search_space={"prune.fraction": {"type": "float", "low": 0.5, "high": 0.6}})
    assert main(["sweep", "--config", str(path), "--n-trials", "1"]) == 0
    (trial,) = load(tmp_path, "sp").trials
    client = MlflowClient(sqlite_uri)
    (ticket,) = runs(client, "child", hash=trial.user_attrs["hash"], variant="ticket",
                     level=str(trial.user_attrs["champion_level"]))
    measured = [v for k, v in ticket.data.metrics.items() if k.startswith("speedup_")]
    assert measured and trial.values == [trial.user_attrs["accuracy"], max(measured)]


@pytest.mark.slow
def test_two_worker_processes_share_a_postgresql_study(tmp_path, sqlite_uri, postgres_url):
    path = write_sweep(tmp_path, "pg", trial_pruning={"pruner": "none"})
    assert main(["sweep", "--config", str(path), "--n-trials", "3", "--workers", "2",
                 "--storage", postgres_url]) == 0
    study = optuna.load_study(study_name="pg", storage=postgres_url)
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert {t.user_attrs["worker"] for t in study.trials} == {0, 1}
    assert len(runs(MlflowClient(sqlite_uri), "trial")) == 3


def wait_for(predicate, what: str, proc: subprocess.Popen | None = None, timeout_s: float = 240):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"worker exited ({proc.returncode}) before {what}")
        time.sleep(0.05)  # poll interval, not a timing assumption
    raise AssertionError(f"timed out waiting for {what}")


def test_a_killed_workers_trial_is_failed_by_heartbeat_and_retried(tmp_path, sqlite_uri):
    # 2 levels, so the worker is killed after level 1 with level 2 still to train. Heartbeat
    # every second; a trial without one for 4 s belongs to a dead worker.
    path = write_sweep(tmp_path, "hb", overrides=["prune.levels=2"], heartbeat_interval=1,
                       grace_period=4, trial_pruning={"pruner": "none"})
    proc = subprocess.Popen([sys.executable, "-m", "ticketsmith", "sweep", "--config", str(path),
                             "--n-trials", "2", "--worker", "0"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def level_1_done():
        try:
            trials = load(tmp_path, "hb").trials
        except KeyError:  # study not created yet
            return None
        return trials and trials[0].state == TrialState.RUNNING and 1 in trials[0].intermediate_values

    try:
        wait_for(level_1_done, "trial 0 finished level 1", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    (killed,) = load(tmp_path, "hb").trials
    assert killed.state == TrialState.RUNNING  # nobody told the storage

    assert main(["sweep", "--config", str(path), "--n-trials", "2", "--worker", "1"]) == 0
    trials = load(tmp_path, "hb").trials
    assert trials[0].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == trials[0].params
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE", "FAIL"]

    client = MlflowClient(sqlite_uri)
    dead = client.get_run(trials[0].user_attrs["mlflow_run_id"])
    assert dead.info.status == "FAILED" and "heartbeat" in dead.data.tags[TAG + "sweep.error"]
    redo = client.get_run(retries[0].user_attrs["mlflow_run_id"])
    assert redo.data.tags[TAG + "sweep.retry_of"] == "0"
    # The retry resumed the killed experiment: levels 0-1 were reused, not trained twice, and
    # the replicate run now hangs under the retry's trial run.
    exp_hash = retries[0].user_attrs["hash"]
    (rep,) = runs(client, "parent", hash=exp_hash)
    assert rep.data.tags["mlflow.parentRunId"] == redo.info.run_id
    assert rep.info.status == "FINISHED"
    levels = sorted(int(r.data.tags[TAG + "level"]) for r in runs(client, "child", hash=exp_hash))
    assert levels == [0, 1, 2]


def test_trial_pruning_stops_a_hopeless_trial_between_levels(tmp_path, sqlite_uri):
    # Every level passes the gate (a 100-point allowance), so the reported value after level k is
    # that level's sparsity: 0.9-fraction trials lead, a 0.05-fraction trial cannot catch up.
    path = write_sweep(tmp_path, "tp", overrides=["prune.levels=2", "gate.max_accuracy_drop=100"],
                       search_space={"prune.fraction": {"type": "float", "low": 0.05, "high": 0.9}},
                       trial_pruning={"pruner": "median", "n_startup_trials": 1, "n_warmup_steps": 0})
    assert main(["sweep", "--config", str(path), "--create-only"]) == 0
    study = load(tmp_path, "tp")
    assert study.trials == []
    study.enqueue_trial({"prune.fraction": 0.9})
    study.enqueue_trial({"prune.fraction": 0.05})
    assert main(["sweep", "--config", str(path), "--n-trials", "2"]) == 0
    good, hopeless = load(tmp_path, "tp").trials
    assert good.state == TrialState.COMPLETE and sorted(good.intermediate_values) == [1, 2]
    assert hopeless.state == TrialState.PRUNED
    assert sorted(hopeless.intermediate_values) == [1]      # stopped after level 1 of 2
    client = MlflowClient(sqlite_uri)
    run = client.get_run(hopeless.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags[TAG + "sweep.state"] == "PRUNED"
    assert run.data.tags[TAG + "sweep.stopped_after_level"] == "1"
    exp_hash = hopeless.user_attrs["hash"]
    (rep,) = runs(client, "parent", hash=exp_hash)
    assert rep.info.status == "KILLED"
    children = runs(client, "child", hash=exp_hash)
    assert sorted(int(r.data.tags[TAG + "level"]) for r in children) == [0, 1]
    assert all(r.info.status == "FINISHED" for r in children)  # what ran is a valid result


def test_mlproject_sweep_entry_point_takes_n_trials_as_a_string(tmp_path):
    from mlflow.projects import _project_spec

    project = _project_spec.load_project(str(REPO))
    command = project.get_entry_point("sweep").compute_command(
        {"config": "configs/sweep_tiny.yaml", "n_trials": "2",
         "overrides": f"experiment.output_dir={tmp_path / 'runs'} prune.levels=1"},
        str(tmp_path / "storage"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "TICKETSMITH_ARTIFACT_LOCATION": str(tmp_path / "artifacts"),
           STORAGE_ENV: f"sqlite:///{tmp_path / 'sweeps.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(command, shell=True, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(study_name="sweep-tiny", storage=env[STORAGE_ENV])
    assert len(study.trials) == 2 and all(t.state in DONE for t in study.trials)
    assert "best" in out.stdout and "gated sparsity" in out.stdout


# --- sweep configs --------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("sweep_*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_sweep_configs_load(path):
    cfg = load_sweep_config(path)
    assert cfg.search_space and cfg.base_path().is_file()
    trial = cfg.experiment_config({k: s.values()[0] for k, s in cfg.search_space.items()})
    assert trial.experiment.name == cfg.study.name and trial.tracking.register_model is False


@pytest.mark.parametrize("edit,expected", [
    (lambda d: d["study"].update(nme="x"), "study.nme: unknown key"),
    (lambda d: d["search_space"].update({"prune.fractoin": {"type": "float", "low": 0.1, "high": 0.2}}),
     "search_space.prune.fractoin: not a config key"),
    (lambda d: d["search_space"].update({"prune": {"type": "float", "low": 0.1, "high": 0.2}}),
     "search_space.prune: is a section"),
    (lambda d: d["search_space"]["prune.fraction"].update(high=1.5),
     "search_space.prune.fraction: value 1.5 is invalid"),
    (lambda d: d["search_space"]["prune.fraction"].update(low=0.9),
     "search_space.prune.fraction: low (0.9) must not exceed high (0.8)"),
    (lambda d: d["search_space"]["train.lr"].update(lg=True), "search_space.train.lr.lg: unknown key"),
    (lambda d: d["study"].update(objective="pareto", trial_pruning={"pruner": "median"}),
     "study: trial pruning is single-objective only"),
    (lambda d: d["study"].update(grace_period=1), "study: grace_period must be longer"),
    (lambda d: d.update(overrides=["train.lr=-1"]), "train.lr: Input should be greater than 0"),
    (lambda d: d["study"].update(storage="nosuchdb://x"), "study.storage nosuchdb://x: cannot open"),
])
def test_bad_sweep_configs_are_one_line_errors(tmp_path, sqlite_uri, capsys, edit, expected):
    path = write_sweep(tmp_path)
    doc = yaml.safe_load(path.read_text())
    edit(doc)
    path.write_text(yaml.safe_dump(doc))
    assert main(["sweep", "--config", str(path), "--create-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_the_storage_password_stays_out_of_errors(tmp_path, sqlite_uri, capsys, monkeypatch):
    monkeypatch.setenv(STORAGE_ENV, "postgresql+psycopg2://optuna:s3cret-pw@127.0.0.1:1/optuna")
    assert main(["sweep", "--config", str(write_sweep(tmp_path)), "--create-only"]) == 2
    err = capsys.readouterr().err
    assert "study.storage" in err and "s3cret-pw" not in err


def test_a_pod_refuses_a_sqlite_study(tmp_path, sqlite_uri, capsys, monkeypatch):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert main(["sweep", "--config", str(write_sweep(tmp_path)), "--worker", "0"]) == 2
    assert "study.storage" in capsys.readouterr().err and not (tmp_path / "sweeps.db").exists()


# --- cluster manifests ----------------------------------------------------------------------

SWEEP = REPO / "k8s_backend" / "sweep"


@pytest.fixture(scope="module")
def kmf():
    """tests/deploy/test_k8s_manifests.py: its schema validation (kubernetes-validate) and helpers."""
    pytest.importorskip("kubernetes_validate")
    sys.path.insert(0, str(REPO / "tests" / "deploy"))  # a sibling folder's test module
    import test_k8s_manifests

    return test_k8s_manifests


def sweep_docs(kmf):
    return {f"{d['kind']}/{d['metadata']['name']}": d for p in sorted(SWEEP.rglob("*.yaml"))
            if p.name != "kustomization.yaml" for d in kmf.docs(p)}


def test_sweep_manifests_validate_against_the_kubernetes_schema(kmf):
    found = sweep_docs(kmf)
    assert {"Job/sweep-mnist-study", "Job/sweep-mnist-workers", "StatefulSet/sweep-postgres",
            "Service/sweep-postgres", "NetworkPolicy/sweep-postgres-from-sweep-pods"} <= set(found)
    for doc in found.values():
        kmf.validate(doc)
    for directory in (SWEEP, SWEEP / "storage"):
        out = subprocess.run([kmf.kubectl(), "kustomize", str(directory)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        for doc in yaml.safe_load_all(out.stdout):
            kmf.validate(doc)
            assert doc["metadata"]["namespace"] == "ticketsmith"


def test_sweep_jobs_have_the_experiment_jobs_guardrails(kmf):
    from ticketsmith.cli import build_parser

    found = sweep_docs(kmf)
    study, workers = found["Job/sweep-mnist-study"], found["Job/sweep-mnist-workers"]
    assert workers["spec"]["completionMode"] == "Indexed"
    assert workers["spec"]["parallelism"] == workers["spec"]["completions"] >= 2
    gpu = kmf.load_template("gpu")
    for job in (study, workers):
        spec, pod = job["spec"], job["spec"]["template"]["spec"]
        assert 0 < spec["activeDeadlineSeconds"] <= 24 * 3600
        assert 0 <= spec["backoffLimit"] <= 2 and 0 < spec["ttlSecondsAfterFinished"] <= 7 * 86400
        assert spec["podFailurePolicy"] == gpu["spec"]["podFailurePolicy"]  # exit 2 fails fast
        assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        (c,) = pod["containers"]
        res = c["resources"]
        assert res["requests"]["memory"] == res["limits"]["memory"] and "cpu" in res["requests"]
        env = {e["name"]: e for e in c["env"]}
        assert env[STORAGE_ENV]["valueFrom"]["secretKeyRef"] == {"name": "ticketsmith-sweep-db",
                                                                 "key": "storage-url"}
        assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["name"] == "ticketsmith-tracking"
        args = build_parser().parse_args(c["args"])           # the real CLI accepts them
        assert args.command == "sweep" and (REPO / args.config).is_file()
        load_sweep_config(REPO / args.config, overrides=args.overrides.split())
        assert job["spec"]["template"]["metadata"]["labels"]["ticketsmith.io/sweep-storage"] == "client"
    assert build_parser().parse_args(study["spec"]["template"]["spec"]["containers"][0]["args"]).create_only
    wpod = workers["spec"]["template"]["spec"]
    (w,) = wpod["containers"]
    assert build_parser().parse_args(w["args"]).worker == -1  # index from JOB_COMPLETION_INDEX
    assert w["resources"]["limits"]["nvidia.com/gpu"] == w["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert wpod["nodeSelector"] == gpu["spec"]["template"]["spec"]["nodeSelector"]
    assert wpod["tolerations"] == gpu["spec"]["template"]["spec"]["tolerations"]
    assert "nvidia.com/gpu" not in str(study["spec"]["template"]["spec"]["containers"][0]["resources"])


def test_only_sweep_pods_reach_the_study_database(kmf):
    found = sweep_docs(kmf)
    policy = found["NetworkPolicy/sweep-postgres-from-sweep-pods"]
    db_labels = found["StatefulSet/sweep-postgres"]["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= db_labels.items()
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    allowed = peer["podSelector"]["matchLabels"].items()
    for job in ("Job/sweep-mnist-study", "Job/sweep-mnist-workers"):
        assert allowed <= found[job]["spec"]["template"]["metadata"]["labels"].items()
    assert not allowed <= kmf.load_template("gpu")["spec"]["template"]["metadata"]["labels"].items()
    assert rule["ports"] == [{"protocol": "TCP", "port": 5432}]
