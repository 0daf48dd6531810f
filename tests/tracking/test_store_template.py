"""A new SQLite store starts as a copy of MLflow's migrated schema kept in the user's cache:
it must be the store MLflow itself builds, and a template MLflow refuses must not stop a run."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import mlflow
import mlflow.store.db.utils as db_utils
from mlflow import MlflowClient
from mlflow.tracking._tracking_service.utils import _get_sqlalchemy_store

from ticketsmith.tracking.sqlite_store import prepare_store, template_dir


def contents(db: Path) -> tuple[list, list, list]:
    """Schema (every table, index and trigger), Alembic revision and experiments of a store,
    without the experiments' creation times. A table's columns and constraints are compared
    as a set: MLflow's migrations write a table's CHECK constraints in varying order (two
    stores it builds in place can differ so)."""
    with sqlite3.connect(db) as con:
        schema = [(kind, name, table, sorted(line.strip().rstrip(",") for line in (sql or "")
                                             .splitlines()))
                  for kind, name, table, sql in con.execute(
                      "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name")]
        revision = con.execute("SELECT version_num FROM alembic_version").fetchall()
        experiments = con.execute("SELECT experiment_id, name, artifact_location, "
                                  "lifecycle_stage, workspace FROM experiments").fetchall()
    return schema, revision, experiments


def test_a_store_from_the_template_is_the_store_mlflow_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("TICKETSMITH_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the template holds no artifact root from here
    prepare_store(f"sqlite:///{tmp_path / 'first.db'}")  # builds the template on the way
    assert (template_dir() / f"mlflow-{mlflow.__version__}-schema.db").is_file()
    monkeypatch.chdir(tmp_path)  # the default experiment's artifact root is ./mlruns here

    def no_migrations(engine):
        raise AssertionError("the store was migrated instead of copied from the template")

    with monkeypatch.context() as mp:
        mp.setattr(db_utils, "_initialize_tables", no_migrations)
        prepare_store(f"sqlite:///{tmp_path / 'copied.db'}")
    _get_sqlalchemy_store(f"sqlite:///{tmp_path / 'mlflow_built.db'}", None).engine.dispose()

    copied, built = contents(tmp_path / "copied.db"), contents(tmp_path / "mlflow_built.db")
    assert copied == built
    assert copied[2] == [(0, "Default", str(tmp_path / "mlruns" / "0"), "active", "default")]
    client = MlflowClient(f"sqlite:///{tmp_path / 'copied.db'}")
    run = client.create_run(client.create_experiment("x"))
    client.log_metric(run.info.run_id, "m", 1.0)
    client.create_registered_model("m")
    assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}


def test_a_template_mlflow_refuses_is_replaced_and_the_store_still_made(tmp_path, monkeypatch):
    """An out-of-date template (another MLflow wrote it under this version's name, or it was
    tampered with) is dropped; the store is built by MLflow's migrations as before."""
    monkeypatch.setenv("TICKETSMITH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    prepare_store(f"sqlite:///{tmp_path / 'first.db'}")
    template = template_dir() / f"mlflow-{mlflow.__version__}-schema.db"
    with sqlite3.connect(template) as con:
        con.execute("UPDATE alembic_version SET version_num = '451aebb31d03'")  # MLflow 1.x
    prepare_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not template.exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_experiment(client.create_experiment("x")).name == "x"
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["first.db", "mlflow.db"]
