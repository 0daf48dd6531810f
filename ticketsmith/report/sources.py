"""What the executive report reads: an experiment's records, config, environment, serving
benchmarks, training curves and registry outcome.

Two sources, one shape (`ReportInputs`): the MLflow tracking store (the system of record; a
local SQLite file or a remote server), or a local run folder `runs/<hash>` written by
`ticketsmith prune --no-tracking`. Nothing is computed here; `report.py` decides what to say.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ticketsmith.base.config import Config, ConfigError, load_config
from ticketsmith.gates import described
from ticketsmith.tracking import serving_tags
from ticketsmith.tracking.benchmarks import BENCHMARK_ARTIFACT
from ticketsmith.tracking.registry import model_name_for
from ticketsmith.base.secrets import redact
from ticketsmith.engine.store import RunStore
from ticketsmith.tracking.tracker import TAG, TrackingError, load_records, parent_runs, resolve_experiment, retry

Key = tuple[int, int, str]  # (replicate, level, variant)
CURVE_METRICS = ("train_loss", "val_loss", "val_accuracy")


@dataclass(frozen=True)
class VersionInfo:
    """One registered model version of this experiment, as the registry holds it."""
    version: str
    level: int | None
    sparsity: float | None
    quality_gate: str                  # passed / rejected / unknown
    gates: dict[str, str]              # gate name → "PASS 0.1234" / "FAIL ..." / "n/a"
    aliases: tuple[str, ...]
    run_id: str
    serving: dict[str, str] = field(default_factory=dict)   # its `serving.*` tags (what ships)


@dataclass(frozen=True)
class RegistryOutcome:
    model_name: str
    versions: list[VersionInfo]        # this experiment's versions, by version number
    aliases: dict[str, str]            # alias → version, over the whole registered model


@dataclass
class ReportInputs:
    name: str
    exp_hash: str
    config: Config | None              # None when the experiment's config could not be read
    records: list[dict[str, Any]]      # engine records; `run_id` names the run behind each
    environment: dict[str, list[str]]  # training hardware, versions (replicates may differ)
    parents: dict[int, str]            # replicate → parent run id (empty for a local folder)
    benchmarks: dict[Key, dict[str, Any]]
    registry: RegistryOutcome | None
    source: str                        # where it came from, for the evidence section
    from_mlflow: bool
    load_curve: Callable[[int, int, str], list[dict[str, float]]] = field(repr=False)
    run_link: Callable[[str], str | None] = field(repr=False, default=lambda run_id: None)
    notes: list[str] = field(default_factory=list)   # what could not be read, said in the report
    # language models: a run's samples.txt (continuations of fixed prompts), None if absent
    load_samples: Callable[[int, int, str], str | None] = field(repr=False,
                                                                default=lambda *key: None)


# --- MLflow --------------------------------------------------------------------------------

def from_mlflow(client: MlflowClient, ref: str) -> ReportInputs:
    """Everything the report needs, read from the tracking store only."""
    exp_id, exp_hash = resolve_experiment(client, ref)
    exp = retry(lambda: client.get_experiment(exp_id), "get experiment")
    records = load_records(client, exp_id, exp_hash)
    parents = {int(p.data.tags[TAG + "replicate"]): p for p in parent_runs(client, exp_id, exp_hash)}
    notes: list[str] = []
    config = _mlflow_config(client, parents, notes)
    if config is not None:  # what prune and `ticketsmith gate` gate too
        records = described(records, config)
    env: dict[str, list[str]] = {}
    for run in parents.values():
        for k, v in sorted(run.data.tags.items()):
            if k.startswith(TAG + "env."):
                values = env.setdefault(k[len(TAG + "env."):], [])
                if v not in values:
                    values.append(v)
    uri = client.tracking_uri
    base = redact(uri).rstrip("/") if uri.startswith(("http://", "https://")) else None
    return ReportInputs(
        name=exp.name, exp_hash=exp_hash, config=config, records=records, environment=env,
        parents={r: p.info.run_id for r, p in parents.items()},
        benchmarks=_mlflow_benchmarks(client, records, notes),
        registry=_registry(client, model_name_for(exp.name, exp_hash),
                           {r["run_id"] for r in records}, notes),
        source=f"MLflow tracking store {redact(uri)}, experiment '{exp.name}' (id {exp_id})",
        from_mlflow=True, load_curve=lambda *key: _mlflow_curve(client, records, key),
        load_samples=lambda *key: _mlflow_samples(client, records, key),
        run_link=(lambda run_id: f"{base}/#/experiments/{exp_id}/runs/{run_id}") if base
        else (lambda run_id: None),
        notes=notes)


def _download_json(client: MlflowClient, run_id: str, path: str) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        local = retry(lambda: mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=path, dst_path=tmp, tracking_uri=client.tracking_uri),
            f"download {path} of run {run_id}")
        text = Path(local).read_text()
    return json.loads(text) if path.endswith(".json") else text


def _mlflow_samples(client: MlflowClient, records: list[dict[str, Any]], key) -> str | None:
    run_id = next((r.get("run_id") for r in records
                   if (r["replicate"], r["level"], r["variant"]) == tuple(key)), None)
    if not run_id:
        return None
    try:
        return _download_json(client, run_id, "run/samples.txt")
    except TrackingError:
        return None


def _mlflow_config(client: MlflowClient, parents: dict[int, Any], notes: list[str]) -> Config | None:
    for _, run in sorted(parents.items()):
        try:
            text = _download_json(client, run.info.run_id, "config.yaml")
        except TrackingError:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.yaml").write_text(text)
            try:
                return load_config(Path(tmp) / "config.yaml")
            except ConfigError as exc:
                notes.append(f"The logged config.yaml does not load ({exc}); default gate "
                             "thresholds are used.")
                return None
    notes.append("No parent run holds config.yaml; default gate thresholds are used.")
    return None


def _mlflow_benchmarks(client: MlflowClient, records: list[dict[str, Any]],
                       notes: list[str]) -> dict[Key, dict[str, Any]]:
    """The benchmark JSON (`BENCHMARK_ARTIFACT`) of every run that logged speedup metrics."""
    out = {}
    for r in records:
        if not any(k.startswith("speedup_") for k in r):
            continue
        try:
            out[(r["replicate"], r["level"], r["variant"])] = _download_json(
                client, r["run_id"], BENCHMARK_ARTIFACT)
        except (TrackingError, json.JSONDecodeError) as exc:
            notes.append(f"Run {r['run_id']} logged speedups but its benchmark.json could not be "
                         f"read ({str(exc).splitlines()[0]}).")
    return out


def _mlflow_curve(client: MlflowClient, records: list[dict[str, Any]], key: Key) -> list[dict]:
    run_id = next((r["run_id"] for r in records
                   if (r["replicate"], r["level"], r["variant"]) == tuple(key)), None)
    if run_id is None:
        return []
    rows: dict[int, dict[str, float]] = {}
    for name in CURVE_METRICS:
        history = retry(lambda: client.get_metric_history(run_id, name), "read metric history")
        for m in history:
            rows.setdefault(m.step, {"iteration": m.step})[name] = m.value
    return [rows[s] for s in sorted(rows)]


def _registry(client: MlflowClient, name: str, run_ids: set[str],
              notes: list[str]) -> RegistryOutcome | None:
    try:
        model = client.get_registered_model(name)
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    aliases = dict(getattr(model, "aliases", {}) or {})
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    mine = []
    for mv in versions:
        if mv.run_id not in run_ids:
            continue
        tags = mv.tags or {}
        mine.append(VersionInfo(
            str(mv.version), int(tags["level"]) if tags.get("level", "").isdigit() else None,
            float(tags["sparsity"]) if tags.get("sparsity") else None,
            tags.get("quality_gate", "unknown"),
            {k[len("gate."):]: v for k, v in sorted(tags.items()) if k.startswith("gate.")},
            tuple(sorted(by_version.get(str(mv.version), []))), mv.run_id,
            {k: v for k, v in tags.items() if k.startswith(serving_tags.PREFIX)}))
    mine.sort(key=lambda v: int(v.version))
    return RegistryOutcome(name, mine, {a: str(v) for a, v in aliases.items()})


# --- a local run folder --------------------------------------------------------------------

def find_run_root(prefix: str | Path, ref: str | None = None) -> Path:
    """`prefix` itself when it is a run folder `runs/<hash>`; else `prefix/<ref>`; else the
    only run folder under `prefix`."""
    prefix = Path(prefix)
    if (prefix / "config.yaml").is_file():
        return prefix
    if ref and (prefix / ref / "config.yaml").is_file():
        return prefix / ref
    found = sorted(p.parent for p in prefix.glob("*/config.yaml"))
    if len(found) == 1 and ref is None:
        return found[0]
    hint = (f"; choose one with --experiment ({', '.join(p.name for p in found)})" if found
            else "")
    raise ConfigError(f"--runs-prefix {prefix}: not a run folder (no config.yaml)"
                      + (f" and no run {ref!r} inside it" if ref else "") + hint)


def from_local(prefix: str | Path, ref: str | None = None) -> ReportInputs:
    """The same inputs from a local run folder: no MLflow, so no registry and no run ids."""
    root = find_run_root(prefix, ref)
    store = RunStore(root)
    config = load_config(store.config_path)
    records = described(store.records(), config)
    benchmarks = {}
    for r in records:
        key = (r["replicate"], r["level"], r["variant"])
        r["run_id"] = str(store.run_dir(*key).relative_to(root))
        if store.benchmark_path(*key).is_file():
            benchmarks[key] = json.loads(store.benchmark_path(*key).read_text())

    def curve(replicate: int, level: int, variant: str) -> list[dict]:
        path = store.curve_path(replicate, level, variant)
        return json.loads(path.read_text()) if path.is_file() else []

    return ReportInputs(
        name=config.experiment.name, exp_hash=root.name, config=config, records=records,
        environment={}, parents={}, benchmarks=benchmarks, registry=None,
        source=f"local run folder {root.resolve()} (not MLflow)", from_mlflow=False,
        load_curve=curve,
        load_samples=lambda *key: (store.samples_path(*key).read_text()
                                   if store.samples_path(*key).is_file() else None),
        notes=["Built from a local run folder, not the MLflow tracking store: no registry "
               "outcome, and the training hardware and versions were not recorded there."])
