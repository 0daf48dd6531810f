"""Servers started as child processes, and stopped with everything they started.

`mlflow server` runs uvicorn, MLflow's job runner and its huey consumers as children;
`mlflow models serve` runs uvicorn. Ending only the process that was started leaves those
running until the machine stops. So a server starts in a session (and process group) of its
own, and stopping it ends the whole group: SIGTERM, then SIGKILL for what is left after a
bounded wait.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

import psutil

STOP_GRACE_S = 20.0  # seconds a group gets to exit on SIGTERM before it is killed


def start_group(cmd: list[str], **popen: Any) -> subprocess.Popen:
    """`subprocess.Popen(cmd, **popen)` as the leader of a new session and process group."""
    return subprocess.Popen(cmd, start_new_session=True, **popen)


def group_members(pgid: int) -> list[psutil.Process]:
    """The live processes of process group `pgid` (zombies, already dead, left out)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """`sig` to the group `proc` leads; to `proc` alone where it leads none (started without
    `start_group`), so that stopping it still ends it."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # no such group: gone, or `proc` was not started as a leader
        if proc.poll() is None:
            proc.send_signal(sig)


def _wait_gone(pgid: int, timeout_s: float) -> list[psutil.Process]:
    """Wait until no live process is left in the group, at most `timeout_s` seconds; what is
    still alive then. Members are not our children (bar the leader): psutil polls them."""
    deadline = time.monotonic() + timeout_s
    while (alive := group_members(pgid)) and time.monotonic() < deadline:
        psutil.wait_procs(alive, timeout=0.1)  # returns as soon as they have all gone
    return alive


def kill_group(proc: subprocess.Popen, timeout_s: float = STOP_GRACE_S) -> None:
    """SIGKILL the group that `proc` leads (an outage, not a stop) and wait until it is gone."""
    _signal_group(proc, signal.SIGKILL)
    proc.wait()
    _wait_gone(proc.pid, timeout_s)


def stop_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """End the group that `proc` leads: SIGTERM to all of it; whatever is still alive after
    `grace_s` seconds (the leader, or a child it left behind) gets SIGKILL."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)  # the leader is our child: reaped here
    except subprocess.TimeoutExpired:
        pass
    if proc.poll() is None or _wait_gone(proc.pid, grace_s):
        kill_group(proc, grace_s)
