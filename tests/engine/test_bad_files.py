"""Truncated or bit-flipped checkpoints and IDX data files: one line naming the file, exit 2,
through the commands a user runs. And a config error records nothing: no MLflow experiment,
no run, no run folder."""
from __future__ import annotations

import os
import random
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ticketsmith.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ticketsmith.cli import main
from ticketsmith.engine.data import DataError, check_idx, load_dataset
from ticketsmith.engine.masks import Mask, prune_magnitude
from ticketsmith.engine.models import build_model, prunable_weights

REPO = Path(__file__).resolve().parents[2]
FLIPS = 300  # sampled single-bit flips per checkpoint (plus every byte of the header)


def ticket(path: Path, shape=(1, 8, 8), classes=4, dataset="synthetic") -> Path:
    torch.manual_seed(0)
    model = build_model("mlp", shape, classes, options={"hidden": [16]})
    weights = prunable_weights(model)
    mask = prune_magnitude(weights, Mask.ones_like(weights), dict.fromkeys(weights, 0.5))
    meta = {"model": "mlp", "factory": None, "options": {"hidden": [16]}, "exclude": [],
            "input_shape": list(shape), "num_classes": classes, "dataset": dataset}
    return save_checkpoint(path, model.state_dict(), mask, meta)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def benchmark_args(path: Path, out: Path, *extra: str) -> list[str]:
    return ["benchmark", "--checkpoint", str(path), "--quick", "--trials", "2", "--batch-sizes",
            "1", "--formats", "compacted", "--output", str(out), *extra]


# --- checkpoints ------------------------------------------------------------------------------

