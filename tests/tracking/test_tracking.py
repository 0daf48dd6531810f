"""MLflow as the system of record: run tree, resume, registry — on real tracking stores."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from ticketsmith.engine.checkpoint import load_checkpoint
from ticketsmith.base.config import load_config
from ticketsmith.engine.models import build_model
from ticketsmith.pipeline import run_prune
from ticketsmith.tracking.registry import model_name_for
from ticketsmith.tracking.tracker import TAG, load_records, resolve_experiment, retry, TrackingError

LEVELS, VARIANTS = 3, ["ticket", "random_reinit"]
REPO = Path(__file__).resolve().parents[2]


def tiny(tmp_path: Path, *extra: str):
    return load_config(REPO / "configs" / "tiny.yaml", [f"experiment.output_dir={tmp_path / 'runs'}",
                                             "experiment.replicates=2", *extra])


def runs_of(client: MlflowClient, exp_hash: str, role: str):
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, f"tags.`{TAG}hash` = '{exp_hash}' and tags.`{TAG}role` = '{role}'")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, repo_root):
    """A tiny 2-replicate experiment, run once through the whole prune pipeline.

    Module-scoped: the tests below read it, and the rerun/resume tests leave it as they
    found it (same runs, same versions), which they assert.
    """
    tmp_path = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(tmp_path)  # MLflow's local artifacts (./mlruns) land in tmp
        mlflow.set_tracking_uri(uri)
        cfg = tiny(tmp_path)
        client = MlflowClient(uri)
        out = run_prune(cfg, client=client, progress=False, echo=lambda s: None)
        yield cfg, client, out
    mlflow.set_tracking_uri(None)


def test_run_tree_tags_params_metrics_artifacts(tracked):
    cfg, client, out = tracked
    h = cfg.hash()
    parents = runs_of(client, h, "parent")
    children = runs_of(client, h, "child")
    assert len(parents) == 2
    assert len(children) == 2 * (1 + LEVELS * len(VARIANTS))
    parent_ids = {p.info.run_id for p in parents}
    keys = set()
    for run in children:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert tags["mlflow.parentRunId"] in parent_ids
        assert tags[TAG + "hash"] == h
        key = (tags[TAG + "replicate"], tags[TAG + "level"], tags[TAG + "variant"])
        keys.add(key)
        assert params["variant"] == key[2] and params["level"] == key[1]
        assert float(params["train.lr"]) == cfg.train.lr
        for m in ("test_accuracy", "test_loss", "best_val_accuracy", "early_stop_iteration",
                  "sparsity", "density", "nonzero_params"):
            assert m in metrics, m
        assert 0.0 < metrics["test_accuracy"] <= 1.0
        assert abs(metrics["sparsity"] + metrics["density"] - 1) < 1e-9
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert len(history) == cfg.train.iterations // cfg.train.eval_every
        assert [m.step for m in history] == sorted(m.step for m in history)
        files = {a.path for a in client.list_artifacts(run.info.run_id, "run")}
        assert {"run/checkpoint.safetensors", "run/metrics.json", "run/curve.json"} <= files
        figs = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
        assert "figures/loss_curves.png" in figs
        assert ("figures/samples.png" in figs) == (key[2] in ("dense", "ticket"))
    assert len(keys) == len(children)  # no duplicates
    for p in parents:
        names = {a.path for a in client.list_artifacts(p.info.run_id)}
        assert {"config.yaml", "environment.json", "replicate"} <= names
        assert p.data.tags[TAG + "env.torch"] == torch.__version__
        assert p.info.status == "FINISHED"


def test_metrics_match_local_records(tracked):
    cfg, client, out = tracked
    exp_id, h = resolve_experiment(client, cfg.experiment.name)
    assert h == cfg.hash()
    remote = {(r["replicate"], r["level"], r["variant"]): r for r in load_records(client, exp_id, h)}
    for rec in out.experiment.records:
        r = remote[(rec["replicate"], rec["level"], rec["variant"])]
        assert r["test_accuracy"] == pytest.approx(rec["test_accuracy"])
        assert r["density"] == pytest.approx(rec["density"])


def test_each_run_carries_its_replicates_seeds(tracked):
    """The seeds that rebuild a replicate (see test_replicates) are on every one of its runs."""
    cfg, client, out = tracked
    local = {(r["replicate"], r["level"], r["variant"]): r for r in out.experiment.records}
    seeds = {}
    for run in runs_of(client, cfg.hash(), "child"):
        tags = run.data.tags
        key = (int(tags[TAG + "replicate"]), int(tags[TAG + "level"]), tags[TAG + "variant"])
        got = (int(tags[TAG + "seed"]), int(tags[TAG + "data_seed"]))
        assert got == (local[key]["seed"], local[key]["data_seed"])
        seeds.setdefault(key[0], set()).add(got)
    assert all(len(s) == 1 for s in seeds.values())  # one pair per replicate
    assert seeds[0] != seeds[1]


def artifact_files(list_artifacts, path=None) -> set[str]:
    """Every file under `path`, recursively, from a client's artifact listing."""
    files = set()
    for a in list_artifacts(path):
        files |= artifact_files(list_artifacts, a.path) if a.is_dir else {a.path}
    return files


