"""Ctrl-C acts between tracking-store calls, never inside one.

A KeyboardInterrupt raised in the middle of a store call can leave the call half done: with
SQLite, the interrupted connection keeps the database's write lock, so every later write of
the same process (closing the open runs as KILLED) waits out SQLite's busy timeout (20 s
each) and fails with `database is locked`; a run created but not yet remembered is never
closed. Inside `interrupts_deferred()`, SIGINT is only noted; it is raised as
KeyboardInterrupt when the outermost block ends, or earlier where the block checks
`raise_if_interrupted()` (e.g. before backing off to retry).
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

_pending: list[int] = []   # signals noted while deferred (main thread only)
_depth = 0                 # nesting of interrupts_deferred() blocks


def _note(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
    _pending.append(signum)


def raise_if_interrupted() -> None:
    """Raise the KeyboardInterrupt noted inside a deferred block now."""
    if _pending:
        _pending.clear()
        raise KeyboardInterrupt


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT until the outermost block ends. Outside the main thread, or where the
    program has its own SIGINT handler, the block runs unchanged."""
    global _depth
    if threading.current_thread() is not threading.main_thread() or (
            _depth == 0 and signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    if _depth == 0:
        signal.signal(signal.SIGINT, _note)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise_if_interrupted()
