"""MLflow as the system of record: the engine's Tracker implemented on an MLflow store.

Run tree: one parent run per experiment replicate, one nested child per (level, variant).
Every run carries the tags `ticketsmith.hash/replicate/level/variant` (+ `ticketsmith.role`),
so a rerun finds its runs again instead of duplicating them, and a fresh machine recovers
finished levels from the artifact store.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from ticketsmith.base.config import Config, ConfigError
from ticketsmith.base.interrupts import interrupts_deferred, raise_if_interrupted
from ticketsmith.base.environment import environment as base_environment, git_commit
from ticketsmith.engine.store import RunStore
from ticketsmith.engine.events import TrackingError, UnknownExperiment
from ticketsmith.tracking.background import Background
from ticketsmith.tracking.run_summary import (EXPERIMENT_KIND_TAG, NOTE_TAG, TRAINING_KIND, experiment_description,
                                              level_metrics, quality_key, replicate_description)
from ticketsmith.base.secrets import redact
from ticketsmith.tracking.sqlite_store import prepare_store  # noqa: F401 (its callers' import)

TAG = "ticketsmith."
PROGRESS_DIR = "progress"  # artifact folder of a child run's progress checkpoint
CHILD_METRICS = ("test_accuracy", "test_loss", "best_val_accuracy", "early_stop_iteration",
                 "sparsity", "density", "nonzero_params", "total_params", "wall_time_s",
                 # language models (test_accuracy is then next-token accuracy)
                 "test_bpb", "val_bpb", "best_val_bpb", "test_perplexity", "val_loss")


def retry(fn: Callable[[], Any], what: str, attempts: int = 6, base_delay_s: float = 1.0,
          sleep: Callable[[float], None] = time.sleep) -> Any:
    """Call fn, retrying transient failures with exponential backoff, then fail loudly.

    A metric is never silently dropped: the last failure becomes a TrackingError. The
    defaults ride out about half a minute of outage (1+2+4+8+16 s between attempts).
    """
    for attempt in range(attempts):
        try:
            with interrupts_deferred():  # Ctrl-C acts between store calls, never inside one
                return fn()
        except (MlflowException, OSError, ConnectionError) as exc:
            code = getattr(exc, "error_code", "")
            permanent = code in ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS",
                                 "RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED")
            if permanent or attempt == attempts - 1:
                raise TrackingError(f"{what} failed after {attempt + 1} attempt(s): "
                                    f"{redact(str(exc)).splitlines()[0]}") from exc
            raise_if_interrupted()  # an interrupt during the call skips the back-off
            sleep(base_delay_s * 2 ** attempt)
    raise AssertionError("unreachable")


def environment(device: str = "cpu") -> dict[str, str]:
    """`ticketsmith.base.environment.environment` as logged with every experiment: strings, plus
    MLflow's version and the git commit."""
    env = base_environment(device)
    return {"ticketsmith": env["ticketsmith"], "torch": env["torch"], "mlflow": mlflow.__version__,
            "python": env["python"], "platform": env["platform"], "cpu": env["cpu"],
            "gpu": env["gpu"] or "none", "device": "cuda" if env["gpu"] else "cpu",
            "threads": str(env["threads"]), "git_commit": git_commit()}


def warn_without_gpu_metrics(data: Any, echo: Callable[[str], None]) -> None:
    """MLflow's GPU metrics need `pynvml` (the `cloud` extra); without it they are missing and
    MLflow says so only at debug level."""
    on_gpu = data is not None and data.train_x.device.type == "cuda"
    if on_gpu and importlib.util.find_spec("pynvml") is None:
        echo("warning: tracking.system_metrics: no GPU metrics, pynvml is not installed "
             "(pip install 'ticketsmith[cloud]' or nvidia-ml-py)")


def check_shared_store(uri: str) -> None:
    """Inside a Kubernetes pod, a local store dies with the pod: refuse it up front."""
    local = uri.split(":", 1)[0] in ("sqlite", "file") or "://" not in uri
    if os.environ.get("KUBERNETES_SERVICE_HOST") and local and \
            not os.environ.get("TICKETSMITH_ALLOW_LOCAL_TRACKING"):
        raise ConfigError(f"MLFLOW_TRACKING_URI: {redact(uri)!r} is local to this pod and is lost "
                          "with it; point it at the shared tracking server (see docs/kubernetes.md)"
                          " or set TICKETSMITH_ALLOW_LOCAL_TRACKING=1")


