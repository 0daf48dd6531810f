"""What differs between image classification and language modelling, in one place.

A task owns how its data are loaded and batched (inside its train function), the loss, the
quality metric and which direction is better, the samples a person reads, and how a run is
summarised in one line. Everything else (IMP, masks, rewinding, controls, replicates, resume,
tracking, gates, registry, report) is shared. The config picks the task: a text data set
(`config.TEXT_DATASETS`) makes a language model, anything else an image classifier.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ticketsmith.base.config import Config, ConfigError
from ticketsmith.base.errors import DataError
from ticketsmith.engine.data import load_dataset
from ticketsmith.engine.lm_train import generate, train_lm
from ticketsmith.engine.train import train

# Continued by every trained language model (greedy and seeded sampling), so runs compare.
PROMPTS = ("The ", "We have ", "It is the duty of ")
SAMPLE_TOKENS = 120       # new tokens per continuation
SAMPLE_TEMPERATURE = 0.8
SAMPLE_TOP_K = 40


@dataclass(frozen=True)
class TextSplits:
    """A text corpus as the engine trains on it: token streams per split, on the device.

    `text` is an engine.text.TextData (or anything with its fields: train/val/test token
    tensors, split_bytes, tokenizer, name, source)."""
    text: Any
    context: int
    train_x: torch.Tensor
    val_x: torch.Tensor
    test_x: torch.Tensor

    @property
    def name(self) -> str:
        return self.text.name

    @property
    def source(self) -> str:
        return self.text.source

    @property
    def tokenizer(self) -> Any:
        return self.text.tokenizer

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.context,)

    @property
    def num_classes(self) -> int:  # the vocabulary: what the output head predicts
        return self.text.tokenizer.vocab_size

    @property
    def tokens_per_byte(self) -> dict[str, float]:
        """Tokens per UTF-8 byte of each split: bits per byte = nats/token × this / ln 2."""
        lengths = {"train": len(self.train_x), "val": len(self.val_x), "test": len(self.test_x)}
        return {s: lengths[s] / max(1, self.text.split_bytes[s]) for s in lengths}


def _load_text(cfg: Config, device: torch.device | str) -> TextSplits:
    d = cfg.data
    if d.factory is not None:
        from ticketsmith.engine.models import ModelError, import_object

        try:
            text = import_object(d.factory, "data.factory")(**d.options)
        except ModelError as exc:
            raise DataError(str(exc)) from None
    else:
        try:
            from ticketsmith.engine.text import load_text
        except ImportError:
            raise DataError(f"data.name: {d.name!r} needs the text data module "
                            "(ticketsmith.engine.text), which this installation lacks") from None
        text = load_text(d, device=device)
    missing = [f for f in ("train", "val", "test", "split_bytes", "tokenizer") if not hasattr(text, f)]
    if missing:
        raise DataError(f"data.factory {d.factory!r}: returned {type(text).__name__} without "
                        f"{', '.join(missing)}; expected a TextData")
    return TextSplits(text, cfg.train.context, *(torch.as_tensor(getattr(text, s)).long().to(device)
                                                 for s in ("train", "val", "test")))


def _load_images(cfg: Config, device: torch.device | str):
    return load_dataset(cfg.data.name, root=cfg.data.root, val_size=cfg.data.val_size,
                        split_seed=cfg.experiment.seed, device=device,
                        factory=cfg.data.factory, options=cfg.data.options)


def _check_text(cfg: Config, data: TextSplits) -> None:
    if cfg.train.iterations is None:
        raise ConfigError("train.epochs: language models train for a number of steps; set "
                          "train.iterations instead")
    if len(data.train_x) <= cfg.train.context:
        raise ConfigError(f"train.context: {cfg.train.context} tokens, but the training split "
                          f"holds only {len(data.train_x)}")


def text_samples(model: nn.Module, data: TextSplits, seed: int) -> str:
    """Continuations of `PROMPTS`, greedy and seeded sampling, as text for a person."""
    tok, gen = data.tokenizer, torch.Generator().manual_seed(seed)
    parts = []
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        greedy = generate(model, ids, SAMPLE_TOKENS, data.context)
        sampled = generate(model, ids, SAMPLE_TOKENS, data.context,
                           temperature=SAMPLE_TEMPERATURE, top_k=SAMPLE_TOP_K, generator=gen)
        parts.append(f"### prompt: {prompt!r}\n--- greedy\n{prompt}{tok.decode(greedy)}\n"
                     f"--- sampled (temperature {SAMPLE_TEMPERATURE}, top-k {SAMPLE_TOP_K}, "
                     f"seed {seed})\n{prompt}{tok.decode(sampled)}\n")
    return "\n".join(parts)


@dataclass(frozen=True)
class Task:
    name: str
    metric: str                  # the record key that judges quality
    label: str                   # how a person reads it
    higher_is_better: bool
    load: Callable[[Config, Any], Any]
    check: Callable[[Config, Any], None]
    train: Callable[..., Any]    # engine.train.train's signature
    samples: Callable[[nn.Module, Any, int], str] | None
    summary: Callable[[dict[str, Any]], str]


TASKS: dict[str, Task] = {
    "image_classification": Task(
        "image_classification", "test_accuracy", "test accuracy", True, _load_images,
        lambda cfg, data: None, train, None,
        lambda r: f"{r['test_accuracy']:.2%}"),
    "language_model": Task(
        "language_model", "test_bpb", "test bits per byte", False, _load_text, _check_text,
        train_lm, text_samples,
        lambda r: f"{r['test_bpb']:.3f} bpb (ppl {r['test_perplexity']:.2f})"),
}


def task_for(cfg: Config) -> Task:
    return TASKS[cfg.task]
