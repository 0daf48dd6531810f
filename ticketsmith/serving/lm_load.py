"""A language-model checkpoint with the tokenizer it was trained with, for generation and the
tokens-per-second benchmark. Image checkpoints are refused here, in one line."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ticketsmith.engine.generate import GenerationError
from ticketsmith.engine.store import RunStore
from ticketsmith.engine.tokenizer import ByteTokenizer, load_tokenizer
from ticketsmith.serving.benchmark import load_ticket

LM_TASK = "language_model"


def is_language_model(meta: dict[str, Any]) -> bool:
    return meta.get("task") == LM_TASK


def is_checkpoint_of_lm(path: str | Path) -> bool:
    """Whether a local checkpoint file holds a language model."""
    from ticketsmith.engine.checkpoint import load_checkpoint

    return is_language_model(load_checkpoint(path).meta)


def tokenizer_for(checkpoint: Path, meta: dict[str, Any]):
    """The experiment's saved tokenizer (next to a run's checkpoint, or beside a downloaded
    model's), else the byte tokenizer when the checkpoint says it was trained on bytes."""
    for folder in (checkpoint.parent / "tokenizer", _run_tokenizer(checkpoint)):
        if folder is not None and folder.is_dir():
            return load_tokenizer(folder)
    if meta.get("tokenizer", "byte") != "byte":
        raise GenerationError(f"--checkpoint: {checkpoint} was trained with tokenizer "
                              f"{meta['tokenizer']!r}, whose saved folder is not beside it")
    return ByteTokenizer()


def _run_tokenizer(checkpoint: Path) -> Path | None:
    try:
        return RunStore.tokenizer_next_to(checkpoint)
    except IndexError:  # a checkpoint outside a run folder
        return None


def load_lm(path: str | Path, device: str | torch.device = "cpu",
            allow_factory: bool | str | None = False) -> tuple[nn.Module, Any, dict, Path]:
    """(masked model, tokenizer, metadata, path) of a local language-model checkpoint (an
    MLflow URI is resolved by the caller: tracking.benchmarks.resolve_checkpoint)."""
    path = Path(path)
    model, _, meta = load_ticket(path, device, allow_factory)
    if not is_language_model(meta):
        raise GenerationError(f"--checkpoint: {path} holds an image model ({meta.get('model')!r} "
                              f"on {meta.get('dataset')!r}); expected a language-model checkpoint")
    return model, tokenizer_for(path, meta), meta, path
