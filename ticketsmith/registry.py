"""Ticket candidates in the MLflow model registry, promoted or rejected by the gates.

Candidate per level: the ticket of replicate 0 (every replicate has its own mask; replicate 0
is the deterministic choice; the gates themselves use the mean over all replicates).
Aliases replace the deprecated stages: `champion` ≈ Production, `previous-champion` ≈ the
archived version kept for rollback. `legacy_stages=True` also moves stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlflow
import numpy as np
import safetensors
import torch
from mlflow import MlflowClient

from .checkpoint import load_checkpoint
from .gates import LevelVerdict, champion_level
from .interrupts import interrupts_deferred
from .tracking import TAG, retry

CHAMPION, PREVIOUS = "champion", "previous-champion"
MODEL_CODE = str(Path(__file__).with_name("pyfunc_model.py"))


@dataclass(frozen=True)
class Promotion:
    model_name: str
    versions: dict[int, str]          # level → model version
    champion: str | None              # version holding `champion` now
    previous: str | None              # version holding `previous-champion` now
    rejected: list[str]


def model_name_for(experiment_name: str) -> str:
    return experiment_name


def _find_version(client: MlflowClient, name: str, run_id: str):
    found = retry(lambda: client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"),
                  "search model versions")
    return found[0] if found else None


def register_ticket(client: MlflowClient, name: str, run_id: str, checkpoint: Path,
                    allow_factory: str | None = None) -> str:
    """Log the ticket as a pyfunc model in its run and register it; idempotent per run.

    allow_factory: the model factory the experiment's config names; the pyfunc imports that
    one and no other (`checkpoint.factory_allowed`)."""
    existing = _find_version(client, name, run_id)
    if existing is not None:
        return existing.version
    ck = load_checkpoint(checkpoint)
    example = np.zeros((2, *ck.meta["input_shape"]), dtype=np.float32)
    mlflow.set_tracking_uri(client.tracking_uri)
    # Ctrl-C waits for the model to be logged: MLflow's own store calls in here must not be
    # cut in half (see interrupts.py).
    with interrupts_deferred(), mlflow.start_run(run_id=run_id):
        # The model carries its own code (ticketsmith/) and states its requirements, so MLflow
        # need not infer them by re-importing the model in a subprocess (~10 s per version).
        info = mlflow.pyfunc.log_model(
            name="model", python_model=MODEL_CODE, artifacts={"checkpoint": str(checkpoint)},
            input_example=example, code_paths=[str(Path(__file__).parent)],
            model_config={"allow_factory": allow_factory} if allow_factory else None,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"safetensors=={safetensors.__version__}", f"numpy=={np.__version__}",
                              f"mlflow=={mlflow.__version__}"])
    try:
        retry(lambda: client.get_registered_model(name), "get registered model")
    except Exception:
        retry(lambda: client.create_registered_model(
            name, description="TicketSmith ticket candidates; `champion` is the sparsest ticket "
                              "passing every quality gate."), "create registered model")
    mv = retry(lambda: client.create_model_version(name, info.model_uri, run_id=run_id,
                                                   model_id=info.model_id),
               "create model version")
    # MLflow may close the run it reopened; keep the ticket run FINISHED as the engine left it.
    retry(lambda: client.set_terminated(run_id, "FINISHED"), "finish run")
    return mv.version


def promote(client: MlflowClient, name: str, ticket_runs: dict[int, tuple[str, Path]],
            verdicts: list[LevelVerdict], *, legacy_stages: bool = False,
            echo: Callable[[str], None] = print, allow_factory: str | None = None) -> Promotion:
    """Register every level's candidate, tag gate results, move the aliases."""
    by_level = {v.level: v for v in verdicts}
    versions, rejected = {}, []
    for level, (run_id, checkpoint) in sorted(ticket_runs.items()):
        if level not in by_level:
            continue
        version = register_ticket(client, name, run_id, checkpoint, allow_factory)
        versions[level] = version
        v = by_level[level]
        tags: dict[str, Any] = {"level": level, "sparsity": f"{v.sparsity:.6f}",
                                "source_run": run_id,
                                "quality_gate": "passed" if v.passed else "rejected"}
        for g in v.gates:
            tags[f"gate.{g.name}"] = ("n/a" if g.passed is None else
                                      ("PASS" if g.passed else "FAIL")) + (
                f" {g.value:.4f}" if g.value is not None else "")
        for k, val in tags.items():
            retry(lambda: client.set_model_version_tag(name, version, k, str(val)), "tag version")
        if not v.passed:
            rejected.append(version)
            _drop_aliases(client, name, version)
    best = champion_level(verdicts)
    current = _alias(client, name, CHAMPION)
    previous = _alias(client, name, PREVIOUS)
    if best is not None and best.level in versions:
        new = versions[best.level]
        if current != new:
            if current is not None and current not in rejected:
                retry(lambda: client.set_registered_model_alias(name, PREVIOUS, current),
                      "set previous-champion")
                previous = current
            retry(lambda: client.set_registered_model_alias(name, CHAMPION, new), "set champion")
            echo(f"registry: {name} v{new} (level {best.level}, {best.sparsity:.1%} sparse) "
                 f"is now @{CHAMPION}" + (f"; v{current} is @{PREVIOUS}" if current else ""))
            current = new
        if legacy_stages:
            retry(lambda: client.transition_model_version_stage(
                name, current, "Production", archive_existing_versions=True), "stage transition")
    elif current in rejected:
        retry(lambda: client.delete_registered_model_alias(name, CHAMPION), "drop champion")
        current = None
    return Promotion(name, versions, current, previous, rejected)


def _alias(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return client.get_model_version_by_alias(name, alias).version
    except mlflow.exceptions.MlflowException:
        return None


def _drop_aliases(client: MlflowClient, name: str, version: str) -> None:
    mv = retry(lambda: client.get_model_version(name, version), "get model version")
    for alias in mv.aliases:
        retry(lambda: client.delete_registered_model_alias(name, alias), "drop alias")


def ticket_runs(client: MlflowClient, experiment_id: str, exp_hash: str, run_root: Path,
                replicate: int = 0) -> dict[int, tuple[str, Path]]:
    """level → (child run id, local checkpoint) for the candidate replicate's tickets."""
    flt = (f"tags.`{TAG}hash` = '{exp_hash}' and tags.`{TAG}variant` = 'ticket' and "
           f"tags.`{TAG}replicate` = '{replicate}' and attributes.status = 'FINISHED'")
    runs = retry(lambda: client.search_runs([experiment_id], flt, max_results=1000), "search runs")
    out = {}
    for run in runs:
        level = int(run.data.tags[TAG + "level"])
        out[level] = (run.info.run_id, run_root / f"replicate_{replicate}" / f"level_{level}" /
                      "ticket" / "checkpoint.safetensors")
    return out
