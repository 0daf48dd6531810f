"""Building a language-model serving plan (the files and routes: `lm_plan.runtime`).

From the masked GPT of a checkpoint: compaction (`compact_gpt`), per-layer kernels for the
sparse route chosen by measurement at each phase's real row count (decode: batch rows, a
matrix-vector product at batch 1; prefill: batch x prompt rows), per-row int8 weights; then
every route checked against the masked model (`lm_plan.check`), timed per phase and batch
size in interleaved rounds (`lm_benchmark.rounds`), and ranked by that measurement.
`ensure_lm_plan` builds when the plan is missing, unreadable or for another checkpoint.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ticketsmith.base.files import atomic_folder
from ticketsmith.engine.transformer import GPT
from ticketsmith.serving.compaction import compact_gpt, kept_heads
from ticketsmith.serving.lm_kernels import LINEARS, KernelTimer, choose_kernels, get_linear
from ticketsmith.serving.measure import median
from ticketsmith.serving.plan.layout import PLAN, PlanError, default_threads, write_plan
from ticketsmith.serving.lm_plan.check import check_lm_routes, check_shipped, shippable
from ticketsmith.serving.lm_plan.runtime import (COMPACTED, DENSE, INT8, LM_FILES, LM_KIND,
                                                 LM_ROUTES, LM_VERSION, PHASES, LmPlanRunner,
                                                 checkpoint_digest, gpt_config, load_lm_plan)

log = logging.getLogger("ticketsmith.serving")
NOISE = "dense (again)"
# models (route -> GPT), phase, batch size -> route -> seconds per token, measured side by side
RouteTimer = Callable[[dict[str, GPT], str, int], dict[str, float]]


@dataclass(frozen=True)
class LmPlanSettings:
    """How much a build measures: small values keep tests quick; defaults fit a deployment."""
    batch_sizes: tuple[int, ...] = (1, 8)   # requests of n prompts use the nearest (log scale)
    prompt_tokens: int = 128                # tokens per timed prompt (at most half the context)
    new_tokens: int = 32                    # decode steps timed per turn
    trials: int = 3                         # interleaved rounds per phase and batch size
    kernel_trials: int = 5                  # rounds per kernel choice (`in_model_times`)
    kernel_block_s: float = 0.02            # seconds of model passes per kernel turn
    check_steps: int = 8                    # greedy decode steps every route is checked over


def _state(model: GPT) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().contiguous().numpy() for k, v in model.state_dict().items()}


def int8_arrays(model: GPT) -> dict[str, np.ndarray]:
    """Per block Linear, symmetric per-row int8 weights and their scales (torch's per-channel
    observer: scale = max |row| / 127, zero point 0, so pruned weights stay exactly 0)."""
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    out = {}
    for i, block in enumerate(model.blocks):
        for path in LINEARS:
            w = get_linear(block, path).weight.detach().float().cpu()
            obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8,
                                           qscheme=torch.per_channel_symmetric)
            obs(w)
            scale, _ = obs.calculate_qparams()
            q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
            out[f"blocks.{i}.{path}.int8"] = q.numpy()
            out[f"blocks.{i}.{path}.scale"] = scale.double().numpy()
    return out


def route_timer(settings: LmPlanSettings, vocab: int, context: int) -> RouteTimer:
    """Seconds per token of each route at a phase and batch size, in interleaved rounds
    (`lm_benchmark.rounds`): prefill per prompt token, decode per generated token. Dense also
    runs against itself ("dense (again)", recorded, never ranked): the noise floor."""
    from ticketsmith.serving.lm_benchmark import random_prompts, rounds

    prompt = min(settings.prompt_tokens, context // 2)
    new = max(2, min(settings.new_tokens, context - prompt))

    def timer(models, phase, batch):
        models = {**models, NOISE: models["dense"]}
        turns = rounds(models, random_prompts(batch, prompt, vocab), new, settings.trials, 1,
                       torch.device("cpu"), decode=phase == "decode")
        key, per = ("prefill", batch * prompt) if phase == "prefill" else ("steps", batch)
        return {n: median([median(t[key]) for t in ts]) / per for n, ts in turns.items()}
    return timer


def rank_lm_routes(measured: dict[str, dict[str, dict[str, float]]], allowed: list[str]
                   ) -> dict[str, dict[str, list[str]]]:
    """Per phase and batch size, the allowed routes fastest first (fewest seconds per
    token); allowed routes that were not measured follow in LM_ROUTES order."""
    order = {r: i for i, r in enumerate(LM_ROUTES)}
    out: dict[str, dict[str, list[str]]] = {}
    for phase, per_batch in measured.items():
        out[phase] = {}
        for b, times in per_batch.items():
            key = {r: (times.get(r, float("inf")), order.get(r, len(order))) for r in allowed}
            out[phase][b] = sorted(allowed, key=key.get)
    return out


def _kernels(base: GPT, settings: LmPlanSettings, prompt: int, timer: KernelTimer | None
             ) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """Per phase and batch size ("decode_1"), the kernel of each block Linear and why."""
    kernels, why = {}, {}
    for b in settings.batch_sizes:
        for phase, rows in (("prefill", b * prompt), ("decode", b)):
            key, why[f"{phase}_{b}"] = f"{phase}_{b}", {}
            kernels[key] = choose_kernels(base, rows, settings.kernel_trials, timer, why[key],
                                          settings.kernel_block_s)
    return kernels, why


def build_lm_plan(model: GPT, tokenizer, meta: dict[str, Any], folder: str | Path, *,
                  checkpoint_sha256: str, settings: LmPlanSettings = LmPlanSettings(),
                  timer: RouteTimer | None = None, kernels_timer: KernelTimer | None = None,
                  threads: int | None = None) -> Path:
    """Write the checked, measured plan of a masked GPT to `folder` (replaced atomically)."""
    folder = Path(folder)
    if not isinstance(model, GPT):
        raise PlanError(f"{folder / PLAN}: the language-model plan serves the project's GPT, "
                        f"not {type(model).__name__} (generate and the benchmark take both)")
    dense = copy.deepcopy(model).cpu().eval().requires_grad_(False)
    small, summary = compact_gpt(dense)
    compacted = gpt_config(small) != gpt_config(dense)
    base = small if compacted else dense
    prompt = min(settings.prompt_tokens, dense.context // 2)
    kernels, why = _kernels(base, settings, prompt, kernels_timer)
    sparse = any(k != "dense" for table in kernels.values() for k in table.values())
    routes = ["dense"] + ["compacted"] * compacted + ["sparse"] * sparse + ["int8"]
    with atomic_folder(folder, prefix=".lm-plan-") as tmp:
        _write_weights(tmp, dense, small if compacted else None, base, tokenizer)
        plan = {"kind": LM_KIND, "version": LM_VERSION, "routes": routes,
                "models": {"dense": gpt_config(dense),
                           **({"compacted": gpt_config(small)} if compacted else {})},
                "kept_heads": _kept_heads(dense, base), "compaction": summary,
                "kernels": kernels if sparse else {}, "kernels_why": why if sparse else {},
                "batch_sizes": list(settings.batch_sizes), "settings": asdict(settings),
                "threads": threads or default_threads(),
                "ranking": {ph: {str(b): ["dense"] for b in settings.batch_sizes}
                            for ph in PHASES},
                "source": _source(checkpoint_sha256, tokenizer, meta)}
        write_plan(tmp, plan, LM_FILES)
        runner = LmPlanRunner(tmp, plan, threads)
        plan["check"] = check_lm_routes(runner, dense, settings.check_steps)
        allowed = [r for r in shippable(plan["check"]) if r in runner.models]
        timer = timer or route_timer(settings, dense.vocab, dense.context)
        plan["measured"] = {ph: {str(b): timer({r: runner.model_for_route(r, ph, b)
                                                for r in allowed}, ph, b)
                                 for b in settings.batch_sizes} for ph in PHASES}
        plan["ranking"] = rank_lm_routes(plan["measured"], allowed)
        write_plan(tmp, plan, LM_FILES)
        # what ships is a pair of routes per batch size: checked together, as it will run
        plan["check"]["shipped"] = check_shipped(LmPlanRunner(tmp, plan, threads), dense,
                                                 settings.check_steps)
        write_plan(tmp, plan, LM_FILES)
    return folder


def _write_weights(folder: Path, dense: GPT, small: GPT | None, base: GPT, tokenizer) -> None:
    """The plan's weight files and its tokenizer (`lm_plan.runtime` names them)."""
    from safetensors.numpy import save_file

    save_file(_state(dense), str(folder / DENSE))
    if small is not None:
        save_file(_state(small), str(folder / COMPACTED))
    save_file(int8_arrays(base), str(folder / INT8))
    tokenizer.save(folder)