def test_every_run_and_version_records_its_whole_inventory(tracked):
    """What a tracked experiment records, file by file, so that no artifact is dropped
    unnoticed (the tracked run's figures, store and registry were made cheaper; this is
    what they must still write)."""
    cfg, client, out = tracked
    for run in runs_of(client, cfg.hash(), "child"):
        shown = {"figures/samples.png"} if run.data.tags[TAG + "variant"] != "random_reinit" \
            else set()
        assert artifact_files(lambda p: client.list_artifacts(run.info.run_id, p)) == {
            "run/checkpoint.safetensors", "run/metrics.json", "run/curve.json",
            "figures/loss_curves.png"} | shown
    for run in runs_of(client, cfg.hash(), "parent"):
        assert artifact_files(lambda p: client.list_artifacts(run.info.run_id, p)) == {
            "config.yaml", "environment.json", "gates/gates.txt", "replicate/init.safetensors"}
    name = model_name_for(cfg.experiment.name, cfg.hash())
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == LEVELS  # one per level's ticket
    for mv in versions:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{mv.version}"))
        files = {str(f.relative_to(local)) for f in local.rglob("*") if f.is_file()}
        assert {f for f in files if not f.startswith("code/")} == {
            "MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "input_example.json",
            "serving_input_example.json", "pyfunc_model.py", "artifacts/checkpoint.safetensors",
            "artifacts/serving/plan.json", "artifacts/serving/model.onnx",
            "artifacts/serving/weights.safetensors",
            "registered_model_meta"}  # written by MLflow's download of a models:/ URI
        assert "code/ticketsmith/tracking/pyfunc_model.py" in files
        pins = (local / "requirements.txt").read_text().split()
        assert f"torch=={torch.__version__.split('+')[0]}" in pins
        assert f"mlflow=={mlflow.__version__}" in pins and f"numpy=={np.__version__}" in pins


def test_registry_champion_rejections_and_model_loads(tracked):
    cfg, client, out = tracked
    name = model_name_for(cfg.experiment.name, cfg.hash())
    promo = out.promotion
    passing = [v for v in out.verdicts if v.passed]
    assert passing, "the tiny experiment should have at least one passing ticket"
    best = max(passing, key=lambda v: v.sparsity)
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == promo.versions[best.level]
    assert champion.tags["level"] == str(best.level)
    assert champion.tags["quality_gate"] == "passed"
    for v in out.verdicts:
        mv = client.get_model_version(name, promo.versions[v.level])
        assert mv.tags["quality_gate"] == ("passed" if v.passed else "rejected")
        assert mv.tags["gate.accuracy_drop"].startswith("PASS" if any(
            g.passed for g in v.gates if g.name == "accuracy_drop") else "FAIL")
        if not v.passed:
            assert mv.aliases == []
    # models:/name@champion reloads and predicts what the checkpoint predicts
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    ck = load_checkpoint(Path(cfg.experiment.output_dir) / cfg.hash() / "replicate_0" /
                         f"level_{best.level}" / "ticket" / "checkpoint.safetensors")
    net = build_model(ck.meta["model"], tuple(ck.meta["input_shape"]), ck.meta["num_classes"],
                      options=ck.meta["options"])
    net.load_state_dict(ck.state)
    x = torch.randn(5, *ck.meta["input_shape"])
    logits = net.eval()(x).detach().numpy()
    np.testing.assert_allclose(model.predict(x.numpy(), params={"output": "logits"}), logits,
                               rtol=1e-5, atol=1e-5)
    probs = model.predict(x.numpy())  # the default: class probabilities
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    assert (probs.argmax(1) == logits.argmax(1)).all()
    # masks are baked into the registered weights
    for name_w, m in ck.mask.items():
        assert torch.all(ck.state[name_w][~m] == 0)


