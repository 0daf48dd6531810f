"""Sweep configs: which experiment to vary, how, and where the Optuna study lives.

A sweep YAML names a base experiment config, extra `--set` overrides, the study (storage,
objective, sampler, heartbeats, trial pruning) and a search space whose keys are config key
paths. Validated like experiment configs: unknown keys and bad values are one-line errors
naming the key path. Also here: opening the study's storage, and the lock that lets several
workers share it without starting more trials than asked for.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import optuna
import sqlalchemy
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ticketsmith.base.config import Config, ConfigError, _format_error, load_config
from ticketsmith.base.secrets import redact

STORAGE_ENV = "TICKETSMITH_SWEEP_STORAGE"   # overrides study.storage; how pods get a Secret's URL
OBJECTIVE_DIRECTIONS = {"accuracy": "maximize", "density": "minimize", "sparsity": "maximize",
                        "speedup": "maximize"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FloatParam(_Strict):
    type: Literal["float"]
    low: float
    high: float
    log: bool = Field(False, description="Sample on a log scale (e.g. learning rates).")
    step: float | None = Field(None, gt=0, description="Discretisation step; not with log.")

    @model_validator(mode="after")
    def _range(self) -> "FloatParam":
        _check_range(self.low, self.high, self.log, self.step)
        return self

    def values(self) -> list[Any]:
        return [self.low, self.high]


class IntParam(_Strict):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _range(self) -> "IntParam":
        _check_range(self.low, self.high, self.log, None if self.step == 1 else self.step)
        return self

    def values(self) -> list[Any]:
        return [self.low, self.high]


class CategoricalParam(_Strict):
    type: Literal["categorical"]
    choices: list[Union[bool, int, float, str, None]] = Field(min_length=1)

    def values(self) -> list[Any]:
        return list(self.choices)


def _check_range(low: float, high: float, log: bool, step: float | None) -> None:
    if low > high:
        raise ValueError(f"low ({low}) must not exceed high ({high})")
    if log and low <= 0:
        raise ValueError("log scale needs low > 0")
    if log and step is not None:
        raise ValueError("set either log or step, not both")


Param = Annotated[Union[FloatParam, IntParam, CategoricalParam], Field(discriminator="type")]


class TrialPruningConfig(_Strict):
    pruner: Literal["none", "median", "percentile", "hyperband"] = Field(
        "median", description="Optuna pruner that stops hopeless trials between levels (trial "
        "pruning). Single-objective studies only: Optuna has none for multi-objective ones.")
    n_startup_trials: int = Field(2, ge=0, description="Finished trials before any trial is "
                                  "stopped early (median/percentile).")
    n_warmup_steps: int = Field(0, ge=0, description="Levels a trial always runs before it "
                                "may be stopped early (median/percentile).")
    percentile: float = Field(25.0, gt=0, lt=100, description="percentile pruner: stop below "
                              "this percentile of the other trials at the same level.")


class StudyConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="Study name; also the MLflow experiment of every trial.")
    storage: str = Field("sqlite:///sweeps.db", description="Optuna storage URL: SQLite (one "
                         "machine) or any RDB URL, e.g. postgresql+psycopg2://... "
                         f"${STORAGE_ENV} overrides it.")
    objective: Literal["highest_gated_sparsity", "pareto"] = Field(
        "highest_gated_sparsity", description="Maximise the sparsity of the sparsest ticket "
        "passing every gate, or search a Pareto front over `objectives`.")
    objectives: list[Literal["accuracy", "density", "sparsity", "speedup"]] = Field(
        default_factory=lambda: ["accuracy", "density"], description="pareto: what each trial "
        "scores, measured at its champion level (the dense model when no ticket passes).")
    speedup_metric: str | None = Field(None, description="speedup objective: this benchmark "
                                       "metric (e.g. speedup_compacted_bs1); default the best "
                                       "correct format at any batch size.")
    sampler: Literal["tpe", "random", "nsga2"] = Field("tpe", description="Optuna sampler.")
    seed: int = Field(0, ge=0, description="Sampler seed (mixed with worker index and study "
                      "size, so workers and continued studies draw different settings).")
    n_trials: int = Field(10, ge=1, description="Trials the study should hold (COMPLETE or "
                          "PRUNED); --n-trials overrides it. Running again tops it up.")
    heartbeat_interval: int = Field(30, ge=1, description="Seconds between a running trial's "
                                    "heartbeats.")
    grace_period: int = Field(120, ge=1, description="Seconds without a heartbeat after which "
                              "a trial is failed and retried (its worker died).")
    max_retry: int = Field(2, ge=0, description="Retries of a trial whose worker died.")
    max_failures: int = Field(3, ge=1, description="A worker stops after this many failed "
                              "trials in a row (a broken setup, not an unlucky sample).")
    trial_pruning: TrialPruningConfig = Field(default_factory=TrialPruningConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "StudyConfig":
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError("grace_period must be longer than heartbeat_interval")
        if self.objective == "pareto":
            if len(self.objectives) < 2 or len(set(self.objectives)) != len(self.objectives):
                raise ValueError("pareto needs at least two different objectives")
            if "trial_pruning" in self.model_fields_set and self.trial_pruning.pruner != "none":
                raise ValueError("trial pruning is single-objective only in Optuna; set "
                                 "trial_pruning.pruner: none for a pareto study")
        return self

    @property
    def directions(self) -> list[str]:
        if self.objective == "highest_gated_sparsity":
            return ["maximize"]
        return [OBJECTIVE_DIRECTIONS[o] for o in self.objectives]

    @property
    def uses_trial_pruning(self) -> bool:
        return self.objective != "pareto" and self.trial_pruning.pruner != "none"


class SweepConfig(_Strict):
    base: str = Field(description="Experiment config every trial starts from (a path relative "
                      "to the sweep file, else to the working directory).")
    overrides: list[str] = Field(default_factory=list, description="`--set` overrides applied "
                                 "to the base before the sampled values.")
    study: StudyConfig
    search_space: dict[str, Param] = Field(min_length=1, description="Config key path → "
                                           "distribution; each sampled value is a `--set`.")
    source: str = Field("", exclude=True, description="Where this sweep config was read from.")

    def base_path(self) -> Path:
        """`base` relative to the sweep file's folder (like an include), else to the cwd."""
        path = Path(self.base)
        if not path.is_absolute() and self.source:
            beside = Path(self.source).parent / path
            if beside.is_file():
                return beside
        return path

    def trial_overrides(self, params: dict[str, Any]) -> list[str]:
        """Every `--set` of a trial, in order: sweep defaults, the YAML's overrides, the
        sampled values, then what the sweep itself fixes (experiment name, benchmark)."""
        fixed = ["tracking.register_model=false", *self.overrides]
        fixed += [f"{key}={json.dumps(value)}" for key, value in params.items()]
        fixed.append(f"experiment.name={json.dumps(self.study.name)}")  # "1e5" stays a string
        if self.study.objective == "pareto" and "speedup" in self.study.objectives:
            fixed.append("experiment.benchmark=true")
        return fixed

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        """One value per search-space key, drawn by the study's sampler."""
        out = {}
        for key, spec in self.search_space.items():
            if spec.type == "float":
                out[key] = trial.suggest_float(key, spec.low, spec.high, log=spec.log, step=spec.step)
            elif spec.type == "int":
                out[key] = trial.suggest_int(key, spec.low, spec.high, log=spec.log, step=spec.step)
            else:
                out[key] = trial.suggest_categorical(key, spec.choices)
        return out

    def experiment_config(self, params: dict[str, Any]) -> Config:
        return load_config(self.base_path(), self.trial_overrides(params))


