"""Optuna sweeps: which pruning schedule gives the sparsest ticket that still passes the gate?

A study's trials are TicketSmith experiments with sampled settings (`sweep_config`). Run tree
in MLflow (experiment = study name): sweep run → one run per trial (trial number + sampled
params) → the experiment's replicate runs → level/variant runs. Trials that can no longer win
are stopped early between levels (trial pruning). Workers share the study's storage; a
worker that dies leaves its trial to the heartbeat check, which fails and retries it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from statistics import mean
from typing import Any, Callable, Iterator

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from ticketsmith.base.config import Config, ConfigError
from ticketsmith.gates import champion_level, evaluate_gates
from ticketsmith.engine.lottery import derive_seed
from ticketsmith.base.interrupts import Terminated
from ticketsmith.pipeline import run_prune
from ticketsmith.base.secrets import redact
from ticketsmith.sweep.config import (STORAGE_ENV, StudyLock, SweepConfig, make_sampler,
                                      make_trial_pruner, open_storage)
from ticketsmith.sweep.tracking import (end_run, ensure_sweep_run, run_exists, start_trial_run,
                                        summarize)
from ticketsmith.tracking.tracker import (TAG, MlflowTracker, check_shared_store, prepare_store,
                                         retry)
from ticketsmith.base.errors import SweepError  # noqa: F401 (re-exported)

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def gated_sparsity(records: list[dict[str, Any]], cfg: Config) -> float:
    """Sparsity of the sparsest level passing every gate; 0 when none does."""
    best = champion_level(evaluate_gates(records, cfg.gate))
    return best.sparsity if best else 0.0


class TrialPruningTracker:
    """The engine's Tracker for one trial: forwards every call to the trial's MlflowTracker.

    After each completed level of replicate 0 it reports the gated sparsity so far to Optuna
    (`trial.report(value, step=level)`) and raises `optuna.TrialPruned` when the trial pruner
    says the trial can no longer win — the early stop happens between levels, never inside
    one. Replicate runs are hung under this trial's run, also when reused from a killed try.
    """

    def __init__(self, inner: MlflowTracker, trial: optuna.Trial, cfg: Config, trial_run: str,
                 report: bool):
        self.inner, self.trial, self.cfg, self.trial_run, self.report = inner, trial, cfg, trial_run, report
        self.records: list[dict[str, Any]] = []
        self.stopped_after: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def replicate_started(self, replicate: int) -> None:
        self.inner.replicate_started(replicate)
        run_id = self.inner.parents[replicate]
        retry(lambda: self.inner.client.set_tag(run_id, "mlflow.parentRunId", self.trial_run),
              "nest replicate run")

    def run_finished(self, record: dict[str, Any], run_dir) -> None:
        self.inner.run_finished(record, run_dir)
        self._level_done(record)

    def experiment_failed(self, error: BaseException) -> None:
        # An early stop is deliberate, not a failure: its runs end KILLED, like an interrupt.
        if isinstance(error, optuna.TrialPruned):
            self.inner.close_open_runs("KILLED")
        else:
            self.inner.experiment_failed(error)

    def run_reused(self, record: dict[str, Any], run_dir) -> None:
        self.inner.run_reused(record, run_dir)
        self._level_done(record)

    def _level_done(self, record: dict[str, Any]) -> None:
        level, last = record["level"], self.cfg.experiment.variants[-1]
        if record["replicate"] != 0:
            return
        self.records.append(record)
        if level == 0 or record["variant"] != last:
            return
        value = gated_sparsity(self.records, self.cfg)
        retry(lambda: self.inner.client.log_metric(self.trial_run, "gated_sparsity", value,
                                                   step=level), "log gated sparsity")
        if not self.report:
            return
        self.trial.report(value, step=level)
        if level < self.cfg.prune.levels and self.trial.should_prune():
            self.stopped_after = level
            raise optuna.TrialPruned(f"stopped early after level {level} of "
                                     f"{self.cfg.prune.levels}: gated sparsity {value:.1%}")


class Objective:
    """One trial = one `run_prune` of the sampled experiment, under its own MLflow run."""

    def __init__(self, cfg: SweepConfig, client: MlflowClient, exp_id: str, sweep_run: str,
                 lock: StudyLock, worker: int, echo: Callable[[str], None]):
        self.cfg, self.client, self.exp_id, self.sweep_run = cfg, client, exp_id, sweep_run
        self.lock, self.worker, self.echo, self.last_state = lock, worker, echo, None

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        self.lock.release()  # the trial is claimed (RUNNING): other workers may go on
        self.last_state = TrialState.FAIL
        retry_of = trial.user_attrs.get("trial_number")  # inherited by a heartbeat retry
        params = self.cfg.sample(trial)
        cfg = self.cfg.experiment_config(params)
        run_id = start_trial_run(self.client, self.exp_id, self.sweep_run, self.cfg, trial.number,
                                 params, exp_hash=cfg.hash(), worker=self.worker, retry_of=retry_of)
        for key, value in {"trial_number": trial.number, "mlflow_run_id": run_id,
                           "hash": cfg.hash(), "worker": self.worker}.items():
            trial.set_user_attr(key, value)
        self.echo(f"trial {trial.number}: {params} → experiment {cfg.hash()}")
        tracker = MlflowTracker(self.client, parent_run_id=run_id, echo=self.echo)
        engine = TrialPruningTracker(tracker, trial, cfg, run_id,
                                     report=self.cfg.study.objective != "pareto")
        try:
            out = run_prune(cfg, client=self.client, tracker=tracker, engine_tracker=engine,
                            progress=False, echo=self.echo)
            values, attrs = self._score(cfg, out, tracker)
        except optuna.TrialPruned:
            for rid in tracker.parents.values():  # the stopped replicate, left RUNNING
                if retry(lambda: self.client.get_run(rid), "read run").info.status == "RUNNING":
                    end_run(self.client, rid, "PRUNED", "KILLED")
            end_run(self.client, run_id, "PRUNED", "KILLED",
                    **{TAG + "sweep.stopped_after_level": str(engine.stopped_after)})
            self.last_state = TrialState.PRUNED
            raise
        except BaseException as exc:  # an error, Ctrl-C or SIGTERM: Optuna marks the trial FAIL
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            end_run(self.client, run_id, "FAIL", status, **{TAG + "sweep.error": repr(exc)})
            raise
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        for key, value in attrs.items():
            retry(lambda: self.client.log_metric(run_id, key, float(value)), "log metric")
        end_run(self.client, run_id, "COMPLETE", "FINISHED")
        self.last_state = TrialState.COMPLETE
        return values[0] if len(values) == 1 else values

    def _score(self, cfg: Config, out, tracker: MlflowTracker) -> tuple[list[float], dict[str, Any]]:
        """Objective values, measured at the champion level (the dense model if none passes)."""
        best = champion_level(out.verdicts)
        dense = [r["test_accuracy"] for r in out.experiment.records if r["level"] == 0]
        attrs: dict[str, Any] = {
            "champion_level": best.level if best else 0,
            "accuracy": best.ticket_accuracy if best else 100 * mean(dense),
            "sparsity": best.sparsity if best else 0.0}
        attrs["density"] = 1 - attrs["sparsity"]
        study = self.cfg.study
        if study.objective == "highest_gated_sparsity":
            return [attrs["sparsity"]], attrs
        if "speedup" in study.objectives:
            attrs["speedup"] = self._speedup(tracker, best.level) if best else 1.0
        return [attrs[o] for o in study.objectives], attrs

    def _speedup(self, tracker: MlflowTracker, level: int) -> float:
        run = tracker.children[(0, level, "ticket")]
        metrics = retry(lambda: self.client.get_run(run.info.run_id), "read run").data.metrics
        wanted = self.cfg.study.speedup_metric
        found = [v for k, v in metrics.items() if (k == wanted if wanted else k.startswith("speedup_"))]
        if not found:
            raise SweepError(f"level {level}: no benchmark metric {wanted or 'speedup_*'} logged")
        return max(found)


def open_study(cfg: SweepConfig, storage_url: str, client: MlflowClient | None, *,
               worker: int = 0, on_stale=None) -> tuple[optuna.Study, str, str, StudyLock]:
    """Create or load the study and its MLflow sweep run (exactly once, under the lock).

    Returns (study with this worker's sampler, MLflow experiment id, sweep run id, lock).
    """
    storage = open_storage(storage_url, cfg.study, on_stale)  # a bad URL fails before MLflow
    prepare_store(client.tracking_uri if client is not None else None)
    client = client or MlflowClient()
    check_shared_store(client.tracking_uri)
    lock = StudyLock(storage_url, cfg.study.name)
    with lock:
        study = optuna.create_study(storage=storage, study_name=cfg.study.name, load_if_exists=True,
                                    directions=cfg.study.directions)
        have = [d.name.lower() for d in study.directions]
        if have != cfg.study.directions:
            raise ConfigError(f"study.name: study {cfg.study.name!r} exists with directions "
                              f"{have}, not {cfg.study.directions}; choose another name")
        exp_id, run_id = ensure_sweep_run(client, study, cfg, storage_url)
    seed = derive_seed(cfg.study.seed, worker, len(study.trials)) % 2**32  # numpy seeds are 32-bit
    study = optuna.load_study(study_name=cfg.study.name, storage=storage,
                              sampler=make_sampler(cfg, seed), pruner=make_trial_pruner(cfg))
    return study, exp_id, run_id, lock


def pending(study: optuna.Study, n_trials: int) -> tuple[bool, bool]:
    """(a trial should be started, some other trial is still running).

    The budget counts COMPLETE, PRUNED, RUNNING and WAITING trials: failed ones are replaced,
    and a dead worker's trial counts until the heartbeat check fails it and queues its retry.
    """
    states = [t.state for t in study.get_trials(deepcopy=False)]
    counted = sum(s in COUNTED for s in states)
    return counted < n_trials or TrialState.WAITING in states, TrialState.RUNNING in states


def stale_trial_handler(cfg: SweepConfig, client: MlflowClient):
    """Heartbeat-stale trial: its MLflow run is marked FAILED, then Optuna queues a retry."""
    with _experimental_ok():
        requeue = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=cfg.study.max_retry)

    def on_stale(study: optuna.Study, trial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and run_exists(client, run_id):
            end_run(client, run_id, "FAIL", "FAILED",
                    **{TAG + "sweep.error": "no heartbeat: the worker died; the trial is retried"})
        requeue(study, trial)
    return on_stale


@contextmanager
def _experimental_ok() -> Iterator[None]:
    """Heartbeats and their retry callback are "experimental" in Optuna; we rely on them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def run_worker(cfg: SweepConfig, *, storage_url: str, client: MlflowClient, worker: int = 0,
               echo: Callable[[str], None] = print) -> int:
    """Run trials until the study holds `n_trials`; returns how many this worker ran."""
    study, exp_id, sweep_run, lock = open_study(
        cfg, storage_url, client, worker=worker, on_stale=stale_trial_handler(cfg, client))
    objective = Objective(cfg, client, exp_id, sweep_run, lock, worker, echo)
    if pending(study, cfg.study.n_trials)[0]:  # a continued study: its sweep run runs again
        retry(lambda: client.update_run(sweep_run, status="RUNNING"), "reopen sweep run")
    ran = failures = 0
    waiting = False
    while True:
        lock.acquire()
        try:
            with _experimental_ok():
                optuna.storages.fail_stale_trials(study)
            start, running = pending(study, cfg.study.n_trials)
            if start:
                study.optimize(objective, n_trials=1, catch=(Exception,))
                ran += 1
                failures = failures + 1 if objective.last_state == TrialState.FAIL else 0
                if failures >= cfg.study.max_failures:
                    raise SweepError(f"{failures} trials in a row failed; see the trial runs' "
                                     f"`{TAG}sweep.error` tags")
                continue
        finally:
            lock.release()
        if not running:
            return ran
        # Another worker's trial is running: wait until it ends, or until its heartbeat goes
        # stale and it comes back as a retry that this worker then runs.
        if not waiting:
            echo(f"waiting for running trials of other workers (a dead worker's trial is "
                 f"retried after {cfg.study.grace_period} s without a heartbeat)")
        waiting = True
        time.sleep(cfg.study.heartbeat_interval)


def run_sweep(cfg: SweepConfig, *, storage_url: str, workers: int = 1, worker: int | None = None,
              create_only: bool = False, config_path: str = "", overrides: str = "",
              client: MlflowClient | None = None, echo: Callable[[str], None] = print) -> int:
    """`ticketsmith sweep`: create or continue the study, run the trials, log the summary.

    worker None: this process coordinates `workers` local workers (itself when 1) and prints
    the summary. worker i: it is one of many workers (a cluster pod): it runs trials, then
    rewrites the summary on the sweep run. Returns the exit code (1: no completed trial).
    """
    study, _, sweep_run, _ = open_study(cfg, storage_url, client)
    client = client or MlflowClient()
    echo(f"study {cfg.study.name} in {redact(storage_url)}: {len(study.trials)} trial(s) so far, "
         f"target {cfg.study.n_trials}; MLflow sweep run {sweep_run}")
    if create_only:
        return 0
    if worker is not None or workers == 1:
        run_worker(cfg, storage_url=storage_url, client=client, worker=worker or 0, echo=echo)
    else:
        base = [sys.executable, "-m", "ticketsmith", "sweep", "--config", config_path,
                "--n-trials", str(cfg.study.n_trials), "--study-name", cfg.study.name,
                "--overrides", overrides]
        env = {**os.environ, STORAGE_ENV: storage_url}  # not on a command line: may hold a password
        procs = [subprocess.Popen([*base, "--worker", str(i)], env=env) for i in range(workers)]
        try:
            codes = [p.wait() for p in procs]
        except KeyboardInterrupt as stop:  # Ctrl-C reaches the group; a pod's SIGTERM only us
            for p in procs:
                p.send_signal(signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
            for p in procs:
                p.wait()
            raise
        if any(codes):
            echo(f"warning: worker exit codes {codes}")
    ok, text = summarize(study, cfg, client, sweep_run)
    echo(text if worker is None else text.splitlines()[0].lstrip("# ") + " (summary logged)")
    return 0 if ok or worker is not None else 1

