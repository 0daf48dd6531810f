"""Shared fixtures: the repo root, tiny configs, a real `mlflow server` process, the
default Ctrl-C handling for tests that send SIGINT, and brief serving-benchmark timing for tests
that are not about the timing. Also how the README's command
(`-n 2 --dist loadfile`) shares the suite: files with slow tests first, each worker on cores of
its own, torch at one thread (checked by tests/test_suite_order.py)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ticketsmith.base.processes import start_group, stop_group

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, timeout_s: float = 90.0) -> None:
    """Poll `url` until it answers 200; fail early if the process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        proc_wait = 0.2  # poll interval, not a timing assumption: we loop until ready
        try:
            proc.wait(timeout=proc_wait)
        except subprocess.TimeoutExpired:
            pass
    raise RuntimeError(f"{url} did not answer within {timeout_s}s")


def load_benchmark(name: str):
    """Import benchmarks/<name>.py (not a package) so tests call its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def stop(proc: subprocess.Popen) -> None:
    """End a server started with `start_group` and every process it started (its group):
    SIGTERM, then SIGKILL for what is left after 20 s."""
    stop_group(proc)


# A background job of a non-interactive shell starts with SIGINT ignored, and children inherit
# that (POSIX): Python then installs no KeyboardInterrupt handler. A test that sends SIGINT runs
# its child through this one-line exec wrapper, which gives back the default handling.
_SIGINT_DEFAULT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                   "os.execvp(sys.argv[1], sys.argv[1:])")


def with_default_sigint(cmd: list[str]) -> list[str]:
    """`cmd` started with SIGINT at its default, however this test process was started."""
    return [sys.executable, "-S", "-c", _SIGINT_DEFAULT, *cmd]


@pytest.fixture()
def default_sigint():
    """Python's own SIGINT handler (KeyboardInterrupt) in this process for one test, also when
    the suite was started with SIGINT ignored; the handling before is put back after."""
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


# Timing rounds for tests about what a serving benchmark records, ships and reports, not about
# its numbers: `--quick`'s 20 rounds of 3 ms turns (after 3 warm-up calls) time each of ~10
# formats at two batch sizes per level, and were most of a benchmarked tiny experiment's CPU time.
BRIEF_TIMING = {"trials": 3, "warmup": 1, "block_s": 0.001}


@pytest.fixture(scope="module")
def brief_benchmark():
    """In-process serving benchmarks (`experiment.benchmark=true`) of this module at
    `BRIEF_TIMING`: every format is still built, checked against the masked model, timed side
    by side with dense and its noise floor; the plan still ranks measured routes and ships."""
    from ticketsmith.serving import benchmark

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(benchmark, "QUICK", {**benchmark.QUICK, **BRIEF_TIMING})
        yield


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture()
def tiny_overrides(tmp_path: Path) -> list[str]:
    """Overrides that keep a tiny experiment's files inside the test's tmp dir."""
    return [f"experiment.output_dir={tmp_path / 'runs'}"]


@pytest.fixture()
def sqlite_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite tracking store, also made the process default for MLflow's fluent API."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # local artifacts (./mlruns) land in tmp too
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` on a free localhost port, with proxied artifact storage."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = start_mlflow_server(root, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def start_mlflow_server(root: Path, port: int, backend_store_uri: str | None = None,
                        jobs: bool = False) -> subprocess.Popen:
    """`mlflow server` on `port` with its store in `root` (SQLite, or `backend_store_uri`, +
    proxied artifacts), once it answers, in a process group of its own (`stop` ends it with its
    uvicorn, job runner and huey consumers). Starting it again on the same root and port serves
    the same store. MLflow's job runner (eight processes that each import MLflow, about 16 s of
    CPU per start) is off unless `jobs`: tracking never uses it."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", backend_store_uri or f"sqlite:///{root / 'server.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    with open(root / "server.log", "a") as log:
        proc = start_group(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                           env={**os.environ, "MLFLOW_TRACKING_URI": "",
                                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": str(jobs).lower()})
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc, timeout_s=300)  # a loaded CI box
    except RuntimeError:
        stop(proc)
        raise
    return proc


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL server per test session (initdb once, seconds): tests/postgres.py.
    Skipped without PostgreSQL's server binaries, except in CI (CI=true), where it fails."""
    from postgres import start_postgres

    server = start_postgres(free_port())
    try:
        yield server
    finally:
        server.close()


@pytest.fixture()
def postgres_url(postgres) -> str:
    """A fresh, empty database on the session's PostgreSQL server (SQLAlchemy URL)."""
    return postgres.url(postgres.create_database())


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tests train tiny models, where a second OpenMP thread only adds contention (on a busy
    2-core machine, 10x slower). Set again for every module, before its own fixtures: loading
    a served model sets torch's process-wide thread count to the plan's, and a later module's
    tiny training at two threads sums in another order (its gates flipped)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    """Keep the file order `pytest_collection_modifyitems` gives, and give each xdist worker
    cores of its own."""
    # pytest-xdist (3.5 on) re-sorts the files by their number of tests before handing them
    # out, unless told not to: that undid the slow-first order below (a 1-test slow file
    # went last).
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    own_cores()


def own_cores() -> None:
    """Pin this xdist worker, and every process it starts, to its share of the cores.

    Unpinned, each of two workers on two cores sees both: torch and ONNX Runtime start two
    threads each (the pipeline's benchmark uses every core it may run on), four threads fight
    for two cores, and the benchmark's noise check then measures each level a second time.
    Outside xdist, or with more workers than cores, nothing changes."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if not worker.startswith("gw") or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) // count if count else 0
    if share >= 1:
        index = int(worker[2:])
        os.sched_setaffinity(0, cores[index * share:(index + 1) * share])


def pytest_collection_modifyitems(config, items):
    """Files holding `slow` tests run first. The README's command hands whole files to two
    workers in collection order (`-n 2 --dist loadfile`): a long file handed out last keeps
    one worker busy while the other has nothing left to do. The sort is stable, so each file's
    tests keep their order and stay together."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


def invoke(base: str, payload: dict) -> tuple[int, dict]:
    """POST `payload` to a served model's /invocations: (HTTP status, JSON body)."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{base}/invocations", json.dumps(payload).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
