"""A tiny language-model experiment end to end through the real pipeline on a SQLite store:
killed during level 2 and resumed, gated on bits per byte, the champion registered as a pyfunc
that turns prompts into text, per-level bpb series on the parent run, samples as artifacts,
and the executive report written."""
from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from ticketsmith.pipeline import run_prune
from ticketsmith.tracking import tracker as tracking
from ticketsmith.tracking.registry import model_name_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_lm import tiny_lm  # noqa: E402


@pytest.fixture()
def resumed(tmp_path, sqlite_uri, monkeypatch):
    cfg = tiny_lm(tmp_path / "runs", "train.iterations=30", "train.eval_every=15")
    client = MlflowClient(sqlite_uri)
    original = tracking.MlflowTracker.run_started

    def killed_at_level_2(self, replicate, level, variant):
        if level == 2:
            raise KeyboardInterrupt
        original(self, replicate, level, variant)

    monkeypatch.setattr(tracking.MlflowTracker, "run_started", killed_at_level_2)
    with pytest.raises(KeyboardInterrupt):
        run_prune(cfg, client=client, progress=False, echo=lambda s: None)
    monkeypatch.setattr(tracking.MlflowTracker, "run_started", original)
    lines: list[str] = []
    out = run_prune(cfg, client=client, progress=False, echo=lines.append,
                    report_dir=tmp_path / "report")
    return cfg, client, out, lines, tmp_path


@pytest.mark.slow
def test_a_killed_lm_experiment_resumes_gates_on_bpb_and_serves_text(resumed):
    cfg, client, out, lines, tmp_path = resumed
    assert sorted(out.experiment.trained) == [(0, 2, "random_reinit"), (0, 2, "ticket")]
    assert [g.name for g in out.verdicts[0].gates] == ["val_bpb_increase", "test_bpb_increase",
                                                       "beats_random"]
    assert any("ticket bpb" in line for line in lines)
    exp = client.get_experiment_by_name(cfg.experiment.name)
    parent = client.search_runs([exp.experiment_id], "tags.`ticketsmith.role` = 'parent'")[0]
    series = client.get_metric_history(parent.info.run_id, "bpb/ticket")
    assert [m.step for m in series] == [1, 2]
    dense = client.get_metric_history(parent.info.run_id, "bpb/dense")
    assert dense and dense[0].value == pytest.approx(out.experiment.records[0]["test_bpb"])
    child = client.search_runs([exp.experiment_id], "params.variant = 'ticket' and "
                               "tags.`ticketsmith.level` = '2'")[0]
    samples = mlflow.artifacts.download_artifacts(run_id=child.info.run_id,
                                                  artifact_path="run/samples.txt",
                                                  dst_path=str(tmp_path / "dl"))
    assert "--- greedy" in Path(samples).read_text()
    assert out.promotion is not None and out.promotion.champion is not None
    name = model_name_for(cfg.experiment.name, out.experiment.exp_hash)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    texts = model.predict(["The ", "We have "], params={"max_new_tokens": 8})
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    report = next((tmp_path / "report").rglob("executive_summary.md")).read_text()
    assert "bits per byte" in report
