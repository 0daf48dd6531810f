"""The MLflow side of a sweep: the sweep run, one run per trial, and the summary.

Run tree (MLflow experiment = study name): sweep run (`ticketsmith.role=sweep`) → trial runs
(`role=trial`, trial number and sampled params) → the trial experiment's replicate runs →
level/variant runs. Tag `ticketsmith.sweep.state` mirrors the Optuna trial state; MLflow
status: COMPLETE → FINISHED, PRUNED (stopped early) → KILLED, FAIL → FAILED.

Summary artifacts on the sweep run: `sweep/best_trials.md` (the best trials of a
single-objective study, or the Pareto front of a multi-objective one), `sweep/trials.csv`
(every trial), `sweep/pareto.png` (accuracy against density or speedup, front highlighted)
and, single-objective, `sweep/best_config.yaml` (rerun it with `ticketsmith prune` to
register the ticket). Idempotent: every worker that finishes rewrites them. Its charts:
`objective/<name>` and `trial/accuracy|density` over the trial number (step).
"""
from __future__ import annotations

import csv
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import yaml  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from ticketsmith.base.config import dump_config  # noqa: E402
from ticketsmith.base.secrets import redact  # noqa: E402
from ticketsmith.tracking.tracker import TAG, experiment_id, retry  # noqa: E402

STATE_TAG = TAG + "sweep.state"

TOP = 5  # rows of a single-objective study's best-trials table


def run_exists(client: MlflowClient, run_id: str) -> bool:
    try:
        client.get_run(run_id)
        return True
    except MlflowException:  # e.g. another tracking store than the study was created with
        return False


def ensure_sweep_run(client: MlflowClient, study: optuna.Study, cfg,
                     storage_url: str) -> tuple[str, str]:
    """(experiment id, sweep run id): the run named in the study, or a new one recorded there.

    Call under the study lock, so concurrent workers create one sweep run between them.
    """
    exp_id = experiment_id(client, cfg.study.name)
    run_id = study.user_attrs.get("mlflow_run_id")
    if run_id is not None and run_exists(client, run_id):
        return exp_id, run_id
    run = retry(lambda: client.create_run(exp_id, run_name=f"{cfg.study.name}-sweep", tags={
        TAG + "role": "sweep", TAG + "sweep.study": cfg.study.name,
        TAG + "sweep.storage": redact(storage_url), STATE_TAG: "RUNNING"}), "create sweep run")
    run_id = run.info.run_id
    study.set_user_attr("mlflow_run_id", run_id)
    params = {"objective": cfg.study.objective, "sampler": cfg.study.sampler,
              "directions": ",".join(cfg.study.directions), "base": cfg.base,
              **{f"search_space.{k}": v.model_dump_json() for k, v in cfg.search_space.items()}}
    for key, value in params.items():
        retry(lambda: client.log_param(run_id, key, value), "log param")
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    retry(lambda: client.log_text(run_id, redact(text), "sweep/sweep.yaml"), "upload sweep config")
    return exp_id, run_id


def start_trial_run(client: MlflowClient, exp_id: str, sweep_run: str, cfg, number: int,
                    params: dict[str, Any], *, exp_hash: str, worker: int,
                    retry_of: int | None) -> str:
    """A RUNNING trial run under the sweep run, with the trial number and sampled params."""
    tags = {"mlflow.parentRunId": sweep_run, TAG + "role": "trial", TAG + "hash": exp_hash,
            TAG + "sweep.study": cfg.study.name, TAG + "sweep.trial_number": str(number),
            TAG + "sweep.worker": str(worker), STATE_TAG: "RUNNING"}
    if retry_of is not None:
        tags[TAG + "sweep.retry_of"] = str(retry_of)
    run = retry(lambda: client.create_run(exp_id, tags=tags, run_name=f"{cfg.study.name}-t{number}"),
                "create trial run")
    for key, value in {"trial_number": number, **params}.items():
        retry(lambda: client.log_param(run.info.run_id, key, value), "log param")
    return run.info.run_id


def end_run(client: MlflowClient, run_id: str, state: str, status: str, **tags: str) -> None:
    """Tag the sweep state (and e.g. an error), then end the run with an MLflow status."""
    for key, value in {STATE_TAG: state, **tags}.items():
        retry(lambda: client.set_tag(run_id, key, redact(value)[:5000]), "tag run")
    retry(lambda: client.set_terminated(run_id, status), "end run")


def best_trials(study: optuna.Study, pareto: bool) -> list[FrozenTrial]:
    """The Pareto front (multi-objective) or the TOP completed trials by value."""
    if pareto:
        return sorted(study.best_trials, key=lambda t: t.number)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(done, key=lambda t: (-t.value, t.number))[:TOP]


def front(points: list[tuple[float, float, Any]], x_minimise: bool) -> list[tuple[float, float, Any]]:
    """Points not dominated in (x, accuracy), accuracy maximised; sorted by x."""
    sign = 1 if x_minimise else -1
    out = [p for p in points if not any(
        sign * q[0] <= sign * p[0] and q[1] >= p[1] and (q[0], q[1]) != (p[0], p[1]) for q in points)]
    return sorted(out, key=lambda p: p[0])


