"""What a served language-model ticket generates with: prompts in, continuations out.

The registered pyfunc (`tracking/lm_pyfunc.py`) loads one backend object and calls only

    generate(prompts: list[str], *, max_new_tokens, temperature=0.0, top_k=None, seed=0,
             stop=()) -> list[str]

so any runner with that method (a serving plan for transformer tickets) can take this one's
place. This one decodes with the KV cache of `engine.generate`, the whole batch of prompts at
once (left-padded, each prompt at its own positions). A structured ticket serves its compacted
model (`compaction.compact_gpt`: fewer heads, narrower MLP) when that removes something and
its logits agree with the masked model's on a seeded probe to float rounding
(`agreement.exact`); otherwise, or when asked (`route="masked_dense"`), the masked model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ticketsmith.engine.generate import GenerationError, Sampling, check_request, generate_text
from ticketsmith.engine.transformer import GPT
from ticketsmith.serving.agreement import exact
from ticketsmith.serving.compaction import compact_gpt

ROUTES = ("serving", "masked_dense")  # serving: compacted where exact, else masked dense
# A request's defaults, one owner: the pyfunc's params and its signature (`registry`).
PARAMS = {"max_new_tokens": 64, "temperature": 0.0, "top_k": 0, "seed": 0}
PROBE_ROWS = 2  # probe sequences of the model's full context (tokens drawn with seed 0)


@dataclass
class LmBackend:
    """A language model and its tokenizer; `route` says which model generates ('compacted' or
    'masked_dense') and `check` holds the compaction's agreement figures, or why not."""

    model: nn.Module
    tokenizer: Any
    route: str = "masked_dense"
    check: dict[str, Any] = field(default_factory=dict)

    def generate(self, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, seed: int = 0, stop: tuple[str, ...] = ()
                 ) -> list[str]:
        """Continuations of `prompts` (text after each prompt, cut before a stop string).
        Bad arguments raise GenerationError in one line naming the argument."""
        check_request(prompts, max_new_tokens, temperature, top_k)
        sampling = Sampling(float(temperature), int(top_k) if top_k else None, int(seed))
        return generate_text(self.model, self.tokenizer, list(prompts), int(max_new_tokens),
                             sampling, tuple(s for s in stop if s))

    def checked(self) -> str:
        """The route and its check in one line (the registered version's tag)."""
        c = self.check
        if self.route == "compacted":
            return (f"compacted ({c['compaction']}): logits of a seeded probe of {PROBE_ROWS} "
                    f"full-context sequences within {c['max_abs_error']:.2g} of the masked "
                    f"model's (tolerance {c['tolerance']:.2g})")
        return f"masked dense: {c.get('why', 'as trained')}"


def load_backend(checkpoint: str | Path, tokenizer: str | Path | None = None,
                 allow_factory: bool | str | None = None, route: str = "serving") -> LmBackend:
    """The backend of a language-model checkpoint: `tokenizer` is the experiment's saved
    tokenizer folder (None: the checkpoint's bytes); `route` 'serving' compacts a structured
    ticket where exact, 'masked_dense' never does."""
    from ticketsmith.engine.checkpoint import model_from_checkpoint
    from ticketsmith.engine.tokenizer import ByteTokenizer, load_tokenizer

    if route not in ROUTES:
        raise GenerationError(f"format: expected one of {', '.join(ROUTES)}, got {route!r}")
    masked, _, meta = model_from_checkpoint(checkpoint, allow_factory=allow_factory)
    if meta.get("task") != "language_model":
        raise GenerationError(f"checkpoint: {checkpoint} holds an image model "
                              f"({meta.get('model')!r}); expected a language model")
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    elif meta.get("tokenizer", "byte") == "byte":
        tok = ByteTokenizer()
    else:
        raise GenerationError(f"tokenizer: the checkpoint was trained with "
                              f"{meta['tokenizer']!r}; give its saved folder")
    masked = masked.eval()
    if route == "masked_dense":
        return LmBackend(masked, tok, "masked_dense", {"why": "asked for"})
    model, name, check = serving_model(masked)
    return LmBackend(model, tok, name, check)


@torch.inference_mode()
def serving_model(masked: nn.Module) -> tuple[nn.Module, str, dict[str, Any]]:
    """(model, route, check): the compacted GPT when compaction removes a head or hidden unit
    and its logits are the masked model's to float rounding on a seeded probe; else the masked
    model, with the reason in `check['why']`."""
    if not isinstance(masked, GPT):
        return masked, "masked_dense", {"why": f"{type(masked).__name__} is not compacted"}
    small, summary = compact_gpt(masked)
    if _size(small) == _size(masked):
        return masked, "masked_dense", {"why": "no head or hidden unit is wholly pruned"}
    probe = torch.randint(0, masked.vocab, (PROBE_ROWS, masked.context),
                          generator=torch.Generator().manual_seed(0))
    ref, got = (m(probe).flatten(0, 1).numpy() for m in (masked, small.eval()))
    record, why = exact(got, ref.astype(np.float64))
    record["compaction"] = summary
    if why is not None:
        return masked, "masked_dense", {**record, "why": f"compacted logits: {why}"}
    return small, "compacted", record


def _size(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
