"""What a command shows: its own progress and answers, not the libraries' chatter. Set up once
per process, by the CLI and by the tracking process beside training (`ticketsmith.sidecar`)."""
from __future__ import annotations

import logging
import os
import warnings
from typing import Callable


def without_mlflow_hints(show: Callable) -> Callable:
    """MLflow's hints about its own API (UserWarnings, some in raw ANSI colour) are not news
    about the experiment: the output is progress, the per-level lines, the answer and where to
    look next (the MLflow UI link, the report path). A hook rather than a filter, because
    libraries imported later put their own filters in front of ours."""
    def showwarning(message, category, filename, lineno, file=None, line=None):
        mlflow_hint = str(message).startswith("\x1b[") or f"{os.sep}mlflow{os.sep}" in filename
        if not (issubclass(category, UserWarning) and mlflow_hint):
            show(message, category, filename, lineno, file, line)
    return showwarning


def quiet_libraries() -> None:
    """Logging as plain lines, and MLflow's defaults for a command line (environment variables,
    so a child process inherits them)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Per-file download bars from MLflow drown the experiment's own progress output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow's HTTP client retries 7 times with exponential backoff (minutes) inside each of
    # our retries (tracking.retry); two inner retries keep an outage's failure prompt.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    # MLflow's own INFO lines (creating tables, inferring a signature) are not ours to show.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if not getattr(warnings.showwarning, "_ticketsmith", False):
        warnings.showwarning = without_mlflow_hints(warnings.showwarning)
        warnings.showwarning._ticketsmith = True