def test_rerun_is_idempotent(tracked, tmp_path):
    cfg, client, out = tracked
    before_runs = len(runs_of(client, cfg.hash(), "child"))
    name = model_name_for(cfg.experiment.name, cfg.hash())
    before_versions = len(client.search_model_versions(f"name = '{name}'"))
    again = run_prune(cfg, client=client, progress=False, echo=lambda s: None)
    assert again.experiment.trained == []
    assert len(runs_of(client, cfg.hash(), "child")) == before_runs
    assert len(client.search_model_versions(f"name = '{name}'")) == before_versions
    assert again.promotion.champion == out.promotion.champion


def test_resume_from_artifact_store_without_local_run_dir(tracked):
    cfg, client, out = tracked
    run_root = Path(out.experiment.run_root)
    shutil.rmtree(run_root)
    again = run_prune(cfg, client=client, progress=False, echo=lambda s: None)
    assert again.experiment.trained == []
    assert (run_root / "replicate_1" / "init.safetensors").is_file()
    ck = run_root / "replicate_0" / f"level_{LEVELS}" / "ticket" / "checkpoint.safetensors"
    assert load_checkpoint(ck).mask is not None
    assert len(runs_of(client, cfg.hash(), "child")) == 2 * (1 + LEVELS * len(VARIANTS))


def test_interrupted_experiment_resumes_into_same_parent(tmp_path, sqlite_uri, repo_root,
                                                         monkeypatch):
    # Killed in the last level (2): the resume trains it alone. No registry: not what is
    # resumed here (the kills in test_chaos.py cover it).
    cfg = tiny(tmp_path, "experiment.replicates=1", "prune.levels=2",
               "tracking.register_model=false")
    client = MlflowClient(sqlite_uri)
    from ticketsmith.tracking import tracker as tracking

    original = tracking.MlflowTracker.log_metrics
    def dying(self, metrics, step):  # the process is killed during level 2's ticket
        original(self, metrics, step)
        if self.current:
            run = client.get_run(self.current)
            if run.data.tags[TAG + "level"] == "2" and step >= 40:
                raise KeyboardInterrupt

    monkeypatch.setattr(tracking.MlflowTracker, "log_metrics", dying)
    with pytest.raises(KeyboardInterrupt):
        run_prune(cfg, client=client, progress=False, echo=lambda s: None)
    parent = runs_of(client, cfg.hash(), "parent")[0]
    parent_before = parent.info.run_id
    assert parent.info.status == "KILLED"  # not left RUNNING forever
    open_children = [c for c in runs_of(client, cfg.hash(), "child") if c.info.status != "FINISHED"]
    assert [c.info.status for c in open_children] == ["KILLED"]
    monkeypatch.setattr(tracking.MlflowTracker, "log_metrics", original)
    again = run_prune(cfg, client=client, progress=False, echo=lambda s: None)
    assert sorted(again.experiment.trained) == [(0, 2, "random_reinit"), (0, 2, "ticket")]
    parents = runs_of(client, cfg.hash(), "parent")
    assert [p.info.run_id for p in parents] == [parent_before]
    children = runs_of(client, cfg.hash(), "child")
    assert len(children) == 1 + 2 * len(VARIANTS)
    assert all(c.info.status == "FINISHED" for c in children)


