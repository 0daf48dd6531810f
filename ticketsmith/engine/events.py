"""The narrow interface through which the engine reports; the tracking layer implements it.

The engine never imports MLflow. It calls these hooks in this order:

    experiment_started → (replicate_started → (run_started → log_metrics* → run_finished
    | run_reused)* → replicate_finished)* → experiment_finished

and, if anything raises on the way (Ctrl-C included), experiment_failed(error) before the
error propagates, so the tracker can close what it opened.

`experiment_started` may fill the run directory (e.g. recover finished levels from an
artifact store) before the engine looks for finished work. `run_reused` reports a level
found finished in the run directory and not trained again.

Before `run_started` of a level whose progress checkpoint is not in the run directory,
`fetch_progress` may put it there (e.g. from the unfinished run of a machine that is gone);
`progress_saved` is called (at most every `train.upload_every_s`, and at a stop) with the
progress checkpoint just written, to keep a copy where another machine finds it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol
from ticketsmith.base.errors import TrackingError, UnknownExperiment  # noqa: F401 (re-exported)


class Tracker(Protocol):
    def experiment_started(self, cfg: Any, exp_hash: str, run_root: Path, data: Any) -> None: ...
    def replicate_started(self, replicate: int) -> None: ...
    def run_started(self, replicate: int, level: int, variant: str) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def fetch_progress(self, replicate: int, level: int, variant: str, dest: Path) -> None: ...
    def progress_saved(self, path: Path) -> None: ...
    def run_finished(self, record: dict[str, Any], run_dir: Path) -> None: ...
    def run_reused(self, record: dict[str, Any], run_dir: Path) -> None: ...
    def replicate_finished(self, replicate: int, records: list[dict[str, Any]]) -> None: ...
    def experiment_finished(self, records: list[dict[str, Any]]) -> None: ...
    def experiment_failed(self, error: BaseException) -> None: ...


class NullTracker:
    """Reports nothing; the engine alone, e.g. in tests or with tracking switched off."""

    def experiment_started(self, cfg: Any, exp_hash: str, run_root: Path, data: Any) -> None:
        pass

    def replicate_started(self, replicate: int) -> None:
        pass

    def run_started(self, replicate: int, level: int, variant: str) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def fetch_progress(self, replicate: int, level: int, variant: str, dest: Path) -> None:
        pass

    def progress_saved(self, path: Path) -> None:
        pass

    def run_finished(self, record: dict[str, Any], run_dir: Path) -> None:
        pass

    def run_reused(self, record: dict[str, Any], run_dir: Path) -> None:
        pass

    def replicate_finished(self, replicate: int, records: list[dict[str, Any]]) -> None:
        pass

    def experiment_finished(self, records: list[dict[str, Any]]) -> None:
        pass

    def experiment_failed(self, error: BaseException) -> None:
        pass
