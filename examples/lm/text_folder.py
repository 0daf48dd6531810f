"""Bring your own text: a folder of UTF-8 files as a byte-level `TextData` for `data.factory`.

Used by the tests (the repository's own docs as a small real corpus) and as a worked example
of `data.factory` for language models. Whole documents are held out: file i goes to test when
i % every == 0, to validation when i % every == 1, to training otherwise, so no text appears
in two splits. The built-in corpora (`data.name: sotu | shakespeare | text`) come from
ticketsmith.engine.text; this module only needs its fields.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to train, exact round trip."""

    name, vocab_size = "byte", 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def digest(self) -> str:
        return "byte"


@dataclass(frozen=True)
class FolderText:
    name: str
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    split_bytes: dict[str, int]
    documents: dict[str, list[str]]
    source: str
    digest: str
    tokenizer: ByteTokenizer = field(default_factory=ByteTokenizer)


def text_folder(path: str, pattern: str = "*.md", max_bytes: int | None = None,
                every: int = 10) -> FolderText:
    """The files matching `pattern` under `path` (sorted), each cut to `max_bytes` bytes."""
    files = sorted(Path(path).rglob(pattern))
    if len(files) < 3:
        raise ValueError(f"{path}: {len(files)} files match {pattern!r}; need at least 3")
    docs = [f.read_bytes()[:max_bytes].decode("utf-8", errors="ignore") for f in files]
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for i, doc in enumerate(docs):
        splits["test" if i % every == 0 else "val" if i % every == 1 else "train"].append(doc)
    streams = {s: "\n\n".join(d).encode("utf-8") for s, d in splits.items()}
    digest = hashlib.sha256(b"".join(streams.values())).hexdigest()
    return FolderText(Path(path).name, *(torch.tensor(list(streams[s]), dtype=torch.int64)
                                         for s in ("train", "val", "test")),
                      {s: len(b) for s, b in streams.items()}, splits, f"folder:{path}", digest)
