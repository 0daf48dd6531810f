"""Checking a language-model plan's routes against the masked model, before they can ship.

Exact routes (dense, compacted, sparse at every phase and batch it has kernels for): the
logits of a prefill of prompts of different lengths (so padding is exercised) and of greedy
decode steps with the KV cache, against the masked model's, within `agreement.exact`'s
float tolerance; a route that differs is a bug and fails the build. The inexact route (int8)
is judged by `agreement.language_model`: its bits per byte on fixed text and its greedy
agreement on the masked model's continuations; the numbers are recorded pass or fail, and
a failed int8 route is never ranked.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ticketsmith.engine.generate import Decoder, generate_ids
from ticketsmith.engine.transformer import GPT
from ticketsmith.serving import agreement
from ticketsmith.serving.plan.layout import PLAN, PlanError
from ticketsmith.serving.lm_plan.runtime import LM_INEXACT, LmPlanRunner

# Fixed text for the checks: bits per byte and the prompts (the US Constitution's preamble,
# public domain; short, so a tiny model's context holds it in a few windows).
CHECK_TEXT = ("We the People of the United States, in Order to form a more perfect Union, "
              "establish Justice, insure domestic Tranquility, provide for the common defence, "
              "promote the general Welfare, and secure the Blessings of Liberty to ourselves "
              "and our Posterity, do ordain and establish this Constitution.")
PROMPTS = ("We the People", "in Order to form a more perfect", "provide for the", "and secure")


def _prompt_ids(tokenizer, context: int, steps: int) -> list[list[int]]:
    room = max(1, context - steps)
    return [tokenizer.encode(p)[:room] for p in PROMPTS]


@torch.inference_mode()
def _trace(model: GPT | None, prompts: list[list[int]], tokens: torch.Tensor,
           decoder: Callable[[GPT | None], Decoder] = Decoder) -> np.ndarray:
    """Logits (rows, vocab) of a prefill and then of each step fed `tokens` (steps, batch)."""
    dec = decoder(model)
    out = [dec.prefill(prompts, len(tokens) + 1)]
    for t in tokens:
        out.append(dec.step(t))
    return torch.cat(out).float().numpy()


@torch.inference_mode()
def bits_per_byte(model: GPT, tokenizer, text: str = CHECK_TEXT) -> float:
    """Cross-entropy of `text` (windows of the model's context) in bits per UTF-8 byte."""
    ids = torch.tensor(tokenizer.encode(text))
    nats = 0.0
    for start in range(0, len(ids) - 1, model.context):
        chunk = ids[start:start + model.context + 1]
        if len(chunk) < 2:
            break
        logits = model(chunk[None, :-1])[0].float()
        nats += float(F.cross_entropy(logits, chunk[1:], reduction="sum"))
    return nats / math.log(2) / len(text.encode())


@torch.inference_mode()
def greedy_agreement(model: GPT, ref: GPT, prompts: list[list[int]], steps: int) -> float:
    """Share of positions where `model`'s greedy token is the masked model's, fed the masked
    model's greedy continuation of each prompt (teacher-forced, so one early miss does not
    count twice)."""
    hits = total = 0
    for p, new in zip(prompts, generate_ids(ref, prompts, steps)):
        seq = torch.tensor(p + new)
        picks = model(seq[None, :-1])[0].argmax(-1)[len(p) - 1:]
        hits += int((picks == seq[len(p):]).sum())
        total += len(new)
    return hits / max(total, 1)


def check_lm_routes(runner: LmPlanRunner, ref: GPT, steps: int = 8) -> dict[str, Any]:
    """Every route of `runner` against the masked model `ref`: {'exact': {route:
    {'max_abs_error', 'tolerance', ...}}, 'int8': {...bits per byte, greedy agreement,
    'passed'}}. PlanError when an exact route differs beyond float rounding."""
    prompts, fed, want = _reference(runner, ref, steps)
    exact: dict[str, Any] = {}
    for route, model in runner.models.items():
        if route in LM_INEXACT:
            continue
        models = model if isinstance(model, dict) else {"all": model}
        for key, m in models.items():
            record, why = agreement.exact(_trace(m, prompts, fed), want)
            if why is not None:
                raise PlanError(f"{runner.folder / PLAN}: route {route} ({key}) fails its "
                                f"check against the masked model: {why}")
            if record["max_abs_error"] >= exact.get(route, {"max_abs_error": -1.0})[
                    "max_abs_error"]:
                exact[route] = record  # the worst of the route's phases and batch sizes
    out: dict[str, Any] = {"exact": exact, "prompts": len(prompts), "steps": steps}
    if "int8" in runner.models:
        record, why = agreement.language_model(
            bits_per_byte(runner.models["int8"], runner.tokenizer),
            bits_per_byte(ref, runner.tokenizer),
            greedy_agreement(runner.models["int8"], ref, prompts, steps))
        out["int8"] = {**record, "passed": why is None, **({"why": why} if why else {})}
    return out


def _reference(runner: LmPlanRunner, ref: GPT, steps: int):
    """(prompts, the masked model's greedy tokens to feed (steps - 1, batch), its logits)."""
    prompts = _prompt_ids(runner.tokenizer, ref.context, steps)
    reference = generate_ids(ref, prompts, steps)
    fed = torch.tensor([row + [0] * (steps - len(row)) for row in reference]).T[:steps - 1]
    return prompts, fed, _trace(ref, prompts, fed)


def check_shipped(runner: LmPlanRunner, ref: GPT, steps: int = 8) -> dict[str, Any]:
    """The routes that ship together at each measured batch size (prefill on one, decode on
    the other, the KV cache carried between them) against the masked model's logits:
    {batch: {'prefill', 'decode', 'max_abs_error' or 'checked': False}}. A pair with the
    inexact route is not compared (its own check judged it). PlanError when a pair of exact
    routes differs beyond float rounding."""
    prompts, fed, want = _reference(runner, ref, steps)
    out: dict[str, Any] = {}
    for b in sorted(runner.order["decode"]):
        pair = {"prefill": runner.route_for("prefill", b), "decode": runner.route_for("decode", b)}
        if set(pair.values()) & set(LM_INEXACT):
            out[str(b)] = {**pair, "checked": False}
            continue
        record, why = agreement.exact(_trace(None, prompts, fed, lambda _: runner.decoder(b)),
                                      want)
        if why is not None:
            raise PlanError(f"{runner.folder / PLAN}: at batch {b}, prefill on {pair['prefill']}"
                            f" then decode on {pair['decode']} fails its check: {why}")
        out[str(b)] = {**pair, "max_abs_error": record["max_abs_error"]}
    return out


def shippable(check: dict[str, Any]) -> list[str]:
    """Routes that passed: every exact one checked, int8 only when it passed its gate."""
    routes = list(check["exact"])
    if (check.get("int8") or {}).get("passed"):
        routes.append("int8")
    return routes