def _source(checkpoint_sha256: str, tokenizer, meta: dict[str, Any]) -> dict[str, Any]:
    """What the plan was built from: the checkpoint file's digest, the tokenizer's, and the
    ticket's identity as its metadata gives it (no paths: they may hold secrets)."""
    return {"checkpoint_sha256": checkpoint_sha256, "tokenizer_sha256": tokenizer.digest(),
            **{k: meta[k] for k in ("model", "dataset", "level", "variant", "replicate", "hash")
               if k in meta}}


def _kept_heads(dense: GPT, base: GPT) -> list[list[int]]:
    """Per block, the dense model's heads that `base` keeps (all of them when not compacted):
    what carries a KV cache between the dense route and the others."""
    if base is dense:
        return [list(range(b.attn.heads)) for b in dense.blocks]
    return [torch.nonzero(kept_heads(b)).flatten().tolist() for b in dense.blocks]


def ensure_lm_plan(folder: Path, checkpoint: Path, allow_factory: bool | str | None = None, *,
                   threads: int | None = None, settings: LmPlanSettings | None = None,
                   timer: RouteTimer | None = None,
                   kernels_timer: KernelTimer | None = None) -> Path:
    """The plan at `folder` for `checkpoint`, built (measured, checked) when it is missing,
    damaged, unloadable or built for another checkpoint; returns the folder."""
    from ticketsmith.serving.lm_load import load_lm

    folder, checkpoint = Path(folder), Path(checkpoint)
    digest = checkpoint_digest(checkpoint)
    before = torch.get_num_threads()  # loading and building set torch's threads: restored
    try:
        try:  # loading is the whole check: kinds, digests, the checkpoint, every route's model
            load_lm_plan(folder, expect_checkpoint_digest=digest, threads=threads)
            return folder
        except PlanError as exc:
            if folder.exists():
                log.warning("language-model plan %s: %s; rebuilding", folder, exc)
        model, tokenizer, meta, _ = load_lm(checkpoint, "cpu", allow_factory)
        return build_lm_plan(model, tokenizer, meta, folder, checkpoint_sha256=digest,
                             settings=settings or LmPlanSettings(), timer=timer,
                             kernels_timer=kernels_timer, threads=threads)
    finally:
        torch.set_num_threads(before)
