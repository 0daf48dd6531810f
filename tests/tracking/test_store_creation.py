"""A new SQLite tracking store appears all at once: built aside, then linked into place, so a
kill while MLflow creates its tables never leaves a half-built store behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

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


# The creating process stops itself half way, with MLflow's initial tables written and its
# migrations not yet run, says where it is building, and waits to be killed there.
HALF_BUILT = """
import sys
import mlflow.store.db.utils as db
from ticketsmith.tracking.tracker import prepare_store

def stop_half_way(engine):
    print(engine.url.database, flush=True)
    sys.stdin.read()  # until killed

db._upgrade_db = stop_half_way
prepare_store(sys.argv[1])
"""


def test_a_kill_during_creation_leaves_no_store_and_the_next_command_works(tmp_path):
    """SIGKILL the creating process while MLflow builds the tables (initial tables written,
    migrations not run): no store file, and the next creation gives a working store."""
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    # No schema template can be cached (its folder would sit under a file), so MLflow runs its
    # migrations for this store itself, the path a first store on a read-only home takes.
    (tmp_path / "not-a-folder").write_text("")
    env = {**os.environ, "TICKETSMITH_CACHE_DIR": str(tmp_path / "not-a-folder" / "cache")}
    proc = subprocess.Popen([sys.executable, "-c", HALF_BUILT, uri], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        building = Path(proc.stdout.readline().strip())
        assert building.parent == tmp_path and building.exists(), building
        assert building != db, "the tables are built in the store itself, not beside it"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert not db.exists()  # never a half-built store under the real name
    prepare_store(uri)
    assert MlflowClient(uri).search_experiments()[0].name == "Default"
