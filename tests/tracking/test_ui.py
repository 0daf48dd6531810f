"""What the MLflow UI shows first: parent-run series, descriptions, and a real browser on them.

The tiny experiment runs for real against a real `mlflow server` (proxied artifacts); the
browser test drives Debian's Chromium through what a newcomer clicks and leaves its
screenshots in docs/images/tiny/ (git-ignored; the README's come from
`python scripts/ui_screenshots.py`).
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from ticketsmith.tracking.run_summary import (EXPERIMENT_KIND_TAG, GAP_KEY, NOTE_TAG, TRAINING_KIND,
                                              best_speedups, level_metrics, ui_link)

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("ui_screenshots", REPO / "scripts" / "ui_screenshots.py")
ui = importlib.util.module_from_spec(spec)
sys.modules["ui_screenshots"] = ui  # dataclasses look their module up while it loads
spec.loader.exec_module(ui)


# --- pure pieces -------------------------------------------------------------------------

def test_each_child_adds_its_point_and_the_gap_once_both_exist():
    ticket = {"variant": "ticket", "level": 2, "test_accuracy": 0.97, "sparsity": 0.75,
              "density": 0.25}
    alone = level_metrics(ticket, 0.98, {})
    assert alone == {"accuracy/ticket": 0.97, "weights/sparsity": 0.75, "weights/density": 0.25,
                     "accuracy/dense": 0.98}
    rand = {"variant": "random_reinit", "level": 2, "test_accuracy": 0.93, "sparsity": 0.75,
            "density": 0.25}
    both = level_metrics(rand, 0.98, {"ticket": 0.97})
    assert both == {"accuracy/random_reinit": 0.93, GAP_KEY: pytest.approx(0.04)}


def test_best_speedup_per_batch_counts_only_checked_formats():
    rows = [{"format": "csr", "batch_size": 1, "speedup": 1.3, "correct": True},
            {"format": "auto", "batch_size": 1, "speedup": 9.0, "correct": False},
            {"format": "numpy_dense", "batch_size": 1, "speedup": 1.6, "correct": True},
            {"format": "compacted", "batch_size": 256, "speedup": 2.0, "correct": True}]
    assert best_speedups(rows) == {"speedup/batch_1": 1.3, "speedup/batch_256": 2.0}
    # with a serving plan, what ships is what the parent run charts
    plan = {"speedup": {"1": 2.2, "256": None}}
    assert best_speedups(rows, plan) == {"speedup/batch_1": 2.2}


def test_ui_link_opens_training_mode():
    assert ui_link("http://h:5000/", "3") == \
        "http://h:5000/#/experiments/3?workflowType=machine_learning"
    assert "mlflow ui --backend-store-uri sqlite:///m.db" in ui_link("sqlite:///m.db", "1")


# --- the tiny experiment on a real server ------------------------------------------------

@pytest.fixture(scope="module")
def served(mlflow_server, tmp_path_factory):
    """(server url, experiment id, replicate-0 parent run id) of the tiny experiment."""
    work = tmp_path_factory.mktemp("ui")
    try:
        exp_id, run_id = ui.run_experiment(mlflow_server, str(REPO / "configs" / "tiny.yaml"),
                                           ["experiment.name=ui-tiny"], work)
    finally:
        mlflow.set_tracking_uri(None)  # the registry sets the fluent API's URI
    return mlflow_server, exp_id, run_id


@pytest.mark.slow
def test_parent_run_holds_the_per_level_comparison(served):
    url, exp_id, run_id = served
    client = MlflowClient(url)
    children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{run_id}'")
    acc = {(int(r.data.tags["ticketsmith.level"]), r.data.tags["ticketsmith.variant"]):
           r.data.metrics["test_accuracy"] for r in children}

    def series(key):
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    for variant in ("ticket", "random_reinit"):
        assert series(f"accuracy/{variant}") == {lv: a for (lv, v), a in acc.items() if v == variant}
    assert series("accuracy/dense") == {lv: acc[(0, "dense")] for lv in range(4)}
    gap = series(GAP_KEY)
    assert set(gap) == {1, 2, 3}
    for lv, g in gap.items():
        assert g == pytest.approx(acc[(lv, "ticket")] - acc[(lv, "random_reinit")])
    sparsity = series("weights/sparsity")
    assert sparsity[0] == 0 and list(sparsity.values()) == sorted(sparsity.values())
    # Children keep what they logged before: one test_accuracy value each, at step 0.
    assert all(len(client.get_metric_history(r.info.run_id, "test_accuracy")) == 1
               for r in children)


@pytest.mark.slow
def test_descriptions_and_kind_say_where_to_look(served):
    url, exp_id, run_id = served
    client = MlflowClient(url)
    exp = client.get_experiment(exp_id)
    assert exp.tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    assert "ticket against random re-init" in exp.tags[NOTE_TAG]
    note = client.get_run(run_id).data.tags[NOTE_TAG]
    assert note.startswith("**Safe optimisation zone") or note.startswith("**No ")
    assert f"get-artifact?path=report/figures/accuracy_vs_weights.png&run_uuid={run_id}" in note
    versions = [v for m in client.search_registered_models() if m.name.startswith("ui-tiny")
                for v in client.search_model_versions(f"name = '{m.name}'")]
    assert versions
    for v in versions:
        verdict = "PASSED" if v.tags["quality_gate"] == "passed" else "FAILED"
        assert f"quality gate **{verdict}**" in v.description
        assert "accuracy_drop: " in v.description


def _chromium() -> str | None:
    return ui.CHROMIUM if Path(ui.CHROMIUM).is_file() else shutil.which("chromium")


@pytest.mark.slow
def test_a_newcomer_sees_ticket_against_random_in_a_real_browser(served):
    pytest.importorskip("playwright", reason="pip install -e '.[test]' installs playwright")
    if _chromium() is None:
        pytest.skip("no Chromium: run `bash .ci/install-services.sh` (Debian package chromium)")
    ui.CHROMIUM = _chromium()
    url, exp_id, run_id = served
    seen = ui.browse(url, exp_id, run_id, REPO / "docs" / "images" / "tiny")
    # Training mode: runs and models, none of the GenAI evaluation pages.
    assert {"Runs", "Models"} <= set(seen.sidebar)
    assert not {"Judges", "Evaluation runs"} & set(seen.sidebar)
    assert seen.genai_labels == 0
    # The description's figure (ticket, random re-init and dense in one chart) loaded.
    assert seen.description_figure_px > 300
    # Model metrics: the accuracy section charts ticket and random re-init over the levels.
    legends = "\n".join(seen.chart_series)
    for key in ("accuracy/ticket", "accuracy/random_reinit", GAP_KEY):
        assert f"({key})" in legends
    # The executive report opens in the artifact viewer.
    assert "The answer" in seen.report_text and "random re-init" in seen.report_text
    assert all(p.stat().st_size > 10_000 for p in seen.screenshots)
