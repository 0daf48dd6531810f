"""A team's shared setup for real: `mlflow server` on a PostgreSQL backend store, the client
talking HTTP to it, and PostgreSQL restarted under a running experiment.

The experiments are real `python -m ticketsmith.prune` processes (configs/tiny.yaml: seconds);
the server is `mlflow server` (tests/conftest.py) on a database of the session's throwaway
PostgreSQL (tests/postgres.py), so every row checked here is read back from PostgreSQL itself.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import free_port, load_benchmark, start_mlflow_server, stop

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
RUNS = 5  # dense + 2 levels x (ticket, random re-init): a champion and a replaced version
chaos = load_benchmark("chaos")

# MLflow's HTTP client retries 503s (the server's answer while its database is down) inside
# each of ticketsmith's own retries (tracking.retry: 1+2+4+8+16 s). Bounded here: 2 inner
# retries 1 s apart, 10 s per request, so a database that stays down fails in under a minute.
HTTP_RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# What the server logs, once per request it could not serve for want of its database.
DB_DOWN = re.compile(r"ERROR mlflow\.server\.handlers: .*OperationalError")


@pytest.fixture(scope="module")
def pg_server(postgres, tmp_path_factory):
    """`mlflow server` on a fresh PostgreSQL database (its migrations take ~30 s here: one
    server for the module), proxied artifacts in a temporary folder. Without MLflow's job
    runner (huey: 8 more processes, each importing MLflow), which tracking never uses."""
    root = tmp_path_factory.mktemp("mlflow-pg")
    database = postgres.create_database("mlflow")
    proc = start_mlflow_server(root, free_port(), postgres.url(database))
    port = proc.args[proc.args.index("--port") + 1]
    try:
        yield f"http://127.0.0.1:{port}", database, root / "server.log"
    finally:
        stop(proc)


def refused(server_log: Path) -> int:
    return len(DB_DOWN.findall(server_log.read_text(errors="replace")))


def prune(tmp_path: Path, uri: str, name: str, *overrides: str) -> tuple[list[str], dict[str, str]]:
    return (chaos.prune_command(TINY, tmp_path, name, list(overrides)),
            {**chaos.store_env(uri), **HTTP_RETRY_ENV})


def rows(postgres, database: str, sql: str, *args) -> list[tuple]:
    conn = postgres.connect(database)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


def assert_complete(postgres, database: str, uri: str, name: str, tmp_path: Path,
                    runs: int = RUNS) -> None:
    """The store holds the whole experiment once: every run finished with the run folder's
    metrics, nothing RUNNING or duplicated, read through the server and from PostgreSQL."""
    found = chaos.audit(uri, name)
    assert (found.duplicate_runs, found.duplicate_versions, found.running) == (0, 0, 0)
    assert len(found.finished) == runs
    (folder,) = (tmp_path / "runs").iterdir()
    for (rep, level, variant), metrics in found.finished.items():
        local = folder / f"replicate_{rep}" / f"level_{level}" / variant / "metrics.json"
        assert metrics["test_accuracy"] == json.loads(local.read_text())["test_accuracy"]
    statuses = rows(postgres, database, "SELECT r.status, count(*) FROM runs r JOIN experiments e "
                    "ON r.experiment_id = e.experiment_id WHERE e.name = %s AND "
                    "r.lifecycle_stage = 'active' GROUP BY r.status", name)
    assert dict(statuses) == {"FINISHED": runs + 1}  # the replicate's parent run too


@pytest.mark.slow
def test_a_full_experiment_through_mlflow_server_on_postgresql(postgres, pg_server, tmp_path):
    uri, database, _ = pg_server
    cmd, env = prune(tmp_path, uri, "pg-full", "prune.levels=2")
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_complete(postgres, database, uri, "pg-full", tmp_path)
    # Gates and registry: verdicts tagged on the runs, the champion alias on a model version.
    gated = rows(postgres, database, "SELECT t.value, count(*) FROM tags t JOIN runs r ON "
                 "t.run_uuid = r.run_uuid JOIN experiments e ON r.experiment_id = e.experiment_id "
                 "WHERE e.name = 'pg-full' AND t.key = 'quality_gate' GROUP BY t.value")
    assert sum(n for _, n in gated) >= 2 and {v for v, _ in gated} <= {"passed", "rejected"}
    aliases = rows(postgres, database, "SELECT alias FROM registered_model_aliases a JOIN "
                   "model_versions v ON a.name = v.name AND a.version = v.version JOIN runs r ON "
                   "v.run_id = r.run_uuid JOIN experiments e ON r.experiment_id = e.experiment_id "
                   "WHERE e.name = 'pg-full'")
    assert ("champion",) in aliases
    # The report: written locally and uploaded through the server to its artifact store.
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    (parent,) = [r for r in client.search_runs(
        [client.get_experiment_by_name("pg-full").experiment_id],
        "tags.`ticketsmith.role` = 'parent'")]
    assert "report/executive_summary.html" in {
        a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert list((tmp_path / "reports").rglob("executive_summary.html"))


def wait_for(predicate, what: str, proc: subprocess.Popen, timeout_s: float = 300):
    """Poll `predicate` until true; fail if the experiment process ends first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        try:  # poll interval, not a timing assumption
            proc.wait(timeout=0.05)
            raise AssertionError(f"the experiment exited {proc.returncode} before {what}")
        except subprocess.TimeoutExpired:
            pass
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_postgresql_restarted_during_a_run_loses_nothing(postgres, pg_server, tmp_path):
    """PostgreSQL stops once level 0 is tracked; it starts again as soon as the server has
    answered a request of the experiment with the database down (observed in the server's
    log). The experiment retries and completes, or exits 1 with one `error: tracking failed`
    line; either way the store then holds everything, once."""
    uri, database, server_log = pg_server
    # One pruning level (dense, ticket, random re-init) keeps it short: the outage hits the
    # logging of level 1, then gates, registry and report follow on the restarted database.
    cmd, env = prune(tmp_path, uri, "pg-restart", "prune.levels=1")
    errors_before = refused(server_log)
    started = time.monotonic()
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=err,
                                text=True, start_new_session=True)
        try:
            for line in proc.stdout:  # level 0 is tracked; level 1 is training now
                if line.startswith("  r0 level 0"):
                    break
            postgres.stop()
            down = time.monotonic()
            wait_for(lambda: refused(server_log) > errors_before,
                     "a request reached the server while PostgreSQL was down", proc)
            postgres.start()
            outage_s = time.monotonic() - down
            proc.stdout.read()
            rc = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
            if postgres.proc.poll() is not None:
                postgres.start()  # the session's other tests need it
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr
    if rc == 1:
        errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith("error: tracking failed"), stderr
        again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
    else:
        assert rc == 0, stderr
    failed = refused(server_log) - errors_before
    print(f"postgresql restart: down {outage_s:.1f}s, {failed} request(s) refused by the server, "
          f"experiment exit {rc}, {time.monotonic() - started:.0f}s in all")
    assert_complete(postgres, database, uri, "pg-restart", tmp_path, runs=3)


@pytest.mark.parametrize("ci,outcome", [("true", pytest.fail.Exception),
                                        ("", pytest.skip.Exception)])
def test_missing_postgresql_fails_in_ci_and_skips_elsewhere(monkeypatch, ci, outcome):
    import postgres as pg

    monkeypatch.setattr(pg, "server_binaries", lambda: None)
    monkeypatch.setenv("CI", ci)
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception),
                       match="install-services.sh") as raised:
        pg.start_postgres(free_port())
    assert raised.type is outcome  # a skip in CI would hide the missing server