def experiment_id(client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    """The id of MLflow experiment `name`: found, restored if deleted, or created with
    `artifact_location` (default: $TICKETSMITH_ARTIFACT_LOCATION, else MLflow's default)."""
    exp = retry(lambda: client.get_experiment_by_name(name), "get experiment")
    if exp is None:
        location = artifact_location or os.environ.get("TICKETSMITH_ARTIFACT_LOCATION")
        return retry(lambda: client.create_experiment(name, artifact_location=location),
                     "create experiment")
    if exp.lifecycle_stage == "deleted":
        retry(lambda: client.restore_experiment(exp.experiment_id), "restore experiment")
    return exp.experiment_id


def _key(tags: dict[str, str]) -> tuple[int, int, str]:
    return int(tags[TAG + "replicate"]), int(tags[TAG + "level"]), tags[TAG + "variant"]


class MlflowTracker:
    """Engine Tracker writing to MLflow. Pass the client explicitly; no global state."""

    def __init__(self, client: MlflowClient | None = None, *, artifact_location: str | None = None,
                 parent_run_id: str | None = None, echo: Callable[[str], None] = print):
        """parent_run_id: hang the replicate runs under this run (a sweep trial, or the run
        `mlflow run` created, whose id MLflow passes in MLFLOW_RUN_ID)."""
        self.client = client or MlflowClient()
        self.parent_run_id = parent_run_id or os.environ.get("MLFLOW_RUN_ID")
        self.artifact_location = artifact_location or os.environ.get("TICKETSMITH_ARTIFACT_LOCATION")
        self.echo = echo
        self.parents: dict[int, str] = {}
        self.children: dict[tuple[int, int, str], Any] = {}
        self.current: str | None = None
        self._replicate: int | None = None
        self._monitor = None
        self._progress_uploaded = False
        # A level's ticket logging (plan build and check, model files), and what to hand it
        # when a level's run has finished: hook(record, run_id). Run in this thread, before
        # the next level trains: on a thread beside training it built torch modules from the
        # process-wide random generator and torch's one thread pool while the next level drew
        # from them, so a level's weights depended on timing (a test suite's gates flipped).
        self.background = Background(threaded=False)
        self.on_finished: list[Callable[[dict[str, Any], str], None]] = []

    # --- lookup ---------------------------------------------------------------------------
    def _runs(self, role: str) -> list[Any]:
        flt = f"tags.`{TAG}hash` = '{self.hash}' and tags.`{TAG}role` = '{role}'"
        return retry(lambda: self.client.search_runs([self.exp_id], flt, max_results=5000),
                     "search runs")

    # --- Tracker protocol -----------------------------------------------------------------
    def experiment_started(self, cfg: Config, exp_hash: str, run_root: Path, data: Any) -> None:
        check_shared_store(self.client.tracking_uri)
        self.cfg, self.hash, self.run_root, self.data = cfg, exp_hash, Path(run_root), data
        self.store = RunStore(self.run_root)
        self.exp_id = experiment_id(self.client, cfg.experiment.name, self.artifact_location)
        self._describe_experiment(cfg)
        self.parents = {int(r.data.tags[TAG + "replicate"]): r.info.run_id for r in self._runs("parent")}
        self.children = {_key(r.data.tags): r for r in self._runs("child")}
        self.echo(f"tracking: {redact(self.client.tracking_uri)} experiment "
                  f"'{cfg.experiment.name}' (id {self.exp_id})")
        self._recover()

    def replicate_started(self, replicate: int) -> None:
        self._replicate = replicate
        tags = {TAG + "hash": self.hash, TAG + "replicate": str(replicate), TAG + "role": "parent",
                TAG + "level": "all", TAG + "variant": "all"}
        if replicate in self.parents:
            run_id = self.parents[replicate]
            retry(lambda: self.client.update_run(run_id, status="RUNNING"), "reopen parent run")
        else:
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            tags[NOTE_TAG] = replicate_description(self.cfg.experiment.name, self.hash, replicate)
            name = redact(f"{self.cfg.experiment.name}-{self.hash}-r{replicate}")
            with interrupts_deferred():  # the new run is remembered before Ctrl-C can act
                run = retry(lambda: self.client.create_run(self.exp_id, tags=tags, run_name=name),
                            "create parent run")
                run_id = self.parents[replicate] = run.info.run_id
            env = environment(str(self.data.train_x.device) if self.data is not None else "cpu")
            params = self._params({"replicate": replicate})
            env_tags = [RunTag(TAG + f"env.{k}", redact(v)) for k, v in env.items()]
            self.log_batch(run_id, params=params, tags=env_tags)
            self._log_text(run_id, json.dumps(env, indent=2), "environment.json")
        # Every start (resumes too): the config last run describes the experiment, and
        # `ticketsmith gate` and the report select the records it describes.
        self._log_text(run_id, self.store.config_path.read_text(), "config.yaml")
        if self.cfg.tracking.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            warn_without_gpu_metrics(self.data, self.echo)

            self._monitor = SystemMetricsMonitor(run_id, sampling_interval=5,
                                                 tracking_uri=self.client.tracking_uri)
            self._monitor.start()

    def run_started(self, replicate: int, level: int, variant: str) -> None:
        old = self.children.pop((replicate, level, variant), None)
        if old is not None:  # an interrupted attempt: keep one live run per (level, variant)
            retry(lambda: self.client.delete_run(old.info.run_id), "delete unfinished run")
        with interrupts_deferred():  # the new run is remembered before Ctrl-C can act
            self.current = self._create_child(replicate, level, variant)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not math.isnan(v)]
        self.log_batch(self.current, metrics=batch)

    def fetch_progress(self, replicate: int, level: int, variant: str, dest: Path) -> None:
        """The progress checkpoint of the level's unfinished run (e.g. a pod preempted on
        another node), if it uploaded one, into `dest`."""
        old = self.children.get((replicate, level, variant))
        if old is None or old.info.status == "FINISHED":
            return
        listed = retry(lambda: self.client.list_artifacts(old.info.run_id, PROGRESS_DIR),
                       "list progress checkpoint")
        if not listed:
            return
        with tempfile.TemporaryDirectory() as tmp:
            self._download(old.info.run_id, PROGRESS_DIR, Path(tmp), required=False)
            found = Path(tmp) / Path(dest).name
            if found.is_file():
                Path(dest).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(found, Path(tmp) / "whole")
                os.replace(Path(tmp) / "whole", dest)
                self.echo(f"tracking: fetched the progress checkpoint of run {old.info.run_id}")

    def progress_saved(self, path: Path) -> None:
        run_id = self.current
        retry(lambda: self.client.log_artifact(run_id, str(path), PROGRESS_DIR),
              "upload progress checkpoint")
        self._progress_uploaded = True

    def run_finished(self, record: dict[str, Any], run_dir: Path) -> None:
        run_id = self.current
        self._finish(run_id, record, Path(run_dir))
        self._drop_progress(run_id)
        self.current = None
        for hook in self.on_finished:
            hook(record, run_id)

    def _drop_progress(self, run_id: str) -> None:
        """The finished level's progress checkpoint is of no more use: delete the uploaded
        copy (best effort: a store that cannot delete keeps one stale file)."""
        if not self._progress_uploaded:
            return
        self._progress_uploaded = False
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        try:
            uri = retry(lambda: self.client.get_run(run_id), "read run").info.artifact_uri
            with interrupts_deferred():
                get_artifact_repository(uri).delete_artifacts(PROGRESS_DIR)
        except (TrackingError, MlflowException, OSError, NotImplementedError):
            pass

    def run_reused(self, record: dict[str, Any], run_dir: Path) -> None:
        key = (record["replicate"], record["level"], record["variant"])
        found = self.children.get(key)
        if found is not None and found.info.status == "FINISHED":
            return
        # Finished locally but not in this store (e.g. first run untracked): backfill it.
        if found is not None:
            retry(lambda: self.client.delete_run(found.info.run_id), "delete unfinished run")
        with interrupts_deferred():  # the new run is remembered before Ctrl-C can act
            run_id = self.current = self._create_child(*key)
        now = int(time.time() * 1000)
        curve = json.loads(self.store.curve_path(*key).read_text())
        self.log_batch(run_id, metrics=[  # the step-wise curve, batched
            Metric(k, float(v), now, int(row["iteration"])) for row in curve for k, v in row.items()
            if k != "iteration" and isinstance(v, (int, float)) and not math.isnan(v)])
        self._finish(run_id, record, Path(run_dir))
        self.current = None  # closed: an interrupt from here on must not mark it KILLED

    def replicate_finished(self, replicate: int, records: list[dict[str, Any]]) -> None:
        run_id = self.parents[replicate]
        self.background.wait()  # its failure ends the replicate FAILED (experiment_failed)
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        retry(lambda: self.client.set_terminated(run_id, "FINISHED"), "finish parent run")

    def experiment_finished(self, records: list[dict[str, Any]]) -> None:
        pass

    def experiment_failed(self, error: BaseException) -> None:
        """Close the runs left open: KILLED for an interrupt, FAILED for an error.

        Best effort: if the store itself is down, the original error is what the user sees.
        """
        self.close_open_runs("FAILED" if isinstance(error, Exception) else "KILLED")

    def close_open_runs(self, status: str) -> None:
        """Terminate the current child and replicate runs with `status` (best effort)."""
        self.background.abandon()
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        open_runs = [self.current] + [self.parents.get(self._replicate)]
        for run_id in filter(None, open_runs):
            try:
                self.client.set_terminated(run_id, status)
            except Exception:  # noqa: BLE001 - never mask the error being reported
                pass
        self.current = None

    # --- helpers --------------------------------------------------------------------------
    def _params(self, extra: dict[str, Any]) -> list[Param]:
        flat = {**self.cfg.flat(), **extra}
        return [Param(k, redact(json.dumps(v) if not isinstance(v, str) else v)[:6000])
                for k, v in flat.items()]

    def _create_child(self, replicate: int, level: int, variant: str) -> str:
        tags = {TAG + "hash": self.hash, TAG + "replicate": str(replicate), TAG + "level": str(level),
                TAG + "variant": variant, TAG + "role": "child",
                "mlflow.parentRunId": self.parents[replicate]}
        run = retry(lambda: self.client.create_run(
            self.exp_id, tags=tags, run_name=f"r{replicate}-L{level}-{variant}"), "create child run")
        self.log_batch(run.info.run_id, params=self._params(
            {"variant": variant, "level": level, "replicate": replicate}))
        return run.info.run_id

    def _finish(self, run_id: str, record: dict[str, Any], run_dir: Path) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(record[k]), now, 0) for k in CHILD_METRICS
                   if isinstance(record.get(k), (int, float)) and not math.isnan(record[k])]
        # The replicate's seeds, exact (a float metric would round a 63-bit seed).
        seeds = [RunTag(TAG + k, str(record[k])) for k in ("seed", "data_seed") if k in record]
        self.log_batch(run_id, metrics=metrics, tags=seeds)
        if record["level"] == 0:
            self._upload_start_weights(record["replicate"])
        self._figures(run_id, record, run_dir)
        retry(lambda: self.client.log_artifacts(run_id, str(run_dir), "run"), "upload run artifacts")
        retry(lambda: self.client.set_terminated(run_id, "FINISHED"), "finish child run")
        self.children[(record["replicate"], record["level"], record["variant"])] = \
            retry(lambda: self.client.get_run(run_id), "read run")
        self._log_parent_series(record)

    # --- what the UI shows first (see run_summary) ----------------------------------------
    def _describe_experiment(self, cfg: Config) -> None:
        """Training experiment kind always; the description only where none is set yet."""
        exp = retry(lambda: self.client.get_experiment(self.exp_id), "get experiment")
        tags = {EXPERIMENT_KIND_TAG: TRAINING_KIND}
        if not exp.tags.get(NOTE_TAG):
            tags[NOTE_TAG] = experiment_description(cfg)
        for k, v in tags.items():
            if exp.tags.get(k) != v:
                retry(lambda: self.client.set_experiment_tag(self.exp_id, k, redact(v)),
                      "tag experiment")

    def _log_parent_series(self, record: dict[str, Any]) -> None:
        """This child's point of the parent's per-level series (step = level)."""
        rep, level = record["replicate"], record["level"]
        key = quality_key(record)
        accuracy = {(lv, v): run.data.metrics.get(key)
                    for (r, lv, v), run in self.children.items() if r == rep and lv in (0, level)}
        peers = {v: a for (lv, v), a in accuracy.items() if lv == level and a is not None}
        metrics = level_metrics(record, accuracy.get((0, "dense")), peers)
        now = int(time.time() * 1000)
        self.log_batch(self.parents[rep], metrics=[Metric(k, v, now, level)
                                                   for k, v in metrics.items()])

    def _upload_start_weights(self, replicate: int) -> None:
        """Initial and rewind weights go up with level 0: every later level rewinds to them,
        so a fresh machine resuming mid-experiment needs them from the store."""
        run_id = self.parents[replicate]
        for path in (self.store.init_path(replicate), self.store.rewind_path(replicate)):
            if path.is_file():
                retry(lambda: self.client.log_artifact(run_id, str(path), "replicate"),
                      f"upload {path.name}")

    def _figures(self, run_id: str, record: dict[str, Any], run_dir: Path) -> None:
        from ticketsmith.engine.checkpoint import model_from_checkpoint
        from ticketsmith.tracking.figures import loss_curves, sample_grid

        title = f"level {record['level']} {record['variant']} ({record['density']:.1%} weights)"
        with tempfile.TemporaryDirectory() as tmp:
            key = (record["replicate"], record["level"], record["variant"])
            curve = json.loads(self.store.curve_path(*key).read_text())
            loss_curves(curve, Path(tmp) / "loss_curves.png", title)
            # Images only, and only for the models that ship (dense, tickets): the random
            # controls' predictions tell nobody anything, and each grid rebuilds a model.
            if (self.data is not None and self.data.test_x.dim() == 4
                    and record["variant"] in ("dense", "ticket")):
                # The run folder may come from the artifact store: same factory policy as
                # every loader, allowing only the factory this experiment's config names.
                model = model_from_checkpoint(self.store.checkpoint_path(*key),
                                              allow_factory=self.cfg.model.factory)[0]
                sample_grid(model, self.data.test_x.cpu(), self.data.test_y.cpu(),
                            Path(tmp) / "samples.png", title)
            retry(lambda: self.client.log_artifacts(run_id, tmp, "figures"), "upload figures")

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        """Log to any run, in MLflow-sized chunks, with retries."""
        metrics, params, tags = list(metrics), list(params), list(tags)
        # MLflow takes at most 1000 metrics, 100 params and 100 tags per batch.
        for i in range(0, max(len(metrics), len(params), len(tags)), 100):
            m, p, t = metrics[i:i + 100], params[i:i + 100], tags[i:i + 100]
            retry(lambda: self.client.log_batch(run_id, metrics=m, params=p, tags=t), "log batch")

    def _log_text(self, run_id: str, text: str, name: str) -> None:
        retry(lambda: self.client.log_text(run_id, redact(text), name), f"upload {name}")

    def _recover(self) -> None:
        """Fill the local run directory with finished levels from the artifact store."""
        recovered = 0
        for (rep, level, variant), run in self.children.items():
            if run.info.status != "FINISHED":
                continue
            if self.store.metrics_path(rep, level, variant).is_file():
                continue
            self._download(run.info.run_id, "run", self.store.run_dir(rep, level, variant))
            recovered += 1
        for rep, run_id in self.parents.items():
            if not self.store.init_path(rep).is_file():
                self._download(run_id, "replicate", self.store.replicate_dir(rep), required=False)
        if recovered:
            self.echo(f"tracking: recovered {recovered} finished run(s) from the artifact store")

    def _download(self, run_id: str, path: str, dest: Path, required: bool = True) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = retry(lambda: mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=path, dst_path=tmp,
                    tracking_uri=self.client.tracking_uri), f"download {path} of run {run_id}")
            except TrackingError:
                if required:
                    raise
                return
            dest.mkdir(parents=True, exist_ok=True)
            files = sorted(Path(local).iterdir(), key=lambda p: p.name == "metrics.json")
            for f in files:  # metrics.json (the done marker) last; each file lands whole
                part = dest / f".{f.name}.part"
                shutil.copyfile(f, part)
                os.replace(part, dest / f.name)


