"""Ctrl-C and SIGTERM act between tracking-store calls, never inside one.

A KeyboardInterrupt raised in the middle of a store call can leave the call half done: with
SQLite, the interrupted connection keeps the database's write lock, so every later write of
the same process (closing the open runs as KILLED) waits out SQLite's busy timeout (20 s
each) and fails with `database is locked`; a run created but not yet remembered is never
closed. Inside `interrupts_deferred()`, SIGINT (and SIGTERM, once `stop_on_sigterm()` made it
an interrupt) is only noted; it is raised when the outermost block ends, or earlier where the
block checks `raise_if_interrupted()` (e.g. before backing off to retry, or after a training
step, once the progress checkpoint is written).

SIGTERM is how Kubernetes stops a pod (spot preemption, eviction, a Job's deadline, `kubectl
delete`): `stop_on_sigterm()` makes it raise `Terminated`, a KeyboardInterrupt, so every path
that cleans up after Ctrl-C (runs closed as KILLED) does the same for it; the CLI exits 143.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

_pending: list[int] = []   # signals noted while deferred (main thread only)
_depth = 0                 # nesting of interrupts_deferred() blocks


class Terminated(KeyboardInterrupt):
    """SIGTERM received: stop cleanly like Ctrl-C (exit 143 = 128 + SIGTERM)."""


def _raise_terminated(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
    raise Terminated


def stop_on_sigterm() -> None:
    """Make SIGTERM raise `Terminated` in the main thread (Python's default ends the process
    at once, leaving runs RUNNING and the level's work unsaved)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def _note(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
    _pending.append(signum)


def interrupt_pending() -> bool:
    """True once a deferred SIGINT/SIGTERM waits to be raised."""
    return bool(_pending)


def raise_if_interrupted() -> None:
    """Raise the interrupt noted inside a deferred block now: Terminated for a SIGTERM,
    else KeyboardInterrupt."""
    if _pending:
        terminated = signal.SIGTERM in _pending
        _pending.clear()
        raise Terminated if terminated else KeyboardInterrupt


def _deferrable() -> list[int]:
    """The signals that raise in this process and are ours to hold: SIGINT under Python's
    default handler, SIGTERM once `stop_on_sigterm` made it raise."""
    found = []
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        found.append(signal.SIGINT)
    if signal.getsignal(signal.SIGTERM) is _raise_terminated:
        found.append(signal.SIGTERM)
    return found


_held: list[tuple[int, object]] = []  # (signal, handler to restore) of the outermost block


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT (and SIGTERM, see `stop_on_sigterm`) until the outermost block ends.
    Outside the main thread, or where the program has its own handlers, the block runs
    unchanged."""
    global _depth
    if threading.current_thread() is not threading.main_thread() or (
            _depth == 0 and not _deferrable()):
        yield
        return
    if _depth == 0:
        _held[:] = [(s, signal.getsignal(s)) for s in _deferrable()]
        for s, _ in _held:
            signal.signal(s, _note)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            for s, handler in _held:
                signal.signal(s, handler)
            _held.clear()
            raise_if_interrupted()