def test_secrets_never_reach_params_or_tags(tmp_path, sqlite_uri, repo_root, monkeypatch):
    key = "c2VjcmV0LWtleS1kby1ub3QtbG9n"
    conn = f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={key};"
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", conn)
    client = MlflowClient(sqlite_uri)
    # A user pastes the connection string into a config value that becomes a param.
    cfg = tiny(tmp_path, "experiment.replicates=1", "prune.levels=1",
               f"data.root='{conn}'", f"experiment.name=leak-{key[:6]}")
    run_prune(cfg, client=client, progress=False, echo=lambda s: None)
    runs = runs_of(client, cfg.hash(), "parent") + runs_of(client, cfg.hash(), "child")
    assert runs
    for run in runs:
        assert run.data.params["data.root"].count("***") >= 1
        assert key not in json.dumps([run.data.params, run.data.tags, run.info.run_name])
        if run.data.tags[TAG + "role"] == "parent":
            for name in ("environment.json", "config.yaml"):
                assert key not in Path(client.download_artifacts(run.info.run_id, name)).read_text()


def test_retry_backs_off_then_fails_loudly():
    attempts, sleeps = [], []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("connection refused")
        return "ok"

    assert retry(flaky, "log", sleep=sleeps.append) == "ok"
    assert sleeps == [1.0, 2.0]
    sleeps.clear()

    def down():
        raise ConnectionError("connection refused")

    with pytest.raises(TrackingError, match="log batch failed after 6 attempt"):
        retry(down, "log batch", sleep=sleeps.append)
    assert sleeps == [1.0, 2.0, 4.0, 8.0, 16.0]

    def refused():
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        raise MlflowException("bad value", error_code=INVALID_PARAMETER_VALUE)

    sleeps.clear()
    with pytest.raises(TrackingError, match="after 1 attempt"):
        retry(refused, "log param", sleep=sleeps.append)
    assert sleeps == []  # a refused write is not retried


