"""Tracking work that overlaps training: jobs in order, a failure surfaces, the replicate's run
ends FAILED, nothing recorded is lost, and a rerun finishes the job."""
from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

import ticketsmith.pipeline as pipeline
from ticketsmith.base.config import load_config
from ticketsmith.tracking.background import Background
from ticketsmith.tracking.registry import model_name_for
from ticketsmith.tracking.tracker import TAG

REPO = Path(__file__).resolve().parents[2]


def test_jobs_run_in_order_and_the_first_failure_is_raised_once():
    bg, done = Background(), []

    def fail(what: str) -> None:
        raise ValueError(what)

    bg.submit(done.append, 1)
    bg.submit(fail, "first")
    bg.submit(fail, "second")
    bg.submit(done.append, 2)
    with pytest.raises(ValueError, match="first"):
        bg.wait()
    assert done == [1, 2]  # a failure stops no later job: each job's records land whole
    bg.wait()  # already raised: not again


@pytest.mark.slow  # two tiny tracked experiments
def test_a_failed_background_job_ends_the_replicate_failed_and_loses_nothing(
        tmp_path, sqlite_uri, monkeypatch):
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"experiment.output_dir={tmp_path / 'runs'}", "prune.levels=2",
        "experiment.variants=[ticket]"])
    client = MlflowClient(sqlite_uri)
    real, calls = pipeline.prepare_ticket, []

    def fails_once(*args, **kwargs):  # the first ticket's job fails, as a refused export would
        calls.append(args[1])
        if len(calls) == 1:
            raise RuntimeError("planted failure in the background job")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "prepare_ticket", fails_once)
    with pytest.raises(RuntimeError, match="planted failure"):
        pipeline.run_prune(cfg, client=client, progress=False, echo=lambda s: None)
    assert len(calls) == 2  # the second ticket's job still ran, after the failed one
    exp = client.get_experiment_by_name(cfg.experiment.name).experiment_id
    parent, = client.search_runs([exp], f"tags.`{TAG}role` = 'parent'")
    assert parent.info.status == "FAILED"
    children = client.search_runs([exp], f"tags.`{TAG}role` = 'child'")
    assert sorted(int(r.data.tags[TAG + "level"]) for r in children) == [0, 1, 2]
    for run in children:  # every level's record landed before the run ended
        assert run.info.status == "FINISHED"
        assert "test_accuracy" in run.data.metrics
        files = {f.path for f in client.list_artifacts(run.info.run_id, "run")}
        assert "run/metrics.json" in files
    name = model_name_for(cfg.experiment.name, parent.data.tags[TAG + "hash"])
    assert client.search_model_versions(f"name = '{name}'") == []  # no promotion ran

    # The rerun trains nothing, registers both tickets and finishes the replicate.
    out = pipeline.run_prune(cfg, client=client, progress=False, echo=lambda s: None)
    assert out.experiment.trained == []
    assert sorted(out.promotion.versions) == [1, 2]
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    levels = {int(mv.tags["level"]): mv for mv in
              client.search_model_versions(f"name = '{out.promotion.model_name}'")}
    assert sorted(levels) == [1, 2]
    assert all(mv.tags["serving.format"] for mv in levels.values())