def load_sweep_config(path: str | Path, overrides: list[str] | None = None, *,
                      storage: str | None = None, study_name: str | None = None,
                      n_trials: int | None = None) -> SweepConfig:
    """Load and validate a sweep YAML; `overrides` are added to its `overrides`.

    Also checks that the base config loads, that every search-space key is a config field
    and that every range end (every choice) gives a valid experiment config.
    """
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read sweep config ({exc.strerror})") from None
    except yaml.YAMLError:
        raise ConfigError(f"{path}: not valid YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with base, study and search_space")
    raw = {**raw, "source": str(path), "overrides": [*raw.get("overrides", []), *(overrides or [])]}
    study = dict(raw.get("study") or {})
    for key, value in (("storage", storage), ("name", study_name), ("n_trials", n_trials)):
        if value is not None:
            study[key] = value
    raw["study"] = study
    try:
        cfg = SweepConfig.model_validate(raw)
    except ValidationError as exc:
        msg = _format_error(exc, str(path))
        raise ConfigError(re.sub(r"(search_space\..*?)\.(float|int|categorical)\b", r"\1", msg,
                                 count=1)) from None
    cfg.experiment_config({})  # the base and its overrides must load on their own
    for key, spec in cfg.search_space.items():
        _check_key(key, path)
        for value in spec.values():
            try:
                cfg.experiment_config({key: value})
            except ConfigError as exc:
                raise ConfigError(f"{path}: search_space.{key}: value {value!r} is invalid "
                                  f"({str(exc).split(': ', 1)[-1]})") from None
    return cfg


