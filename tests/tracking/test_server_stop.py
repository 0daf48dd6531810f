"""A server a test starts is stopped with everything it started: `mlflow server` runs uvicorn,
MLflow's job runner and huey consumers as children, and stopping only the process that was
started would leave them running after the suite."""
from __future__ import annotations

import os

import psutil
import pytest

from conftest import free_port, start_mlflow_server, stop
from ticketsmith.base.processes import group_members


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:  # same pid, same start
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


def pgid(p: psutil.Process) -> int | None:
    try:
        return os.getpgid(p.pid)
    except ProcessLookupError:  # ended since it was listed
        return None


@pytest.mark.slow  # one real `mlflow server` start: seconds idle, a minute on a loaded machine
def test_stopping_the_mlflow_server_ends_every_process_it_started(tmp_path):
    proc = start_mlflow_server(tmp_path, free_port(), jobs=True)  # every child it can start
    try:
        leader = psutil.Process(proc.pid)
        started = leader.children(recursive=True)
        assert started, "mlflow server answered without children: nothing to check"
        # each (still running: start-up helpers come and go) is in the server's own group,
        # so ending the group reaches it
        assert [p for p in alive(started) if pgid(p) not in (proc.pid, None)] == []
    finally:
        stop(proc)
    assert proc.returncode is not None
    assert alive([leader, *started]) == []
    assert group_members(proc.pid) == []
