"""Local cloud-storage emulators for tests: Azurite (Azure Blob) and gcp-storage-emulator (GCS).

Each emulator runs as a child process on a free loopback port. Readiness is decided by polling
its HTTP endpoint (no fixed sleeps); the process is stopped at fixture teardown. A test that
needs an emulator that is not installed is skipped with the install command in the reason.

    bash .ci/install-services.sh       # Azurite (npm, pinned) into .ci/node
    pip install -e '.[test]'           # gcp-storage-emulator, azure-storage-blob, ...

Credentials here are the emulators' published development defaults (Azurite's well-known
`devstoreaccount1` key; GCS emulator needs none). They are treated as secrets anyway, so tests
can check that nothing leaks them into MLflow params, tags or logs.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from ticketsmith.base.processes import start_group, stop_group

REPO = Path(__file__).resolve().parents[1]
NODE_PREFIX = Path(os.environ.get("TICKETSMITH_NODE_PREFIX") or REPO / ".ci" / "node")

# Azurite's documented development account (public, the same in every Azurite install).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/"
               "K1SZFPTOtr/KBHBeksoGMGw==")

READY_TIMEOUT_S = 60.0   # first start of node can be slow on a cold 2-core machine
START_ATTEMPTS = 3       # a free port can be taken between probing and binding: retry


class EmulatorError(RuntimeError):
    """An emulator did not start or answer; the message carries the tail of its log."""


@dataclass
class Emulator:
    name: str
    proc: subprocess.Popen
    host: str
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)  # what a client needs in os.environ

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """End the emulator and whatever it started (its process group)."""
        stop_group(self.proc, grace_s=10)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_http(emu: Emulator, path: str, timeout: float = READY_TIMEOUT_S) -> None:
    """Poll `path` until the emulator answers any HTTP status; fail early if it exits."""
    url = emu.endpoint + path
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # an HTTP error status is still an answer: the server is up
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise EmulatorError(f"{emu.name} did not answer {url} within {timeout:.0f}s; "
                                f"log tail:\n{emu.log_tail()}")
        try:
            # Waiting on the process doubles as the poll interval and notices an early exit.
            code = emu.proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            delay = min(delay * 2, 0.25)
            continue
        raise EmulatorError(f"{emu.name} exited with code {code} before it was ready; "
                            f"log tail:\n{emu.log_tail()}")


def _start(name: str, argv_for_port: Callable[[int], list[str]], ready_path: str, log_dir: Path,
           cwd: Path, env_for: Callable[[Emulator], dict[str, str]]) -> Emulator:
    last: Exception | None = None
    for attempt in range(START_ATTEMPTS):
        port = free_port()
        log_path = log_dir / f"{name}-{attempt}.log"
        log = open(log_path, "wb")
        proc = start_group(argv_for_port(port), cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL)
        log.close()  # the child holds its own handle
        emu = Emulator(name, proc, "127.0.0.1", port, log_path)
        try:
            wait_http(emu, ready_path)
        except EmulatorError as exc:
            emu.stop()
            last = exc
            continue
        emu.env = env_for(emu)
        return emu
    raise EmulatorError(f"{name} failed to start {START_ATTEMPTS} times: {last}")


# --- Azurite ------------------------------------------------------------------------------

def azurite_binary() -> Path | None:
    """`azurite-blob` from TICKETSMITH_AZURITE, .ci/node (install-services.sh) or PATH."""
    candidates = [os.environ.get("TICKETSMITH_AZURITE"),
                  str(NODE_PREFIX / "node_modules" / ".bin" / "azurite-blob"),
                  shutil.which("azurite-blob")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    return None


def azurite_connection_string(endpoint: str) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};")


def start_azurite(workdir: Path) -> Emulator:
    binary = azurite_binary()
    if binary is None:
        raise FileNotFoundError("azurite-blob not found; run `bash .ci/install-services.sh`")
    workdir.mkdir(parents=True, exist_ok=True)

    def argv(port: int) -> list[str]:
        # In-memory blobs (bounded) and no telemetry: nothing leaves the machine or the test.
        return [str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(port),
                "--inMemoryPersistence", "--extentMemoryLimit", "512", "--silent",
                "--skipApiVersionCheck", "--loose", "--disableTelemetry"]

    return _start("azurite", argv, f"/{AZURITE_ACCOUNT}?comp=list", workdir, workdir,
                  lambda e: {"AZURE_STORAGE_CONNECTION_STRING": azurite_connection_string(e.endpoint)})


# --- GCS emulator -------------------------------------------------------------------------

def gcs_emulator_available() -> bool:
    try:
        import gcp_storage_emulator  # noqa: F401
        import google.cloud.storage  # noqa: F401
    except ImportError:
        return False
    return True


def start_gcs_emulator(workdir: Path, bucket: str) -> Emulator:
    """gcp-storage-emulator (PyPI): JSON API incl. multipart and resumable uploads, in memory."""
    if not gcs_emulator_available():
        raise FileNotFoundError("gcp-storage-emulator / google-cloud-storage not installed; "
                                "pip install -e '.[test]'")
    workdir.mkdir(parents=True, exist_ok=True)

    def argv(port: int) -> list[str]:
        return [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                "--port", str(port), "--in-memory", "--default-bucket", bucket, "--quiet"]

    return _start("gcs-emulator", argv, "/storage/v1/b", workdir, workdir,
                  lambda e: {"STORAGE_EMULATOR_HOST": e.endpoint,
                             "GOOGLE_CLOUD_PROJECT": "ticketsmith-test"})


# --- pytest fixtures ----------------------------------------------------------------------

def _missing(reason: str) -> None:
    """Skip on a developer machine; fail in CI, where .ci/run installs every emulator."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} -- CI must install it (.ci/install-services.sh, test extra)")
    pytest.skip(reason)


AZURE_CONTAINER = "ticketsmith"
GCS_BUCKET = "ticketsmith-artifacts"


@pytest.fixture(scope="session")
def azurite(tmp_path_factory) -> Iterator[Emulator]:
    """A running Azurite with the container `AZURE_CONTAINER` created."""
    if azurite_binary() is None:
        _missing("Azurite is not installed (run `bash .ci/install-services.sh`)")
    try:
        from azure.storage.blob import BlobServiceClient
    except ImportError:
        _missing("azure-storage-blob is not installed (pip install -e '.[test]')")
    emu = start_azurite(tmp_path_factory.mktemp("azurite"))
    try:
        client = BlobServiceClient.from_connection_string(
            emu.env["AZURE_STORAGE_CONNECTION_STRING"])
        client.create_container(AZURE_CONTAINER)
        yield emu
    finally:
        emu.stop()


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory) -> Iterator[Emulator]:
    """A running GCS emulator with the bucket `GCS_BUCKET` created."""
    if not gcs_emulator_available():
        _missing("gcp-storage-emulator / google-cloud-storage not installed "
                    "(pip install -e '.[test]')")
    emu = start_gcs_emulator(tmp_path_factory.mktemp("gcs"), GCS_BUCKET)
    try:
        yield emu
    finally:
        emu.stop()
