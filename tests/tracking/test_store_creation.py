"""A new SQLite tracking store appears all at once: built aside, then linked into place, so a
kill while MLflow creates its tables never leaves a half-built store behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ticketsmith.tracking.tracker import prepare_store


def test_a_new_store_is_complete_when_it_appears(tmp_path):
    uri = f"sqlite:///{tmp_path / 'deep' / 'mlflow.db'}"
    prepare_store(uri)
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["mlflow.db"]
    client = MlflowClient(uri)  # no migration needed: the schema is at MLflow's head
    exp = client.create_experiment("x")
    client.create_registered_model("m")
    assert client.get_experiment(exp).name == "x"
    before = (tmp_path / "deep" / "mlflow.db").stat().st_ino
    prepare_store(uri)  # an existing store is left alone
    assert (tmp_path / "deep" / "mlflow.db").stat().st_ino == before
    assert client.get_experiment(exp).name == "x"


def test_a_kill_during_creation_leaves_no_store_and_the_next_command_works(tmp_path):
    """SIGKILL the creating process as soon as its temporary file exists (MLflow is then
    building the tables): no store file, and the next creation gives a working store."""
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    code = f"from ticketsmith.tracking.tracker import prepare_store; prepare_store({uri!r})"
    proc = subprocess.Popen([sys.executable, "-c", code])
    tmp = None
    try:
        while proc.poll() is None and tmp is None:
            tmp = next(iter(tmp_path.glob(".mlflow.db.*.creating")), None)
        if tmp is None:
            pytest.skip("the store was created before the kill could land")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not db.exists()  # never a half-built store under the real name
    prepare_store(uri)
    assert MlflowClient(uri).search_experiments()[0].name == "Default"
