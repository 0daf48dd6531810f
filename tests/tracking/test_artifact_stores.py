"""Artifacts in Azure Blob Storage (wasbs://) and Google Cloud Storage (gs://), for real, against
local emulators: Azurite (npm `azurite`) and gcp-storage-emulator (PyPI, via
STORAGE_EMULATOR_HOST). Each emulator is started on a free port by tests/emulators.py.

What is exercised is MLflow's own artifact repositories (AzureBlobArtifactRepository with the
connection string from AZURE_STORAGE_CONNECTION_STRING; GCSArtifactRepository with
google-cloud-storage) chosen by the experiment's artifact location alone, and then a real
TicketSmith experiment through ticketsmith.tracking.MlflowTracker: it logs, its local run
directory is deleted, and a rerun trains nothing because finished levels come back from the
store. A > 8 MiB artifact takes google-cloud-storage's resumable-upload path (it switches from
one multipart request to a resumable session above 8 MiB).
"""
from __future__ import annotations

import filecmp
import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path

import pytest

from emulators import (AZURE_CONTAINER, AZURITE_ACCOUNT, AZURITE_KEY, GCS_BUCKET, Emulator,
                       azurite, gcs_emulator)  # noqa: F401  (fixtures)

mlflow = pytest.importorskip("mlflow")

REPO = Path(__file__).resolve().parents[2]
BIG_BYTES = 9 * 1024 * 1024 + 123  # > 8 MiB: resumable upload on GCS; odd size catches truncation


# --- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One SQLite tracking store for the module (creating one costs seconds)."""
    path = tmp_path_factory.mktemp("tracking") / "mlflow.db"
    uri = f"sqlite:///{path}"
    mlflow.MlflowClient(uri).search_experiments()  # create the schema once, up front
    return uri


@pytest.fixture(params=["azure", "gcs"])
def store(request, monkeypatch, tracking_uri):
    """(name, artifact root URI, emulator) with the store's credentials in os.environ only."""
    if request.param == "azure":
        emu: Emulator = request.getfixturevalue("azurite")
        root = f"wasbs://{AZURE_CONTAINER}@{AZURITE_ACCOUNT}.blob.core.windows.net/ts-{uuid.uuid4().hex[:8]}"
    else:
        emu = request.getfixturevalue("gcs_emulator")
        root = f"gs://{GCS_BUCKET}/ts-{uuid.uuid4().hex[:8]}"
    for k, v in emu.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    yield request.param, root, emu
    mlflow.set_tracking_uri(previous)


def native_listing(name: str, root: str, emu: Emulator) -> dict[str, int]:
    """Object key → size under `root`, read with the cloud SDK itself (not through MLflow)."""
    if name == "azure":
        from azure.storage.blob import BlobServiceClient

        prefix = root.split(".blob.core.windows.net/", 1)[1]
        client = BlobServiceClient.from_connection_string(emu.env["AZURE_STORAGE_CONNECTION_STRING"])
        blobs = client.get_container_client(AZURE_CONTAINER).list_blobs(name_starts_with=prefix)
        return {b.name: b.size for b in blobs}
    from google.cloud import storage

    prefix = root.split(f"gs://{GCS_BUCKET}/", 1)[1]
    client = storage.Client(project="ticketsmith-test")
    return {b.name: b.size for b in client.list_blobs(GCS_BUCKET, prefix=prefix)}


def secret_values(emu: Emulator) -> list[str]:
    """Strings that must never show up in run data or logs."""
    values = [v for v in emu.env.values() if "AccountKey=" in v]
    return values + ([AZURITE_KEY] if values else [])


def assert_no_secrets(run, emu: Emulator, *texts: str) -> None:
    for secret in secret_values(emu):
        for where, data in (("params", run.data.params), ("tags", run.data.tags)):
            for k, v in data.items():
                assert secret not in v and secret not in k, f"credential leaked into {where}.{k}"
        for text in texts:
            assert secret not in text, "credential leaked into logs/output"


