"""Atomic file and folder writes: a reader (or a resume after a kill) never sees half of one."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) then rename over `path`, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp makes the file private (0600); run folders and the artifact copies MLflow
        # makes of them should be readable like any other output file.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (data archives are tens of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def atomic_folder(folder: Path, prefix: str = ".tmp-") -> Iterator[Path]:
    """Yield an empty folder beside `folder` to fill; when the block ends without an error it
    replaces `folder`, otherwise it is removed and `folder` is left as it was."""
    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=folder.parent if folder.parent.is_dir()
                                else None))
    try:
        yield tmp
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
