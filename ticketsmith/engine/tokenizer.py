"""Tokenizers for language modelling: raw UTF-8 bytes, or a byte-level BPE trained here.

Both round-trip any text exactly (``decode(encode(s)) == s``) and both are saved as one file,
``tokenizer.json``, that ``load_tokenizer`` reads back; ``digest()`` names what a model's ids mean.
The BPE is Hugging Face's ``tokenizers`` (Rust), trained on the training split only.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Protocol

from ticketsmith.base.errors import DataError
from ticketsmith.base.files import atomic_write_text

FILENAME = "tokenizer.json"
_BYTE_SPEC = {"type": "ticketsmith-byte", "version": 1}


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def digest(self) -> str: ...
    def to_json(self) -> str: ...
    def save(self, folder: str | Path) -> Path: ...


class ByteTokenizer:
    """Ids are the text's UTF-8 bytes: vocabulary 256, nothing to train."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # A model may generate byte sequences that are not UTF-8: shown as U+FFFD, never an error.
        return bytes(ids).decode("utf-8", errors="replace")

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def to_json(self) -> str:
        return _spec_json(_BYTE_SPEC)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / FILENAME
        atomic_write_text(path, self.to_json())
        return path


class BpeTokenizer:
    """A byte-level BPE (GPT-2 style: bytes first, then learned merges), no normaliser, no
    special tokens, so ids map back to exactly the input text."""

    name = "bpe"

    def __init__(self, tok) -> None:
        self._tok = tok  # tokenizers.Tokenizer
        self.vocab_size = tok.get_vocab_size()
        self._json = tok.to_str()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids))

    def digest(self) -> str:
        return hashlib.sha256(self._json.encode()).hexdigest()

    def to_json(self) -> str:
        return self._json

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / FILENAME
        atomic_write_text(path, self._json)
        return path


def _spec_json(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise DataError("data.tokenizer: 'bpe' needs the `tokenizers` package (pip install "
                        "tokenizers); or use data.tokenizer 'byte'") from None
    return tokenizers


def train_bpe(texts: Iterable[str], vocab_size: int) -> BpeTokenizer:
    """A byte-level BPE of ``vocab_size`` ids (256 bytes + merges) trained on ``texts``.

    Deterministic for the same texts in the same order (the trainer breaks count ties by the
    pair itself).
    """
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    # add_prefix_space=False and no normaliser: decode(encode(s)) is s, byte for byte.
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return BpeTokenizer(tok)


def from_json(text: str, source: str = FILENAME) -> Tokenizer:
    """The tokenizer a ``tokenizer.json`` text describes (what ``save`` wrote)."""
    try:
        spec = json.loads(text)
    except ValueError:
        raise DataError(f"{source}: not a tokenizer (not JSON); expected what Tokenizer.save wrote") from None
    if spec == _BYTE_SPEC:
        return ByteTokenizer()
    if not isinstance(spec, dict) or "model" not in spec:
        raise DataError(f"{source}: not a tokenizer; expected a byte tokenizer or a BPE tokenizer.json")
    try:
        return BpeTokenizer(_tokenizers().Tokenizer.from_str(text))
    except Exception as e:  # the Rust parser's own message says what is wrong
        raise DataError(f"{source}: not a BPE tokenizer ({' '.join(str(e).split())[:200]})") from None


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer ``Tokenizer.save(folder)`` wrote (``folder`` may also be the file itself)."""
    path = Path(folder)
    path = path / FILENAME if path.is_dir() else path
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read tokenizer ({getattr(e, 'strerror', None) or 'not UTF-8'}); "
                        "expected the tokenizer.json a run saved") from None
    return from_json(text, str(path))
