"""A throwaway PostgreSQL server for tests: the shared store a team runs (MLflow's backend
store, an Optuna study), here on a free loopback port.

One `initdb` per test session (seconds); each test gets its own database on it. The server runs
in its own process group, as the `postgres` user when the tests run as root (PostgreSQL refuses
root), and `restart()` is a real stop ("fast" shutdown: open connections are cut) and start on
the same data folder and port, for tests of what survives a database restart.

    bash .ci/install-services.sh       # Debian's postgresql when its server binaries are missing

Missing binaries skip a test on a developer machine and fail it in CI (CI=true), where
.ci/install-services.sh installs them.
"""
from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

READY_TIMEOUT_S = 60.0   # a cold start on a busy 2-core machine
STOP_TIMEOUT_S = 60.0
USER = "ticketsmith"     # the superuser initdb creates (trust auth: loopback, throwaway)


def server_binaries() -> Path | None:
    """The folder holding `initdb` and `postgres` (PATH first, then Debian's layout)."""
    found = [shutil.which("initdb")] + sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = next((b for b in found if b), None)
    return Path(initdb).resolve().parent if initdb else None


def missing(reason: str) -> None:
    """Skip on a developer machine; fail in CI, where .ci/install-services.sh installs it."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} -- CI must install it (.ci/install-services.sh)")
    pytest.skip(f"{reason} (bash .ci/install-services.sh installs it)")


class Postgres:
    """One PostgreSQL server on 127.0.0.1:`port` with its data in `root`/data."""

    def __init__(self, bin_dir: Path, root: Path, port: int, user: str | None):
        self.bin_dir, self.root, self.port, self.user = bin_dir, root, port, user
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._names = itertools.count()

    def url(self, database: str = "postgres", driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://{USER}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, dbname=database,
                                connect_timeout=5)

    def initdb(self) -> None:
        subprocess.run([str(self.bin_dir / "initdb"), "-D", str(self.root / "data"), "-U", USER,
                        "--auth=trust", "--no-sync"], user=self.user, check=True,
                       capture_output=True, timeout=300)

    def start(self) -> None:
        log = open(self.root / "postgres.log", "ab")
        # Own process group: stop() ends the postmaster and every backend it forked.
        self.proc = subprocess.Popen(
            [str(self.bin_dir / "postgres"), "-D", str(self.root / "data"), "-p", str(self.port),
             "-k", str(self.root), "-h", "127.0.0.1", "-c", "fsync=off"],
            user=self.user, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.wait_ready()

    def wait_ready(self) -> None:
        import psycopg2

        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited {self.proc.returncode}: {self.log_tail()}")
            try:
                self.connect().close()
                return
            except psycopg2.OperationalError:
                try:  # poll interval while the server starts, not a timing assumption
                    self.proc.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
        raise RuntimeError(f"postgres did not accept connections in {READY_TIMEOUT_S:.0f}s")

    def stop(self) -> None:
        """Fast shutdown (SIGINT: open sessions are rolled back and cut), then the group."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group, if any
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=STOP_TIMEOUT_S)

    def restart(self) -> None:
        """What `pg_ctl restart -m fast` does: stop, then start on the same data and port."""
        self.stop()
        self.start()
        self.restarts += 1

    def create_database(self, prefix: str = "t") -> str:
        """A fresh, empty database; its name."""
        name = f"{prefix}_{next(self._names)}"
        conn = self.connect()
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return name

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, chars: int = 2000) -> str:
        path = self.root / "postgres.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def start_postgres(port: int) -> Postgres:
    """initdb in a fresh temporary folder and start the server; skips/fails when impossible."""
    pytest.importorskip("psycopg2")
    bin_dir = server_binaries()
    if bin_dir is None:
        missing("PostgreSQL server binaries (initdb, postgres) are not installed")
    user = None
    root = Path(tempfile.mkdtemp(prefix="ticketsmith-pg-"))
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            missing("running as root and there is no `postgres` user to run PostgreSQL")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        user = "postgres"
    server = Postgres(bin_dir, root, port, user)
    server.initdb()
    server.start()
    return server