def _check_key(key: str, path: str | Path) -> None:
    """A search-space key must name a config field, e.g. `prune.fraction`."""
    model: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            if fields is None and i > 0:
                return  # inside a free-form dict (e.g. model.options.hidden): Config checks it
            raise ConfigError(f"{path}: search_space.{key}: not a config key "
                              f"(e.g. prune.fraction, train.lr)")
        model = fields[part].annotation
        model = model if isinstance(model, type) and issubclass(model, BaseModel) else None
    if model is not None:
        raise ConfigError(f"{path}: search_space.{key}: is a section; name a field in it")


# --- what the study is made of: sampler, trial pruner, storage, lock ---------------------

def make_sampler(cfg: SweepConfig, seed: int) -> optuna.samplers.BaseSampler:
    kind = cfg.study.sampler
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def make_trial_pruner(cfg: SweepConfig) -> optuna.pruners.BasePruner:
    """Optuna's pruner that stops hopeless trials early (NopPruner: never)."""
    tp = cfg.study.trial_pruning
    if not cfg.study.uses_trial_pruning:
        return optuna.pruners.NopPruner()
    if tp.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto")
    if tp.pruner == "percentile":
        return optuna.pruners.PercentilePruner(tp.percentile, n_startup_trials=tp.n_startup_trials,
                                               n_warmup_steps=tp.n_warmup_steps)
    return optuna.pruners.MedianPruner(n_startup_trials=tp.n_startup_trials,
                                       n_warmup_steps=tp.n_warmup_steps)


def resolve_storage(cfg: SweepConfig, explicit: str | None = None) -> str:
    """--storage, else $TICKETSMITH_SWEEP_STORAGE, else study.storage.

    Inside a Kubernetes pod a SQLite file dies with the pod (and cannot be shared between
    pods): refused, like a local MLflow store (`tracking.check_shared_store`).
    """
    url = explicit or os.environ.get(STORAGE_ENV) or cfg.study.storage
    if url.startswith("sqlite") and os.environ.get("KUBERNETES_SERVICE_HOST") and \
            not os.environ.get("TICKETSMITH_ALLOW_LOCAL_TRACKING"):
        raise ConfigError(f"study.storage: {redact(url)!r} is local to this pod; set "
                          f"{STORAGE_ENV} to the shared PostgreSQL study database")
    return url


def open_storage(url: str, study: StudyConfig, on_stale=None):
    """Optuna RDBStorage with heartbeats; bad URLs and missing drivers are one-line errors."""
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        # Several local workers write one SQLite file: wait for its lock rather than fail.
        engine_kwargs = {"connect_args": {"timeout": 120}}
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=study.heartbeat_interval,
                grace_period=study.grace_period, heartbeat_stale_trial_callback=on_stale)
    except ImportError as exc:
        raise ConfigError(f"study.storage {redact(url)}: database driver missing ({exc}); for "
                          "PostgreSQL: pip install psycopg2-binary") from None
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.OperationalError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise ConfigError(f"study.storage {redact(url)}: cannot open ({redact(reason)})") from None


class StudyLock:
    """Serialises "is there budget left? then claim a trial" across the workers of a study.

    SQLite (one machine): an flock on `<db>.lock`. PostgreSQL: a session advisory lock;
    MySQL: GET_LOCK. Other storages: no lock (a concurrent claim may then start one trial
    more than asked for). `release` may be called any number of times.
    """

    def __init__(self, url: str, study_name: str):
        self.url, self.held = sqlalchemy.engine.make_url(url), False
        self.key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big") >> 1
        self.name = f"ticketsmith-sweep-{study_name}"[:64]
        self._file = self._conn = self._engine = None

    def acquire(self) -> None:
        backend = self.url.get_backend_name()
        if backend == "sqlite" and self.url.database not in (None, "", ":memory:"):
            self._file = open(f"{self.url.database}.lock", "a+")  # noqa: SIM115 (held until release)
            fcntl.flock(self._file, fcntl.LOCK_EX)
        elif backend in ("postgresql", "mysql", "mariadb"):
            self._engine = self._engine or sqlalchemy.create_engine(
                self.url, poolclass=sqlalchemy.pool.NullPool)
            self._conn = self._engine.connect()
            sql = ("SELECT pg_advisory_lock(:k)" if backend == "postgresql"
                   else "SELECT GET_LOCK(:n, -1)")
            self._conn.execute(sqlalchemy.text(sql), {"k": self.key, "n": self.name})
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if self._conn is not None:
            sql = ("SELECT pg_advisory_unlock(:k)" if self.url.get_backend_name() == "postgresql"
                   else "SELECT RELEASE_LOCK(:n)")
            try:
                self._conn.execute(sqlalchemy.text(sql), {"k": self.key, "n": self.name})
            finally:
                self._conn.close()  # closing the session also drops a lock left behind
                self._conn = None

    def __enter__(self) -> "StudyLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
