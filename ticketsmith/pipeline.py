"""The prune pipeline: experiment → benchmark → gates → registry, tracked in MLflow.

This is what `ticketsmith prune`, `python -m ticketsmith.prune` and the MLproject `prune`
entry point run. Each stage reads what the previous one recorded, so each is idempotent.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag

from ticketsmith.base.config import Config
from ticketsmith.base.errors import BenchmarkError
from ticketsmith.gates import (LevelVerdict, PipelineResult, described, evaluate_gates,
                               format_table, label, release_check)
from ticketsmith.engine.lottery import ExperimentResult, Selection, prepare_experiment, run_experiment
from ticketsmith.engine.events import Tracker
from ticketsmith.tracking.background import Background
from ticketsmith.tracking.registry import (Prepared, model_name_for, prepare_ticket,
                                           promote, ticket_runs)
from ticketsmith.tracking.run_summary import best_speedups, ui_link
from ticketsmith.tracking.regate import gate_experiment  # noqa: F401 (`ticketsmith gate`)
from ticketsmith.tracking.sqlite_store import import_store_modules
from ticketsmith.tracking.tracker import MlflowTracker, load_records, prepare_store, retry


def log_gates(client: MlflowClient, tracker: MlflowTracker, verdicts: list[LevelVerdict]) -> None:
    """Gate numbers on every ticket child run (tags + metrics, one batch per run) and a
    table on the parents."""
    now = int(time.time() * 1000)
    for (rep, level, variant), run in tracker.children.items():
        v = next((v for v in verdicts if v.level == level), None)
        if variant != "ticket" or v is None:
            continue
        tags = [RunTag(f"gate.{g.name}", label(g.passed)) for g in v.gates]
        tags.append(RunTag("quality_gate", "passed" if v.passed else "rejected"))
        metrics = [Metric(f"gate_{g.name}", float(g.value), now, 0) for g in v.gates
                   if g.value is not None]
        tracker.log_batch(run.info.run_id, metrics=metrics, tags=tags)
    table = format_table(verdicts)
    for run_id in tracker.parents.values():
        retry(lambda: client.log_text(run_id, table, "gates/gates.txt"), "upload gate table")


def run_prune(cfg: Config, *, client: MlflowClient | None = None, progress: bool = True,
              legacy_stages: bool = False, echo: Callable[[str], None] = print,
              tracker: MlflowTracker | None = None, engine_tracker: Tracker | None = None,
              selection: Selection = Selection(),
              report_dir: str | Path | None = None) -> PipelineResult:
    """engine_tracker: what the engine reports to, if not `tracker` itself — e.g. a sweep's
    wrapper that forwards to `tracker` and stops hopeless trials between levels.
    report_dir: write the executive report there at the end (None: no report)."""
    # Data and model first: a config error (unknown model, data set or factory) must be
    # found before the tracking store records anything.
    uri = client.tracking_uri if client is not None else None
    warm = Background()  # about 1 s of imports, beside the data loading (files, torch)
    warm.submit(import_tracking_modules, uri)
    try:
        data = prepare_experiment(cfg)
    finally:
        warm.abandon()  # ends once the imports are done; an import error shows where used
    prepare_store(uri)
    client = client or MlflowClient()
    tracker = tracker or MlflowTracker(client, echo=echo)
    prepared = prepare_tickets_ahead(cfg, client, tracker, data)
    result = run_experiment(cfg, tracker=engine_tracker or tracker, progress=progress, echo=echo,
                            selection=selection, data=data)
    return finish_prune(cfg, client, tracker, result, prepared, legacy_stages=legacy_stages,
                        echo=echo, report_dir=report_dir)


def finish_prune(cfg: Config, client: MlflowClient, tracker: MlflowTracker,
                 result: ExperimentResult, prepared: dict[str, Prepared], *,
                 legacy_stages: bool = False, echo: Callable[[str], None] = print,
                 report_dir: str | Path | None = None) -> PipelineResult:
    """Everything after the last level: the benchmark, gates, registry, release check and
    report. In this process after `run_prune`'s training, or in the tracking process beside
    it (`ticketsmith.sidecar`)."""
    if cfg.experiment.benchmark and cfg.task == "language_model":
        benchmark_lm_levels(cfg, client, tracker, result, echo)
    elif cfg.experiment.benchmark:
        benchmark_levels(cfg, client, tracker, result, echo)
    # The store may hold more of this experiment than the config asks for now.
    verdicts = evaluate_gates(described(load_records(client, tracker.exp_id, result.exp_hash),
                                        cfg), cfg.gate)
    echo("quality gates (mean over replicates):\n" + format_table(verdicts))
    log_gates(client, tracker, verdicts)
    promotion = None
    if cfg.tracking.register_model and verdicts:
        runs = ticket_runs(client, tracker.exp_id, result.exp_hash, result.run_root)
        name = model_name_for(cfg.experiment.name, result.exp_hash)
        promotion = promote(client, name, runs, verdicts,
                            legacy_stages=legacy_stages, echo=echo,
                            allow_factory=cfg.model.factory, prepared=prepared,
                            probe=probe(result.data))
    ok, reason = release_check(verdicts, cfg.gate)
    echo(f"release check: {label(ok)} ({reason})")
    if report_dir is not None:
        from ticketsmith.report.build import build_report

        ref = f"{cfg.experiment.name}/{result.exp_hash}"  # the hash alone may be in several
        echo(f"report: {build_report(client, ref, report_dir)}")
    echo(f"MLflow UI: {ui_link(client.tracking_uri, tracker.exp_id)}")
    return PipelineResult(result, verdicts, promotion, ok, reason)


def import_tracking_modules(uri: str | None) -> None:
    """Import what the first store call, the first run's figures and the first logged ticket
    need: SQLAlchemy's mappers and Alembic for a SQLite store, matplotlib for the figures,
    MLflow's pyfunc flavor and ONNX Runtime for the ticket, the report's modules; and resolve
    the run-context tags MLflow gives every logged model (user, source, git commit: GitPython
    and `git` processes, once per process, cached by MLflow). No torch: this runs on a thread
    while the data loads."""
    import_store_modules(uri)
    import ticketsmith.tracking.figures  # noqa: F401
    import mlflow.pyfunc  # noqa: F401
    from mlflow.tracking.context import registry as run_context

    import ticketsmith.report.build  # noqa: F401

    try:
        import onnxruntime  # noqa: F401
    except ImportError:  # optional: a plan then serves its numpy route
        pass
    run_context.resolve_tags()


def probe(data):
    """The inputs (a tensor) a ticket's serving plan is checked on before it is registered:
    real test inputs."""
    from ticketsmith.serving.plan.check import PROBE_EXAMPLES

    return data.test_x[:PROBE_EXAMPLES].cpu()


def prepare_tickets_ahead(cfg: Config, client: MlflowClient, tracker: MlflowTracker,
                          data) -> dict[str, Prepared]:
    """Log each newly trained candidate ticket (replicate 0) as a pyfunc model as its level
    ends, before the next one trains (plan build and check, model files; `tracker.background`
    keeps a failure until the replicate ends): run id → what `promote` registers. Not when
    the benchmark is on (it writes the measured plan only after the last level), nor for a
    language model (its plan is measured when it is built, and the measurement sets torch's
    process-wide thread count), nor when nothing is registered."""
    prepared: dict[str, Prepared] = {}
    if (not cfg.tracking.register_model or cfg.experiment.benchmark
            or cfg.task == "language_model"):
        return prepared

    def job(run_id: str, checkpoint: Path) -> None:
        prepared[run_id] = prepare_ticket(client, run_id, checkpoint, cfg.model.factory,
                                          probe(data))

    def hook(record: dict, run_id: str) -> None:
        if record["variant"] == "ticket" and record["replicate"] == 0:
            key = (0, record["level"], "ticket")
            tracker.background.submit(job, run_id, tracker.store.checkpoint_path(*key))

    tracker.on_finished.append(hook)
    return prepared


def benchmark_levels(cfg: Config, client: MlflowClient, tracker: MlflowTracker,
                     result: ExperimentResult, echo: Callable[[str], None]) -> None:
    """Serving benchmark of every level's ticket (replicate 0), logged to its child run."""
    from ticketsmith.serving.benchmark import benchmark_experiment
    from ticketsmith.tracking.benchmarks import BENCHMARK_DIR, metric_key

    logged = 0
    for bench in benchmark_experiment(result.run_root, result.records, quick=True,
                                      data=result.data, device=str(result.device),
                                      allow_factory=cfg.model.factory):
        run = tracker.children.get((0, bench["level"], bench["variant"]))
        path = Path(bench["path"])
        if run is None or not path.is_file():
            continue
        run_id = run.info.run_id
        retry(lambda: client.log_artifact(run_id, str(path), BENCHMARK_DIR), "upload benchmark")
        now = int(time.time() * 1000)
        metrics = [Metric(f"speedup_{metric_key(row['format'])}_bs{row['batch_size']}",
                          row["speedup"], now, 0)
                   for row in bench["results"] if row.get("correct") and row.get("speedup")]
        tracker.log_batch(run_id, metrics=metrics)
        # the parent's `speedup/` series (step = level): what ships with the level's ticket
        best = best_speedups(bench["results"], bench.get("serving"))
        tracker.log_batch(tracker.parents[0], metrics=[Metric(k, v, now, bench["level"])
                                                       for k, v in best.items()])
        logged += 1
    echo(f"benchmark: serving results logged for {logged} level(s)")