def corrupt_variants(good: bytes, rng: random.Random):
    header = 8 + struct.unpack("<Q", good[:8])[0]
    for cut in sorted({0, 1, 7, 8, 9, header // 2, header - 1, header, header + 1,
                       (header + len(good)) // 2, len(good) - 1}):
        yield f"truncated at {cut}", good[:cut]
    positions = list(range(header)) + rng.sample(range(header, len(good)), k=FLIPS)
    for pos in positions:
        flipped = bytearray(good)
        flipped[pos] ^= 1 << rng.randrange(8)
        yield f"bit flip at {pos}", bytes(flipped)


def test_every_truncation_and_bit_flip_is_refused_or_harmless(tmp_path):
    good_path = ticket(tmp_path / "good.safetensors")
    good = load_checkpoint(good_path)
    refused = harmless = 0
    for i, (what, data) in enumerate(corrupt_variants(good_path.read_bytes(), random.Random(0))):
        path = tmp_path / f"corrupt-{i}.safetensors"
        path.write_bytes(data)
        try:
            ck = load_checkpoint(path)
        except CheckpointError as exc:
            msg = str(exc)
            assert msg.startswith(str(path)) and "\n" not in msg, (what, msg)
            refused += 1
            continue
        # Only a flip in the header's padding or JSON whitespace may load: same content.
        assert ck.meta == good.meta, what
        assert all(torch.equal(ck.state[k], good.state[k]) for k in good.state), what
        harmless += 1
    assert refused > 300 and harmless < refused, (refused, harmless)


@pytest.mark.parametrize("damage", ["truncate", "flip-data", "flip-header"])
def test_benchmark_cli_refuses_a_corrupt_checkpoint_with_exit_2(tmp_path, damage, capsys):
    path = ticket(tmp_path / "corrupt.safetensors")
    data = bytearray(path.read_bytes())
    header = 8 + struct.unpack("<Q", data[:8])[0]
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) - 9 if damage == "flip-data" else header // 2] ^= 0x10
    path.write_bytes(bytes(data))
    assert main(benchmark_args(path, tmp_path / "b.json", "--no-data")) == 2
    assert str(path) in one_line(capsys.readouterr().err)
    assert not (tmp_path / "b.json").exists()


def test_the_installed_command_exits_2_with_one_line(tmp_path):
    path = ticket(tmp_path / "corrupt.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    proc = subprocess.run([sys.executable, "-m", "ticketsmith", *benchmark_args(
        path, tmp_path / "b.json", "--no-data")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert str(path) in one_line(proc.stderr) and proc.stdout == ""


# --- IDX data files ---------------------------------------------------------------------------

def idx(kind: str, n: int, rng: random.Random) -> bytes:
    if kind == "images":
        return struct.pack(">BBBBIII", 0, 0, 8, 3, n, 28, 28) + bytes(rng.randrange(256)
                                                                      for _ in range(n * 784))
    return struct.pack(">BBBBI", 0, 0, 8, 1, n) + bytes(rng.randrange(10) for _ in range(n))


def fashion_root(root: Path) -> Path:
    """A small but well-formed Fashion-MNIST raw folder (torchvision reads it as is)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = random.Random(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx("images", n, rng))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(idx("labels", n, rng))
    return raw


def test_well_formed_idx_files_load(tmp_path):
    fashion_root(tmp_path)
    data = load_dataset("fashion_mnist", root=tmp_path, val_size=10)
    assert data.input_shape == (1, 28, 28) and len(data.test_x) == 20


@pytest.mark.parametrize("damage", ["truncate", "append", "flip-count", "flip-magic", "empty"])
def test_a_damaged_idx_file_is_one_line_naming_it(tmp_path, damage):
    raw = fashion_root(tmp_path)
    path = raw / "t10k-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-1]
    elif damage == "append":
        data += b"\0"
    elif damage == "flip-count":
        data[7] ^= 0x01  # the image count
    elif damage == "flip-magic":
        data[2] ^= 0x40  # the element type
    else:
        data = b""
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as info:
        check_idx(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
    with pytest.raises(DataError, match=str(path)):
        load_dataset("fashion_mnist", root=tmp_path, val_size=10)


def test_prune_with_a_truncated_idx_file_exits_2_and_writes_nothing(tmp_path, capsys):
    raw = fashion_root(tmp_path / "data")
    path = raw / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-3])
    rc = main(["prune", "--config", str(REPO / "configs" / "tiny.yaml"), "--no-tracking", "-q",
               "--set", "data.name=fashion_mnist", "--set", f"data.root={tmp_path / 'data'}",
               "--set", f"experiment.output_dir={tmp_path / 'runs'}"])
    assert rc == 2
    assert str(path) in one_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_benchmark_with_corrupt_mnist_exits_2_with_one_line(tmp_path, damage, capsys):
    """MNIST files are checked against their published SHA-256: any change is refused."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    path = raw / "t10k-images-idx3-ubyte"
    data = bytearray(idx("images", 50, random.Random(1)))
    if damage == "truncate":
        data = data[:-784]
    else:
        data[4000] ^= 0x04
    path.write_bytes(bytes(data))
    ck = ticket(tmp_path / "ck.safetensors", shape=(1, 28, 28), classes=10, dataset="mnist")
    rc = main(benchmark_args(ck, tmp_path / "b.json", "--data-root", str(tmp_path / "data")))
    assert rc == 2
    line = one_line(capsys.readouterr().err)
    assert str(path) in line and "sha256 mismatch" in line and "--no-data" in line
    assert not (tmp_path / "b.json").exists()


# --- a config error records nothing ------------------------------------------------------------

def store_rows(db: Path) -> tuple[list, list]:
    if not db.exists():
        return [], []
    with sqlite3.connect(db) as con:
        exps = [r[0] for r in con.execute("select name from experiments")]
        runs = list(con.execute("select run_uuid from runs"))
    return exps, runs


def prune_args(tmp_path: Path, override: str) -> list[str]:
    return ["prune", "-q", "--config", str(REPO / "configs" / "tiny.yaml"), "--set", override,
            "--set", f"experiment.output_dir={tmp_path / 'runs'}",
            "--report-dir", str(tmp_path / "reports")]


def assert_nothing_recorded(tmp_path: Path) -> None:
    exps, runs = store_rows(tmp_path / "mlflow.db")
    assert runs == [] and set(exps) <= {"Default"}, (exps, runs)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "reports").exists()
    assert not (tmp_path / "mlruns").exists()


def test_a_misspelt_model_leaves_no_experiment_run_or_run_folder(tmp_path):
    """The installed command, as a user would type it."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run([sys.executable, "-m", "ticketsmith",
                           *prune_args(tmp_path, "model.name=lenett")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "model.name" in one_line(proc.stderr) and "lenett" in proc.stderr
    assert_nothing_recorded(tmp_path)


@pytest.mark.parametrize("override,names", [
    ("model.factory=no_such_module_xyz:build", "model.factory"),
    ("data.factory=no_such_module_xyz:load", "data.factory"),
    ("data.name=mnistt", "data.name"),
    ("model.options={hidden: [8], depth: 3}", "model.options"),
    ("model.exclude=[no_such_layer]", "model.exclude"),
    ("prune.layer_fractions={fc9: 0.5}", "prune.layer_fractions.fc9"),
    ("prune.rewind_iteration=100000", "prune.rewind_iteration"),
])
def test_no_config_error_records_anything(tmp_path, sqlite_uri, override, names, capsys):
    assert main(prune_args(tmp_path, override)) == 2
    assert names in one_line(capsys.readouterr().err)
    assert_nothing_recorded(tmp_path)
