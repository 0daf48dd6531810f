"""One experiment, one verdict: `prune`, `ticketsmith gate` and the report gate the same
records — those the config describes — even when the store holds more levels and
replicates than the config asks for (levels and replicates are not hashed)."""
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from ticketsmith.base.config import load_config
from ticketsmith.gates import evaluate_gates, format_table
from ticketsmith.pipeline import gate_experiment, run_prune
from ticketsmith.report.sources import from_local, from_mlflow
from ticketsmith.report.stats import analyse
from ticketsmith.tracking.tracker import load_records

REPO = Path(__file__).resolve().parents[1]


def test_prune_gate_and_report_agree_on_a_store_holding_more(tmp_path, sqlite_uri, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = [f"experiment.output_dir={tmp_path / 'runs'}", "train.iterations=60",
            "tracking.register_model=false", "experiment.benchmark=false"]
    big = load_config(REPO / "configs/tiny.yaml", [*base, "prune.levels=3", "experiment.replicates=2"])
    small = load_config(REPO / "configs/tiny.yaml", [*base, "prune.levels=1", "experiment.replicates=1"])
    assert big.hash() == small.hash()
    client = MlflowClient(sqlite_uri)
    quiet = dict(progress=False, echo=lambda s: None, client=client, report_dir=None)
    run_prune(big, **quiet)
    out = run_prune(small, **quiet)  # everything reused; the store holds more than `small`

    exp_id = client.get_experiment_by_name("tiny").experiment_id
    stored = load_records(client, exp_id, out.experiment.exp_hash)
    assert {r["level"] for r in stored} == {0, 1, 2, 3} and {r["replicate"] for r in stored} == {0, 1}
    everything = format_table(evaluate_gates(stored, small.gate))
    pruned = format_table(out.verdicts)
    assert pruned != everything  # the selection matters here
    _, gated, _, _ = gate_experiment(small.hash(), client=client)
    reported = format_table(analyse(from_mlflow(client, small.hash())).verdicts)
    local = format_table(analyse(from_local(tmp_path / "runs", small.hash())).verdicts)
    assert gated == reported == local == pruned
    assert {v.level for v in out.verdicts} <= {0, 1}
    mlflow.set_tracking_uri(None)