def table(trials: list[FrozenTrial], params: list[str], speedup: bool) -> str:
    head = ["trial", "champion level", "accuracy %", "sparsity %", "density %"]
    head += ["speedup ×"] if speedup else []
    head += [*params, "experiment", "MLflow run"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        a = t.user_attrs
        cells = [str(t.number), str(a.get("champion_level", "")), f"{a.get('accuracy', 0):.2f}",
                 f"{100 * a.get('sparsity', 0):.2f}", f"{100 * a.get('density', 1):.2f}"]
        cells += [f"{a.get('speedup', 1):.2f}"] if speedup else []
        cells += [_fmt(t.params.get(p)) for p in params]
        cells += [str(a.get("hash", "")), str(a.get("mlflow_run_id", ""))]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trials_csv(trials: list[FrozenTrial], params: list[str]) -> str:
    attrs = ["champion_level", "accuracy", "sparsity", "density", "speedup", "hash", "mlflow_run_id"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["number", "state", "values", *params, *attrs, "retry_of"])
    for t in trials:
        writer.writerow([t.number, t.state.name, t.values or "", *[t.params.get(p, "") for p in params],
                         *[t.user_attrs.get(a, "") for a in attrs], t.system_attrs.get("failed_trial", "")])
    return buf.getvalue()


def figure(trials: list[FrozenTrial], pareto_numbers: set[int], x_key: str, title: str,
           path: Path) -> Path:
    """Accuracy of each completed trial's champion against its density (or speedup)."""
    pts = [(t.user_attrs[x_key], t.user_attrs["accuracy"], t.number) for t in trials
           if t.state == TrialState.COMPLETE and x_key in t.user_attrs]
    on_front = [p for p in pts if p[2] in pareto_numbers] or front(pts, x_key == "density")
    scale = 100 if x_key == "density" else 1
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    ax.scatter([scale * p[0] for p in pts], [p[1] for p in pts], color="tab:blue", alpha=0.6,
               label="completed trial (champion level)")
    line = sorted(on_front, key=lambda p: p[0])
    ax.plot([scale * p[0] for p in line], [p[1] for p in line], "o-", color="tab:red",
            drawstyle="steps-post" if x_key == "density" else "steps-pre", label="Pareto front")
    for x, y, n in pts:
        ax.annotate(f"t{n}", (scale * x, y), textcoords="offset points", xytext=(4, 3), fontsize=8)
    ax.set_xlabel("weights kept at the champion level (density, %)" if x_key == "density"
                  else "measured serving speedup vs dense (×)")
    ax.set_ylabel("test accuracy at the champion level (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def objective_names(cfg) -> list[str]:
    """One name per objective value, in Optuna's order."""
    return list(cfg.study.objectives) if cfg.study.objective == "pareto" else [cfg.study.objective]


def log_trial_series(client: MlflowClient, sweep_run: str, trials: list[FrozenTrial],
                     names: list[str]) -> None:
    """The sweep run's charts: each completed trial's objective values (`objective/<name>`)
    and its champion's accuracy and density (`trial/...`), step = trial number. Every worker
    calls this; a trial already on the chart is not logged again."""
    first = f"objective/{names[0]}"
    logged = {m.step for m in retry(lambda: client.get_metric_history(sweep_run, first),
                                    "read metric history")}
    now = int(time.time() * 1000)
    metrics = []
    for t in trials:
        if t.state != TrialState.COMPLETE or t.number in logged or not t.values:
            continue
        values = {f"objective/{n}": v for n, v in zip(names, t.values)}
        values.update({f"trial/{k}": t.user_attrs[k] for k in ("accuracy", "density")
                       if isinstance(t.user_attrs.get(k), (int, float))})
        metrics += [Metric(k, float(v), now, t.number) for k, v in values.items()]
    for i in range(0, len(metrics), 500):
        chunk = metrics[i:i + 500]
        retry(lambda: client.log_batch(sweep_run, metrics=chunk), "log trial values")


def summarize(study: optuna.Study, cfg, client: MlflowClient, sweep_run: str) -> tuple[bool, str]:
    """Log the summary to the sweep run: (a trial completed, the best-trials table as text)."""
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    pareto = cfg.study.objective == "pareto"
    speedup = pareto and "speedup" in cfg.study.objectives
    params = list(cfg.search_space)
    best = best_trials(study, pareto) if count[TrialState.COMPLETE] else []
    what = "Pareto front" if pareto else f"best {len(best)} trial(s) by gated sparsity"
    title = (f"{cfg.study.name}: {count[TrialState.COMPLETE]} complete, "
             f"{count[TrialState.PRUNED]} stopped early (trial pruning), "
             f"{count[TrialState.FAIL]} failed")
    text = f"# {title}\n\n{what}:\n\n{table(best, params, speedup)}"
    retry(lambda: client.log_text(sweep_run, text, "sweep/best_trials.md"), "upload best trials")
    retry(lambda: client.log_text(sweep_run, trials_csv(trials, params), "sweep/trials.csv"),
        "upload trials")
    with tempfile.TemporaryDirectory() as tmp:
        png = figure(trials, {t.number for t in best} if pareto else set(),
                     "speedup" if speedup else "density", title, Path(tmp) / "pareto.png")
        retry(lambda: client.log_artifact(sweep_run, str(png), "sweep"), "upload figure")
    log_trial_series(client, sweep_run, trials, objective_names(cfg))
    names = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "stopped_early",
             TrialState.FAIL: "failed"}
    for state, name in names.items():
        retry(lambda: client.log_metric(sweep_run, f"trials_{name}", count[state]), "log metric")
    if best and not pareto:
        retry(lambda: client.log_metric(sweep_run, "best_gated_sparsity", best[0].value), "log metric")
        retry(lambda: client.log_text(sweep_run, dump_config(cfg.experiment_config(best[0].params)),
                                    "sweep/best_config.yaml"), "upload best config")
    finished = count[TrialState.RUNNING] == count[TrialState.WAITING] == 0 and \
        count[TrialState.COMPLETE] + count[TrialState.PRUNED] >= cfg.study.n_trials
    if finished:
        retry(lambda: client.set_tag(sweep_run, STATE_TAG, "COMPLETE"), "tag sweep run")
        retry(lambda: client.set_terminated(sweep_run, "FINISHED"), "end sweep run")
    return bool(best), text
