"""Work whose failure is kept until a barrier: jobs in order, the first failure raised by
`wait()`, so a run that waits on its jobs before it is closed ends FAILED when one of them
failed, never FINISHED without them.

Two uses: the tracker runs each level's ticket logging (plan build and check, model files)
in the training thread (`threaded=False`: on a thread beside the next level's training it drew
on torch's process-wide random generator and thread pool, so weights depended on timing), and
the pipeline imports the tracking modules on one worker thread while the data loads (no torch
work there).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class Background:
    """A single worker thread (jobs run one at a time, in the order submitted), or, with
    `threaded=False`, each job run at once in the caller's thread with the same contract: its
    failure is kept and raised by `wait()`, not where it was submitted."""

    def __init__(self, threaded: bool = True) -> None:
        self._threaded = threaded
        self._pool: ThreadPoolExecutor | None = None
        self._jobs: list[Future] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if not self._threaded:
            job: Future = Future()
            try:
                job.set_result(fn(*args))
            except Exception as error:  # kept for wait(); Ctrl-C and SIGTERM stop at once
                job.set_exception(error)
            self._jobs.append(job)
            return job
        if self._pool is None:  # no thread until there is work
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="ticketsmith-background")
        job = self._pool.submit(fn, *args)
        self._jobs.append(job)
        return job

    def wait(self) -> None:
        """Block until every submitted job has ended; raise the first failure."""
        jobs, self._jobs = self._jobs, []
        errors = [job.exception() for job in jobs]  # waits for each, in order
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def abandon(self) -> None:
        """After an error or an interrupt: drop the jobs not started yet and let the running
        one end (what it records lands whole); its failure, if any, is not raised."""
        for job in self._jobs:
            job.cancel()
        for job in self._jobs:
            if not job.cancelled():
                job.exception()
        self._jobs = []
