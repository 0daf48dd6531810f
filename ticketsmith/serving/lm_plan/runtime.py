"""Running a language-model serving plan: `load_lm_plan` and `LmPlanRunner.generate`.

A language-model plan is a folder, nothing pickled in it:

    plan.json              models (shape per block), routes, kernels per phase and batch,
                           the measured seconds per token, the ranking, the checks, digests
    dense.safetensors      the masked weights as trained (zeros stored)
    compacted.safetensors  the structured ticket as a smaller dense GPT (absent when no head
                           or hidden unit is removed)
    int8.safetensors       the block Linears of the compacted GPT as per-row int8 + scales
    tokenizer.json         the tokenizer the model was trained with (byte-level or BPE)

Routes, each a GPT that `engine.generate` decodes with its KV cache:

    dense      the masked weights: the baseline
    compacted  fewer heads, narrower MLP (`serving.compaction.compact_gpt`): exact
    sparse     the compacted GPT, each block Linear on the kernel measured fastest at that
               phase and batch (dense, scipy CSR, torch CSR; `lm_kernels`): exact. CSR arrays
               are built at load from the digest-checked compacted weights
    int8       the compacted GPT on torch's dynamic int8 Linear: inexact, shipped only where
               its bits per byte and greedy agreement passed (`agreement.language_model`)

A request of n prompts prefills on the route ranked first for prefill at the measured batch
size nearest n (log scale) and decodes on the one ranked first for decode. Dense keeps every
head, the others the compacted heads: switching carries the KV cache over (the compacted
heads selected, or the removed ones zero-filled: their output columns are zero, so what
they hold is never read into the result). Unlike the image plan's runtime this one needs
torch: the routes are torch modules.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ticketsmith.base.files import sha256_file
from ticketsmith.engine.generate import Decoder, Sampling, check_request, generate_text
from ticketsmith.engine.tokenizer import from_json
from ticketsmith.engine.transformer import GPT
from ticketsmith.serving.lm_kernels import LINEARS, get_linear, set_linear, with_kernels
from ticketsmith.serving.plan.layout import PLAN, PlanError, default_threads, read_plan
from ticketsmith.serving.plan.runtime import _nearest

log = logging.getLogger("ticketsmith.serving")

LM_KIND, LM_VERSION = "ticketsmith-lm-serving-plan", 1
DENSE, COMPACTED, INT8, TOKENIZER = ("dense.safetensors", "compacted.safetensors",
                                     "int8.safetensors", "tokenizer.json")
LM_FILES = (DENSE, COMPACTED, INT8, TOKENIZER)
LM_ROUTES = ("dense", "compacted", "sparse", "int8")
LM_INEXACT = ("int8",)
PHASES = ("prefill", "decode")


def checkpoint_digest(path: str | Path) -> str:
    """The identity a plan records of its checkpoint: the file's sha256 (hex)."""
    return sha256_file(Path(path))


def gpt_config(model: GPT) -> dict[str, Any]:
    """What rebuilds `model`'s shape: per-block heads and MLP widths, tied embeddings."""
    return {"vocab": model.vocab, "context": model.context, "layers": len(model.blocks),
            "heads": [b.attn.heads for b in model.blocks], "width": model.width,
            "head_dim": model.blocks[0].attn.head_dim,
            "mlp_hidden": [b.mlp.fc.out_features for b in model.blocks],
            "bias": model.blocks[0].attn.qkv.bias is not None}


def gpt_from(config: dict[str, Any], arrays: dict[str, np.ndarray]) -> GPT:
    """A GPT of `config` holding `arrays` (its state dict as numpy); eval, no grad."""
    model = GPT(config["vocab"], config["context"], config["layers"], config["heads"],
                config["width"], config["head_dim"], config["mlp_hidden"], bias=config["bias"])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()}, strict=True)
    return model.requires_grad_(False).eval()