def benchmark_lm_levels(cfg: Config, client: MlflowClient, tracker: MlflowTracker,
                        result: ExperimentResult, echo: Callable[[str], None]) -> None:
    """Tokens/s and $ per million tokens of every level (replicate 0), side by side with
    dense: the JSON and metrics on the level's child run, the per-level series on the parent."""
    from ticketsmith.serving.lm_levels import benchmark_lm_experiment
    from ticketsmith.tracking.benchmarks import BENCHMARK_DIR, lm_child_metrics
    from ticketsmith.tracking.run_summary import lm_level_series

    s = cfg.serving
    settings = {"batch_sizes": s.batch_sizes, "prompt_tokens": s.prompt_tokens,
                "new_tokens": s.new_tokens, "trials": s.trials, "prefill_reps": 3,
                "usd_per_hour": s.usd_per_hour, "node": s.node}
    try:
        benches = benchmark_lm_experiment(result.run_root, result.records, settings,
                                          threads=s.threads, device=str(result.device),
                                          allow_factory=cfg.model.factory)
    except BenchmarkError as exc:  # e.g. a Hugging Face model: trained and gated all the same
        echo(f"benchmark: skipped: {exc}")
        return
    logged = 0
    for bench in benches:
        run = tracker.children.get((0, bench["level"], bench["variant"]))
        if run is None:
            continue
        run_id, now = run.info.run_id, int(time.time() * 1000)
        retry(lambda: client.log_artifact(run_id, bench["path"], BENCHMARK_DIR),
              "upload benchmark")
        tracker.log_batch(run_id, metrics=[Metric(k, v, now, 0)
                                           for k, v in lm_child_metrics(bench).items()])
        tracker.log_batch(tracker.parents[0], metrics=[
            Metric(k, v, now, bench["level"]) for k, v in lm_level_series(bench).items()])
        logged += 1
    echo(f"benchmark: tokens per second and $ per million tokens logged for {logged} level(s)")