def test_http_tracking_server(tmp_path, mlflow_server, repo_root, monkeypatch):
    """The same experiment against a real `mlflow server` process over HTTP."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    # own seed: the server is shared by the session, and other tests run tiny.yaml on it too
    cfg = tiny(tmp_path, "experiment.replicates=1", "prune.levels=2", "experiment.name=http",
               "experiment.seed=7")
    client = MlflowClient(mlflow_server)
    out = run_prune(cfg, client=client, progress=False, echo=lambda s: None)
    children = runs_of(client, cfg.hash(), "child")
    assert len(children) == 1 + 2 * len(VARIANTS)
    art = {a.path for a in client.list_artifacts(children[0].info.run_id, "run")}
    assert "run/checkpoint.safetensors" in art
    shutil.rmtree(out.experiment.run_root)
    again = run_prune(cfg, client=client, progress=False, echo=lambda s: None)
    assert again.experiment.trained == []
    mlflow.set_tracking_uri(None)


def test_system_metrics_on_parent_runs_when_asked(tmp_path, sqlite_uri, repo_root, monkeypatch):
    # MLflow's own knob for the sampling period (seconds); the run lasts several periods.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    client = MlflowClient(sqlite_uri)
    cfg = tiny(tmp_path, "experiment.replicates=1", "prune.levels=1", "tracking.system_metrics=true",
               "experiment.name=sysmetrics", "tracking.register_model=false")
    run_prune(cfg, client=client, progress=False, echo=lambda s: None)
    parent = runs_of(client, cfg.hash(), "parent")[0]
    system = [k for k in parent.data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system
    child = runs_of(client, cfg.hash(), "child")[0]
    assert not any(k.startswith("system/") for k in child.data.metrics)


@pytest.mark.parametrize("uri,refused", [("sqlite:///mlflow.db", True), ("file:///tmp/mlruns", True),
                                         ("mlruns", True), ("http://mlflow.ml:5000", False)])
def test_a_pod_refuses_a_local_tracking_store(uri, refused, monkeypatch):
    from ticketsmith.base.config import ConfigError
    from ticketsmith.tracking.tracker import check_shared_store

    check_shared_store(uri)  # outside a pod: anything goes
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    if refused:
        with pytest.raises(ConfigError, match="lost with it"):
            check_shared_store(uri)
        monkeypatch.setenv("TICKETSMITH_ALLOW_LOCAL_TRACKING", "1")
    check_shared_store(uri)


def test_legacy_stage_transition_only_behind_the_flag(tracked):
    from ticketsmith.tracking.registry import promote, ticket_runs

    cfg, client, out = tracked
    name = model_name_for(cfg.experiment.name, cfg.hash())
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.current_stage in ("None", None)  # aliases only, by default
    exp_id, h = resolve_experiment(client, cfg.hash())
    runs = ticket_runs(client, exp_id, h, out.experiment.run_root)
    again = promote(client, name, runs, out.verdicts, legacy_stages=True,
                    echo=lambda s: None)
    assert again.champion == champion.version  # same verdicts: nothing moves
    assert client.get_model_version(name, champion.version).current_stage == "Production"


def test_the_engine_never_imports_mlflow():
    import subprocess
    import sys

    code = ("import sys, ticketsmith.engine.lottery, ticketsmith.engine.train, ticketsmith.engine.masks, "
            "ticketsmith.engine.data, ticketsmith.engine.store, ticketsmith.engine.checkpoint; "
            "print('mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_late_rewinding_resumes_mid_experiment_on_a_fresh_machine(tmp_path, sqlite_uri,
                                                                   monkeypatch):
    """Killed during level 2 and its disk lost: the rewind weights come back from the store."""
    client = MlflowClient(sqlite_uri)
    cfg = tiny(tmp_path, "experiment.replicates=1", "prune.rewind_iteration=20",
               "experiment.name=late-rewind", "prune.levels=2", "tracking.register_model=false")
    from ticketsmith.tracking import tracker as tracking

    original = tracking.MlflowTracker.run_started

    def killed_at_level_2(self, replicate, level, variant):
        if level == 2:
            raise KeyboardInterrupt
        original(self, replicate, level, variant)

    monkeypatch.setattr(tracking.MlflowTracker, "run_started", killed_at_level_2)
    with pytest.raises(KeyboardInterrupt):
        run_prune(cfg, client=client, progress=False, echo=lambda s: None)
    monkeypatch.setattr(tracking.MlflowTracker, "run_started", original)
    run_root = Path(cfg.experiment.output_dir) / cfg.hash()
    rewind = (run_root / "replicate_0" / "rewind.safetensors").read_bytes()
    shutil.rmtree(run_root)
    again = run_prune(cfg, client=client, progress=False, echo=lambda s: None)
    assert sorted(again.experiment.trained) == [(0, 2, "random_reinit"), (0, 2, "ticket")]
    assert (run_root / "replicate_0" / "rewind.safetensors").read_bytes() == rewind


def test_one_hash_in_two_experiments_is_resolved_only_with_its_name(tmp_path, sqlite_uri):
    client = MlflowClient(sqlite_uri)
    a = tiny(tmp_path, "experiment.replicates=1", "prune.levels=1", "experiment.name=A",
             "tracking.register_model=false")
    b = tiny(tmp_path, "experiment.replicates=1", "prune.levels=1", "experiment.name=B",
             "tracking.register_model=false")
    assert a.hash() == b.hash()  # the name is a label, not part of the identity
    for cfg in (a, b):
        run_prune(cfg, client=client, progress=False, echo=lambda s: None)
    with pytest.raises(TrackingError, match="several MLflow experiments"):
        resolve_experiment(client, a.hash())
    exp_a, h = resolve_experiment(client, f"A/{a.hash()}")
    assert client.get_experiment(exp_a).name == "A" and h == a.hash()
    assert resolve_experiment(client, "B")[1] == b.hash()
    with pytest.raises(TrackingError, match="no runs of hash"):
        resolve_experiment(client, "A/0123456789ab")
