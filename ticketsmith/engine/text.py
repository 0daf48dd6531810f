"""Text data for language modelling: documents, whole-document splits, token ids on the device.

Splits hold out whole documents, never parts of one: documents are sorted by name and, of every
``holdout_every`` (N) of them, the second-last goes to validation and the last to test (position
i, counting from 0: i % N == N-2 → val, i % N == N-1 → test, the rest train). A single text file
is first cut into documents of about ``chunk_bytes`` bytes at line ends, named ``FILE#00000``...
A slice for quick runs (``max_documents``, ``max_bytes``) keeps the first whole documents in
name order, so every kept document stays in its split. Each split's documents are tokenised one
by one (no token spans two documents) and joined.

The tokenised splits are cached under ``<root>/text-cache/<key>.pt`` (key: the corpus content,
the split and the tokenizer asked for), written atomically, so a second load reads one file.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from ticketsmith.base.errors import DataError
from ticketsmith.base.files import atomic_write
from ticketsmith.base.textfiles import content_digest, local_path, text_files
from ticketsmith.engine.corpora import corpus_texts, pinned_names
from ticketsmith.engine.tokenizer import (ByteTokenizer, Tokenizer, from_json, load_tokenizer,
                                          train_bpe)

log = logging.getLogger("ticketsmith.data")

TEXT_DATASETS = ("sotu", "shakespeare", "text")  # "text" = bring your own (data.path)
SPLITS = ("train", "val", "test")
_CACHE_FORMAT = 1  # bump when what a cache file holds changes

__all__ = ["TEXT_DATASETS", "TextData", "load_text", "load_tokenizer", "split_documents"]


@dataclass(frozen=True)
class TextData:
    name: str
    train: torch.Tensor  # 1-D int64 token ids of the training documents, joined
    val: torch.Tensor
    test: torch.Tensor
    split_bytes: dict[str, int]  # UTF-8 bytes of each split's text: bits/byte = nats / (ln 2 * bytes)
    documents: dict[str, list[str]]  # document names per split; no document is in two splits
    tokenizer: Tokenizer
    source: str  # where the text came from (package==version and archive, or path)
    digest: str  # sha256 over the documents' content per split and the tokenizer


def split_documents(names: list[str], holdout_every: int) -> dict[str, list[str]]:
    """Document names (already in name order) → {"train", "val", "test"}: see the module doc."""
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for i, name in enumerate(names):
        r = i % holdout_every
        out["val" if r == holdout_every - 2 else "test" if r == holdout_every - 1 else "train"].append(name)
    return out


def load_text(cfg_data, *, device: str | torch.device = "cpu") -> TextData:
    """Load text data set ``cfg_data.name`` (a DataConfig) as token ids on ``device``."""
    if cfg_data.name not in TEXT_DATASETS:
        raise DataError(f"data.name={cfg_data.name!r}: not a text data set; expected one of "
                        f"{', '.join(TEXT_DATASETS)}")
    cache = Path(cfg_data.root) / "text-cache" / f"{_cache_key(cfg_data)}.pt"
    data = _read_cache(cache) or _build(cfg_data, cache)
    return TextData(**{**data.__dict__, **{s: getattr(data, s).to(device) for s in SPLITS}})


def _cache_key(cfg) -> str:
    corpus = content_digest(cfg.path) if cfg.name == "text" else \
        hashlib.sha256(json.dumps(pinned_names(cfg.name), sort_keys=True).encode()).hexdigest()
    spec = {"format": _CACHE_FORMAT, "corpus": corpus, "holdout_every": cfg.holdout_every,
            "max_documents": cfg.max_documents, "max_bytes": cfg.max_bytes, "tokenizer": cfg.tokenizer,
            "vocab_size": cfg.vocab_size if cfg.tokenizer == "bpe" else None,
            "chunk_bytes": cfg.chunk_bytes if cfg.name == "text" else None}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def _documents(cfg) -> tuple[dict[str, str], str]:
    """Document name → text, for the whole corpus, and where it came from."""
    if cfg.name != "text":
        raw, source = corpus_texts(cfg.name, cfg.root)
        return {doc: data.decode("utf-8") for doc, data in raw.items()}, source
    files = text_files(cfg.path)
    texts = {name: _read_utf8(file) for name, file in files}
    if local_path(cfg.path).is_file():  # one file: cut into documents
        texts = _chunk(files[0][0], texts[files[0][0]], cfg.chunk_bytes)
    return texts, str(cfg.path)


def _read_utf8(file: Path) -> str:
    try:
        data = file.read_bytes()
    except OSError as e:
        raise DataError(f"{file}: cannot read ({e.strerror}); expected a UTF-8 text file") from None
    if not data.strip():
        raise DataError(f"{file}: empty; expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: not UTF-8 (invalid byte at offset {e.start}); expected a UTF-8 text "
                        "file (convert it, e.g. iconv -t UTF-8)") from None


def _chunk(name: str, text: str, chunk_bytes: int) -> dict[str, str]:
    """One file's text cut at line ends into documents of at least ``chunk_bytes`` UTF-8 bytes
    (the last may be shorter)."""
    chunks, lines, size = [], [], 0
    for line in text.splitlines(keepends=True):
        lines.append(line)
        size += len(line.encode("utf-8"))
        if size >= chunk_bytes:
            chunks.append("".join(lines))
            lines, size = [], 0
    if lines:
        chunks.append("".join(lines))
    return {f"{name}#{i:05d}": c for i, c in enumerate(chunks)}


def _select(cfg, texts: dict[str, str]) -> list[str]:
    """The names kept by max_documents / max_bytes: the first whole documents in name order."""
    names = sorted(texts)
    if cfg.max_documents is not None:
        names = names[:cfg.max_documents]
    if cfg.max_bytes is not None:
        total, kept = 0, []
        for name in names:
            total += len(texts[name].encode("utf-8"))
            if total > cfg.max_bytes:
                break
            kept.append(name)
        names = kept
    return names


def _build(cfg, cache: Path) -> TextData:
    texts, source = _documents(cfg)
    documents = split_documents(_select(cfg, texts), cfg.holdout_every)
    empty = [s for s in SPLITS if not documents[s]]
    if empty:
        kept = sum(len(v) for v in documents.values())
        every = cfg.holdout_every
        raise DataError(f"data: {kept} document(s) kept of {len(texts)} leave no {empty[0]} document "
                        f"(with data.holdout_every={every}, validation needs at least {every - 1} "
                        f"documents and test {every}); "
                        "raise data.max_documents / data.max_bytes, lower data.holdout_every"
                        + (" or data.chunk_bytes" if cfg.name == "text" else ""))
    split_texts = {s: [texts[d] for d in documents[s]] for s in SPLITS}
    tokenizer = train_bpe(split_texts["train"], cfg.vocab_size) if cfg.tokenizer == "bpe" else ByteTokenizer()
    ids = {s: _encode(tokenizer, split_texts[s]) for s in SPLITS}
    h = hashlib.sha256()
    for s in SPLITS:
        for d in documents[s]:
            h.update(f"{s}\0{d}\0{hashlib.sha256(texts[d].encode()).hexdigest()}\n".encode())
    h.update(tokenizer.digest().encode())
    data = TextData(name=cfg.name, **ids, documents=documents, tokenizer=tokenizer, source=source,
                    split_bytes={s: sum(len(t.encode("utf-8")) for t in split_texts[s]) for s in SPLITS},
                    digest=h.hexdigest())
    _write_cache(cache, data)
    return data


def _encode(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    if isinstance(tokenizer, ByteTokenizer):  # the bytes are the ids: no Python loop
        return torch.frombuffer(bytearray("".join(texts).encode("utf-8")), dtype=torch.uint8).long()
    return torch.tensor([i for ids in tokenizer.encode_batch(texts) for i in ids], dtype=torch.int64)


def _storage_dtype(vocab_size: int) -> torch.dtype:
    # Cache files hold ids in the smallest integer type that fits: sotu as bytes is 12 MB, not 97.
    return torch.uint8 if vocab_size <= 256 else torch.int16 if vocab_size <= 32_768 else torch.int32


def _write_cache(path: Path, data: TextData) -> None:
    dtype = _storage_dtype(data.tokenizer.vocab_size)
    meta = {"name": data.name, "split_bytes": data.split_bytes, "documents": data.documents,
            "source": data.source, "digest": data.digest, "format": _CACHE_FORMAT}
    blob = {**{s: getattr(data, s).to(dtype) for s in SPLITS}, "meta": json.dumps(meta),
            "tokenizer": data.tokenizer.to_json()}
    try:
        atomic_write(path, lambda tmp: torch.save(blob, tmp))
    except OSError as e:  # a read-only data folder only costs the next load its time
        log.warning("cannot write text cache %s: %s", path, e.strerror)


def _read_cache(path: Path) -> TextData | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        meta = json.loads(blob["meta"])
        if meta["format"] != _CACHE_FORMAT:
            return None
        return TextData(name=meta["name"], **{s: blob[s].long() for s in SPLITS},
                        split_bytes=meta["split_bytes"], documents=meta["documents"],
                        tokenizer=from_json(blob["tokenizer"], str(path)), source=meta["source"],
                        digest=meta["digest"])
    except Exception as e:  # a damaged cache is rebuilt from the verified source, never trusted
        log.warning("text cache %s unreadable (%s); rebuilding it", path, " ".join(str(e).split())[:200])
        return None