# --- reading back: what gates, the registry and the report use ------------------------------

def _is_hash(ref: str) -> bool:
    return len(ref) == 12 and all(c in "0123456789abcdef" for c in ref)


def resolve_experiment(client: MlflowClient, ref: str) -> tuple[str, str]:
    """(MLflow experiment id, config hash) for `NAME`, `HASH` or `NAME/HASH`.

    A name with several hashes resolves to the most recently started one; a hash found in
    several MLflow experiments (the name is not hashed) must be given as NAME/HASH.
    """
    name, _, exp_hash = ref.rpartition("/") if "/" in ref else ("", "", ref)
    if _is_hash(exp_hash):
        flt = f"tags.`{TAG}hash` = '{exp_hash}' and tags.`{TAG}role` = 'parent'"
        if name:
            exp = retry(lambda: client.get_experiment_by_name(name), "get experiment")
            ids = [exp.experiment_id] if exp is not None else []
        else:
            ids = [e.experiment_id for e in retry(client.search_experiments, "list experiments")]
        runs = retry(lambda: client.search_runs(ids, flt, max_results=1000), "search runs") \
            if ids else []
        found = sorted({r.info.experiment_id for r in runs})
        if len(found) > 1:
            names = [client.get_experiment(i).name for i in found]
            raise UnknownExperiment(f"--experiment {ref!r}: that hash is in several MLflow experiments "
                                f"({', '.join(names)}); give it as NAME/{exp_hash}")
        if found:
            return found[0], exp_hash
        if name:
            raise UnknownExperiment(f"--experiment {ref!r}: no runs of hash {exp_hash} in MLflow "
                                f"experiment {name!r}")
    exp = retry(lambda: client.get_experiment_by_name(ref), "get experiment")
    if exp is None:
        raise UnknownExperiment(f"--experiment {ref!r}: no MLflow experiment or config hash of that "
                            f"name in {redact(client.tracking_uri)}")
    runs = retry(lambda: client.search_runs([exp.experiment_id], f"tags.`{TAG}role` = 'parent'",
                                            max_results=1, order_by=["attributes.start_time DESC"]),
                 "search runs")
    if not runs:
        raise UnknownExperiment(f"--experiment {ref!r}: the experiment has no TicketSmith runs")
    return exp.experiment_id, runs[0].data.tags[TAG + "hash"]


def load_records(client: MlflowClient, experiment_id: str, exp_hash: str) -> list[dict[str, Any]]:
    """Finished child runs as engine-style records (plus `run_id`), sorted."""
    flt = (f"tags.`{TAG}hash` = '{exp_hash}' and tags.`{TAG}role` = 'child' and "
           f"attributes.status = 'FINISHED'")
    runs = retry(lambda: client.search_runs([experiment_id], flt, max_results=50000), "search runs")
    records = []
    for run in runs:
        rep, level, variant = _key(run.data.tags)
        rec = {"replicate": rep, "level": level, "variant": variant, "run_id": run.info.run_id}
        rec.update(run.data.metrics)
        records.append(rec)
    return sorted(records, key=lambda r: (r["replicate"], r["level"], r["variant"]))


def parent_runs(client: MlflowClient, experiment_id: str, exp_hash: str) -> list[Any]:
    flt = f"tags.`{TAG}hash` = '{exp_hash}' and tags.`{TAG}role` = 'parent'"
    runs = retry(lambda: client.search_runs([experiment_id], flt, max_results=1000), "search runs")
    return sorted(runs, key=lambda r: int(r.data.tags[TAG + "replicate"]))