def int8_gpt(base: GPT, arrays: dict[str, np.ndarray]) -> GPT:
    """`base` with each block Linear replaced by torch's dynamic int8 Linear holding the
    stored per-row int8 weights (`<layer>.int8`) and scales (`<layer>.scale`)."""
    import copy

    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    out = copy.deepcopy(base)
    for i, block in enumerate(out.blocks):
        for path in LINEARS:
            name, layer = f"blocks.{i}.{path}", get_linear(block, path)
            q = torch.from_numpy(arrays[name + ".int8"]).float()
            scale = torch.from_numpy(arrays[name + ".scale"])
            with warnings.catch_warnings():  # torch's quantized tensors are deprecated, not gone
                warnings.simplefilter("ignore", UserWarning)
                # the stored ints times their scale quantize back to exactly those ints
                weight = torch.quantize_per_channel(q * scale[:, None].float(), scale,
                                                    torch.zeros(len(scale), dtype=torch.long),
                                                    0, torch.qint8)
                new = Int8Linear(layer.in_features, layer.out_features,
                                 bias_=layer.bias is not None, dtype=torch.qint8)
                new.set_weight_bias(weight, layer.bias)
            set_linear(block, path, new)
    return out


class _PlanDecoder(Decoder):
    """Prefill on one route's model, decode on another's, the KV cache carried over."""

    def __init__(self, runner: "LmPlanRunner", batch: int):
        (self.prefill_route, pre), (self.decode_route, self.decode_model) = (
            runner.model_for("prefill", batch), runner.model_for("decode", batch))
        self.keep = runner.kept_heads
        super().__init__(pre)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.model is not self.decode_model:
            full = self.decode_route == "dense"
            if full != (self.prefill_route == "dense"):
                self._carry(full)
            self.model = self.decode_model
        return super().step(tokens)

    def _carry(self, to_full: bool) -> None:
        for i, keep in enumerate(self.keep):
            self.cache.select_heads(i, keep, self.decode_model.blocks[i].attn.heads
                                    if to_full else None)


def _per_table(base: GPT, kernels: dict[str, dict[str, str]]) -> dict[str, GPT]:
    """"decode_1" -> `base` on that phase and batch size's kernels; one model per distinct
    kernel table (phases and batch sizes often agree)."""
    made: dict[str, GPT] = {}
    out = {}
    for key, table in kernels.items():
        same = json.dumps(table, sort_keys=True)
        if same not in made:
            made[same] = with_kernels(base, table)
        out[key] = made[same]
    return out