def make_tree(root: Path) -> dict[str, bytes]:
    """A small nested tree of files (name → bytes) like a level's run directory."""
    files = {
        "metrics.json": b'{"test_accuracy": 0.97}\n',
        "curve.json": b"[]\n",
        "nested/deeper/mask.bin": os.urandom(4096),
        "nested/empty-ish.txt": b"x",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


# --- MLflow level: log, list, download, byte-compare -------------------------------------

def test_artifacts_round_trip_through_emulator(store, tmp_path, monkeypatch, caplog, capfd):
    name, root, emu = store
    caplog.set_level(logging.DEBUG)  # SDK request logs included: they must not carry secrets
    uploads = {"resumable": 0}
    if name == "gcs":
        from google.cloud.storage import blob as gcs_blob

        original = gcs_blob.Blob._do_resumable_upload

        def counting(self, *args, **kwargs):
            uploads["resumable"] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(gcs_blob.Blob, "_do_resumable_upload", counting)

    big = tmp_path / "checkpoint.safetensors"
    big.write_bytes(os.urandom(BIG_BYTES))
    tree = tmp_path / "run"
    files = make_tree(tree)

    exp_id = mlflow.create_experiment(f"roundtrip-{name}-{uuid.uuid4().hex[:6]}",
                                      artifact_location=root)
    with mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.log_params({"store": name, "train.lr": 0.01})
        mlflow.log_artifact(str(big), "checkpoints")
        mlflow.log_artifacts(str(tree), "run")
        mlflow.log_text("hello", "notes/hello.txt")
    run_id = run.info.run_id
    assert run.info.artifact_uri.startswith(root + "/"), run.info.artifact_uri
    if name == "gcs":
        assert uploads["resumable"] >= 1, "the > 8 MiB file should use the resumable upload path"

    # Listed back through MLflow (recursively) with sizes ...
    listed = {}
    pending = [None]
    while pending:
        for info in mlflow.artifacts.list_artifacts(run_id=run_id, artifact_path=pending.pop()):
            if info.is_dir:
                pending.append(info.path)
            else:
                listed[info.path] = info.file_size
    expected = {"checkpoints/checkpoint.safetensors": BIG_BYTES, "notes/hello.txt": 5,
                **{f"run/{k}": len(v) for k, v in files.items()}}
    assert listed == expected

    # ... present in the emulator itself, under the experiment's location ...
    objects = native_listing(name, root, emu)
    big_keys = [k for k in objects if k.endswith("checkpoints/checkpoint.safetensors")]
    assert len(big_keys) == 1 and objects[big_keys[0]] == BIG_BYTES
    assert run_id in big_keys[0]

    # ... and downloaded byte for byte into an empty directory.
    out = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(tmp_path / "dl")))
    assert filecmp.cmp(out / "checkpoints" / "checkpoint.safetensors", big, shallow=False)
    for rel, data in files.items():
        assert (out / "run" / rel).read_bytes() == data
    assert (out / "notes" / "hello.txt").read_text() == "hello"

    captured = capfd.readouterr()
    assert_no_secrets(mlflow.get_run(run_id), emu, caplog.text, captured.out, captured.err)


def test_missing_object_is_a_clear_error(store, tmp_path):
    """Asking a store for an artifact that is not there fails loudly, never with empty data."""
    name, root, _ = store
    exp_id = mlflow.create_experiment(f"missing-{name}-{uuid.uuid4().hex[:6]}",
                                      artifact_location=root)
    with mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.log_text("x", "present.txt")
    with pytest.raises(mlflow.exceptions.MlflowException, match="absent.bin"):
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="absent.bin",
                                            dst_path=str(tmp_path / "dl"))
    assert not (tmp_path / "dl" / "absent.bin").exists()


# --- TicketSmith level: a real experiment, resumed from the store alone ------------------

def tiny_config(tmp_path: Path, name: str):
    from ticketsmith.base.config import load_config

    # configs/tiny.yaml, cut to dense + one pruned level of tickets and shorter training so the
    # two stores together stay within seconds; everything else is the shipped smoke config.
    return load_config(REPO / "configs" / "tiny.yaml", [
        f"experiment.output_dir={tmp_path / 'runs'}", f"experiment.name={name}",
        "prune.levels=1", "experiment.variants=[ticket]", "train.iterations=40",
        "train.eval_every=20", "tracking.register_model=false"])


def checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_experiment_resumes_from_cloud_store(store, tmp_path, capfd):
    from mlflow import MlflowClient

    from ticketsmith.engine.lottery import run_experiment
    from ticketsmith.tracking.tracker import MlflowTracker

    name, root, emu = store
    cfg = tiny_config(tmp_path, f"tiny-{name}-{uuid.uuid4().hex[:6]}")
    lines: list[str] = []

    def tracker() -> MlflowTracker:  # a fresh one per attempt, as in a new pod
        return MlflowTracker(MlflowClient(mlflow.get_tracking_uri()), artifact_location=root,
                             echo=lines.append)

    first = run_experiment(cfg, tracker=tracker(), progress=False, echo=lines.append)
    assert sorted(first.trained) == [(0, 0, "dense"), (0, 1, "ticket")]
    before = checksums(first.run_root / "replicate_0")
    objects = native_listing(name, root, emu)
    assert sum(k.endswith("checkpoint.safetensors") for k in objects) >= 2, sorted(objects)

    shutil.rmtree(first.run_root)  # the pod and its disk are gone
    second = run_experiment(cfg, tracker=tracker(), progress=False, echo=lines.append)

    assert second.trained == []
    key = lambda r: (r["replicate"], r["level"], r["variant"])  # noqa: E731
    assert ([(key(r), r["test_accuracy"], r["density"]) for r in second.records]
            == [(key(r), r["test_accuracy"], r["density"]) for r in first.records])
    after = checksums(second.run_root / "replicate_0")
    for rel in ("level_0/dense/checkpoint.safetensors", "level_1/ticket/checkpoint.safetensors",
                "level_1/ticket/metrics.json", "init.safetensors"):
        assert after.get(rel) == before[rel], f"{rel} not recovered byte for byte"

    client = MlflowClient(mlflow.get_tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name(cfg.experiment.name).experiment_id])
    assert runs and all(r.info.artifact_uri.startswith(root + "/") for r in runs)
    captured = capfd.readouterr()
    for run in runs:
        assert_no_secrets(run, emu, "\n".join(lines), captured.out, captured.err)
