"""`ticketsmith gate`: gate a tracked experiment again from the store alone (MLflow, no
torch), with the same record selection as `prune` and the report (`gates.described`)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import mlflow
from mlflow import MlflowClient

from ticketsmith.base.config import load_config
from ticketsmith.gates import described, evaluate_gates, format_table, release_check
from ticketsmith.tracking.registry import model_name_for, promote, ticket_runs
from ticketsmith.tracking.tracker import load_records, parent_runs, resolve_experiment, retry


def gate_experiment(ref: str, config_path: str | None = None, overrides: list[str] = (),
                    client: MlflowClient | None = None, *, update_registry: bool = False,
                    echo: Callable[[str], None] = print) -> tuple[str, str, bool, str]:
    """Gate a tracked experiment again: (hash, gate table, release ok, reason).

    Thresholds come from `config_path` (+ overrides) or else the experiment's logged config.
    update_registry: write the new verdicts to the experiment's registered versions and move
    `champion`/`previous-champion` accordingly (otherwise the registry is only read).
    """
    client = client or MlflowClient()
    exp_id, exp_hash = resolve_experiment(client, ref)
    if config_path is None:
        parent = parent_runs(client, exp_id, exp_hash)[0]
        config_path = retry(lambda: mlflow.artifacts.download_artifacts(
            run_id=parent.info.run_id, artifact_path="config.yaml", dst_path=tempfile.mkdtemp(),
            tracking_uri=client.tracking_uri), "download config.yaml")
    cfg = load_config(config_path, list(overrides))
    verdicts = evaluate_gates(described(load_records(client, exp_id, exp_hash), cfg), cfg.gate)
    if update_registry:
        name = retry(lambda: client.get_experiment(exp_id), "get experiment").name
        runs = ticket_runs(client, exp_id, exp_hash, Path(cfg.experiment.output_dir) / exp_hash)
        promote(client, model_name_for(name, exp_hash), runs, verdicts, echo=echo,
                register=False)
    ok, reason = release_check(verdicts, cfg.gate)
    return exp_hash, format_table(verdicts), ok, reason