class LmPlanRunner:
    """A loaded language-model plan: `generate(prompts, ...)` and `describe()`."""

    def __init__(self, folder: Path, plan: dict[str, Any], threads: int | None = None):
        from safetensors.numpy import load_file

        self.folder, self.plan = folder, plan
        self.threads = threads or plan.get("threads") or default_threads()
        torch.set_num_threads(self.threads)  # the plan was measured at this many (process-wide)
        self.tokenizer = from_json((folder / TOKENIZER).read_text(), str(folder / TOKENIZER))
        self.fallbacks: list[str] = []
        dense = gpt_from(plan["models"]["dense"], load_file(str(folder / DENSE)))
        base = (gpt_from(plan["models"]["compacted"], load_file(str(folder / COMPACTED)))
                if "compacted" in plan["models"] else dense)
        self.kept_heads = [torch.tensor(k) for k in plan["kept_heads"]]
        self.models: dict[str, Any] = {"dense": dense}
        for name in plan["routes"]:
            if name == "compacted":
                self.models[name] = base
            elif name == "sparse":
                self.models[name] = _per_table(base, plan["kernels"])
            elif name == "int8":
                try:
                    self.models[name] = int8_gpt(base, load_file(str(folder / INT8)))
                except (RuntimeError, ImportError) as exc:  # no quantized engine here
                    self.fallbacks.append(f"route int8 cannot run on this host ({exc})")
            elif name != "dense":
                self.fallbacks.append(f"route {name} is not known to this version; skipped")
        self.order = {ph: {int(b): [r for r in order if r in self.models] or ["dense"]
                           for b, order in plan["ranking"][ph].items()} for ph in PHASES}
        self._nearest = _nearest(sorted(self.order["decode"]))
        for ph in PHASES:
            for b, order in plan["ranking"][ph].items():
                if order and order[0] not in self.models:
                    self.fallbacks.append(f"{ph} batch {b}: serving {self.order[ph][int(b)][0]}"
                                          f" instead of the measured best {order[0]}")
        for msg in self.fallbacks:
            log.warning("language-model plan %s: %s", folder, msg)

    def route_for(self, phase: str, batch: int) -> str:
        return self.order[phase][self._nearest(batch)][0]

    def model_for(self, phase: str, batch: int) -> tuple[str, GPT]:
        """(route, its model) that serves `phase` for a request of `batch` prompts."""
        b = self._nearest(batch)
        route = self.order[phase][b][0]
        return route, self.model_for_route(route, phase, b)

    def model_for_route(self, route: str, phase: str, batch: int) -> GPT:
        """`route`'s model at `phase` and a measured batch size (sparse kernels differ)."""
        model = self.models[route]
        return model[f"{phase}_{batch}"] if isinstance(model, dict) else model

    def decoder(self, batch: int) -> Decoder:
        """The Decoder of a request of `batch` prompts: its prefill and decode routes."""
        return _PlanDecoder(self, batch)

    def generate(self, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, seed: int = 0, stop: tuple[str, ...] = ()
                 ) -> list[str]:
        """Continuations of `prompts` (greedy at temperature 0, else a seeded top-k draw),
        each cut before its first stop string."""
        check_request(prompts, max_new_tokens, temperature, top_k)
        if not prompts:
            return []
        first = self.model_for("prefill", len(prompts))[1]
        return generate_text(first, self.tokenizer, list(prompts), max_new_tokens,
                             Sampling(temperature, top_k, seed), tuple(stop),
                             decoder=lambda _: self.decoder(len(prompts)))

    def describe(self) -> dict[str, Any]:
        """Which route serves each phase and batch size, the compaction, the sparse layers,
        the int8 check, and any fallbacks on this host."""
        sparse = {k: f"{sum(v != 'dense' for v in t.values())}/{len(t)} layers sparse"
                  for k, t in self.plan.get("kernels", {}).items()}
        return {"routes": {ph: {str(b): o[0] for b, o in self.order[ph].items()}
                           for ph in PHASES},
                "measured": self.plan.get("measured", {}),
                "compaction": self.plan["compaction"], "sparse_kernels": sparse,
                "int8": (self.plan.get("check") or {}).get("int8"),
                "fallbacks": list(self.fallbacks)}


def shipped_line(plan_or_runner: dict[str, Any] | LmPlanRunner) -> str:
    """One line: the route per phase and batch size, e.g. 'prefill 1: compacted, ...'."""
    d = plan_or_runner.describe() if isinstance(plan_or_runner, LmPlanRunner) else {
        "routes": {ph: {b: o[0] for b, o in plan_or_runner["ranking"][ph].items() if o}
                   for ph in PHASES}}
    return "; ".join(f"{ph} " + ", ".join(f"batch {b}: {r}" for b, r in d["routes"][ph].items())
                     for ph in PHASES)


def read_lm_plan(folder: str | Path) -> dict[str, Any]:
    """plan.json of a language-model plan, kind, version and every file's digest checked."""
    return read_plan(folder, LM_KIND, LM_VERSION)


def load_lm_plan(folder: str | Path, *, expect_checkpoint_digest: str | None = None,
                 threads: int | None = None) -> LmPlanRunner:
    """Load a language-model plan for serving (no unpickling). A plan built for another
    checkpoint than `expect_checkpoint_digest` (`checkpoint_digest`) is refused."""
    folder = Path(folder)
    plan = read_lm_plan(folder)
    built_for = str((plan.get("source") or {}).get("checkpoint_sha256"))
    if expect_checkpoint_digest is not None and built_for != expect_checkpoint_digest:
        raise PlanError(f"{folder / PLAN}: built for checkpoint sha256 {built_for[:12]}..., "
                        f"not {expect_checkpoint_digest[:12]}... (another ticket); rebuild it "
                        "with ensure_lm_plan")
    try:
        return LmPlanRunner(folder, plan, threads)
    except (KeyError, TypeError, ValueError, IndexError) as exc:  # edited or foreign plan.json
        raise PlanError(f"{folder / PLAN}: not a usable language-model plan "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())})") from None
