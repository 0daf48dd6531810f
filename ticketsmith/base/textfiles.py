"""Which files a bring-your-own text source is made of, and the digest of their content.

One owner for both facts: the config hash (base) and the text loader (engine) call these, so the
experiment's identity covers exactly the bytes that are trained on. No torch, no MLflow: a URI
other than a local path or ``file://`` must be resolved to a local copy by the caller first.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote, urlparse

from ticketsmith.base.errors import DataError
from ticketsmith.base.secrets import redact

SUFFIX = ".txt"  # the files of a folder source; anything else in the folder is ignored


def is_local(path: str) -> bool:
    """A plain path or file:// (what the engine reads itself); anything else is the caller's."""
    scheme = urlparse(path).scheme
    return scheme == "file" or len(scheme) <= 1  # one letter is a Windows drive, not a scheme


def local_path(path: str) -> Path:
    """``path`` as a local Path: a plain path or a ``file://`` URI; other schemes are refused
    (the tracking layer downloads them, e.g. MLflow artifact URIs, and passes the local copy)."""
    parsed = urlparse(path)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if not is_local(path):
        raise DataError(f"data.path: {redact(path)!r} is a {parsed.scheme}:// URI; expected a local file "
                        "or folder or file://... (download it first, e.g. with `mlflow artifacts download`)")
    return Path(path).expanduser()


def text_files(path: str) -> list[tuple[str, Path]]:
    """(document name, file) for a text source: the file itself, or every ``*.txt`` under a folder
    (recursively, sorted by relative path, which is the document name)."""
    root = local_path(path)
    if root.is_file():
        return [(root.name, root)]
    if root.is_dir():
        files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob(f"*{SUFFIX}") if p.is_file())
        if not files:
            raise DataError(f"data.path: {root} holds no {SUFFIX} file; expected UTF-8 text files")
        return files
    raise DataError(f"data.path: {root} does not exist; expected a UTF-8 text file or a folder of "
                    f"{SUFFIX} files")


def content_digest(path: str) -> str:
    """sha256 over the (name, content sha256) of every file of the source, in name order."""
    h = hashlib.sha256()
    for name, file in text_files(path):
        st = file.stat()
        h.update(f"{name}\0{_file_sha256(file, st.st_size, st.st_mtime_ns, st.st_ctime_ns)}\n".encode())
    return h.hexdigest()


@lru_cache(maxsize=1024)
def _file_sha256(file: Path, size: int, mtime_ns: int, ctime_ns: int) -> str:
    # Keyed by size and times too, so an edited file is hashed again (ctime changes even when an
    # edit restores mtime); the config hash is computed many times per run.
    h = hashlib.sha256()
    try:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        raise DataError(f"{file}: cannot read ({e.strerror}); expected a readable UTF-8 text file") from None
    return h.hexdigest()
