"""Where a decoded token's time goes: torch.profiler over decode steps of a trained dense GPT
and its ticket's serving format, side by side in one process, at one batch size.

    python benchmarks/lm_decode_profile.py --dense DENSE.safetensors --ticket TICKET.safetensors
        [--format compacted|sparse] [--batch 1] [--prompt 128] [--steps 64] [--rounds 3]
        [--clock wall|cpu]

Per model, the median over rounds of: wall time per step (ms); the block Linears' time, each
call of a block's projection or MLP Linear under a `record_function` span, whatever kernel
runs it (torch's operators, scipy's CSR product, the numpy views around it); and the
profiler's self CPU time per step of every other operator, grouped into the output head,
attention over the KV cache, layer norms and GELU, copies and indexing (the cache writes) and
the rest; "Python and dispatch" is the wall time no span or operator accounts for. The
profiler adds its own cost per operator and span, so compare the columns, not the walls with
the benchmark's. The speedup a format can reach is limited by the groups it does not shrink.
With `--clock cpu` there is no profiler: the thread's CPU time per step, of its block Linears
(every kernel) and of the rest (attention, norms, GELU, head, cache writes, Python), which a
loaded machine's preemptions do not inflate.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from ticketsmith.engine.decode_step import linear_call, linear_to, out_features
from ticketsmith.engine.generate import Decoder
from ticketsmith.serving.lm_kernels import (LINEARS, compacted_model, get_linear, set_linear,
                                            sparse_model)
from ticketsmith.serving.lm_load import load_lm

SPAN = "block Linear"
# aten operator name fragments -> group (first match wins), for operators outside a SPAN
GROUPS = (("attention", ("scaled_dot_product", "_flash_attention", "softmax", "bmm", "baddbmm")),
          ("layer norm + GELU", ("layer_norm", "gelu")),
          ("output head", ("addmm", "linear", "mm", "matmul")),
          ("copies and indexing", ("copy_", "index", "cat", "slice", "select", "view",
                                   "embedding", "add", "mul", "masked", "where", "argmax")))


def group_of(name: str) -> str:
    return next((g for g, keys in GROUPS if any(k in name for k in keys)), "other")


class Spanned(nn.Module):
    """A block Linear (any kernel) whose calls the profiler sees as one SPAN each, or, with a
    `sink`, whose CPU seconds per call (the thread's clock) are added to it (a span costs a
    dispatcher call even with no profiler running)."""

    def __init__(self, inner: nn.Module, sink: list[float] | None):
        super().__init__()
        self.inner, self.sink = inner, sink
        # as a decode step calls the layer itself (`engine.decode_step`): what is timed
        self._call, self._to = linear_call(inner), linear_to(inner)
        self.out_features = out_features(inner)

    def forward(self, x):
        return self._timed(self._call if x.dim() == 2 else self.inner, x)

    def forward_into(self, x, out):
        """A decode step's call, into the output it keeps or the KV cache (`linear_to`)."""
        return self._timed(self._to, x, out)

    def _timed(self, call, *args):
        if self.sink is None:
            with record_function(SPAN):
                return call(*args)
        t0 = time.thread_time()
        y = call(*args)
        self.sink.append(time.thread_time() - t0)
        return y


def spanned(model, clock: str):
    """`model` with each block Linear wrapped in a `Spanned` (in place; returns it); with the
    "cpu" clock all add to one list, `model.linear_seconds`."""
    model.linear_seconds = [] if clock == "cpu" else None
    for block in model.blocks:
        for path in LINEARS:
            set_linear(block, path, Spanned(get_linear(block, path), model.linear_seconds))
    return model


def _in_span(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == SPAN:
            return True
        parent = parent.cpu_parent
    return False


@torch.inference_mode()
def profile_steps(model, batch: int, prompt: int, steps: int, clock: str = "wall"
                  ) -> dict[str, float]:
    """ms per decode step: wall, and self CPU time per operator group; or with the "cpu"
    clock (no profiler), the thread's CPU time of a step and of its block Linears."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(model.vocab, (batch, prompt), generator=g).tolist()
    dec = Decoder(model)
    tokens = dec.prefill(prompts, steps + 1).argmax(-1)
    if clock == "cpu":
        model.linear_seconds.clear()
        t0 = time.thread_time()
        for _ in range(steps):
            tokens = dec.step(tokens).argmax(-1)
        step = (time.thread_time() - t0) * 1e3 / steps
        linears = sum(model.linear_seconds) * 1e3 / steps
        return {"step (CPU)": step, "block Linears": linears,
                "rest of the step": step - linears}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            tokens = dec.step(tokens).argmax(-1)
        wall = (time.perf_counter() - t0) * 1e3 / steps
    out = {"wall": wall}
    for e in prof.events():
        if e.name == SPAN:
            grp, us = "block Linears", e.cpu_time_total
        elif e.name.startswith("aten::") and not _in_span(e):
            grp, us = group_of(e.name.removeprefix("aten::")), e.self_cpu_time_total
        else:
            continue
        out[grp] = out.get(grp, 0.0) + us / 1e3 / steps
    out["Python and dispatch"] = wall - sum(v for k, v in out.items() if k != "wall")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", required=True)
    p.add_argument("--ticket", required=True)
    p.add_argument("--format", choices=["compacted", "sparse"], default="compacted")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: no profiler; the thread's CPU time of each step and of its "
                        "block Linears (a loaded machine's preemptions inflate wall time)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dense = load_lm(args.dense)[0].eval()
    ticket = load_lm(args.ticket)[0].eval()
    fmt = (compacted_model(ticket)[0] if args.format == "compacted"
           else sparse_model(ticket, args.batch)[0])
    models = {"dense": spanned(dense, args.clock), args.format: spanned(fmt, args.clock)}
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in models}
    for r in range(args.rounds):  # interleaved, rotating who goes first
        for n in list(models)[r % 2:] + list(models)[:r % 2]:
            runs[n].append(profile_steps(models[n], args.batch, args.prompt, args.steps,
                                         args.clock))
    first = next(iter(runs["dense"][0]))
    keys = [first, *sorted({k for rs in runs.values() for r in rs for k in r} - {first})]
    print(f"ms per decode step, batch {args.batch}, prompt {args.prompt}, {args.steps} steps, "
          f"median of {args.rounds} rounds, {args.threads} thread(s), {args.clock} clock, "
          f"torch {torch.__version__}")
    print(f"{'':>22}" + "".join(f"{n:>12}" for n in models) + f"{'ratio':>8}")
    for k in keys:
        v = [statistics.median(r.get(k, 0.0) for r in runs[n]) for n in models]
        ratio = f"{v[0] / v[1]:8.2f}" if v[1] > 0.005 else ""
        print(f"{k:>22}" + "".join(f"{x:12.3f}" for x in v) + ratio)


if __name__ == "__main__":
    main()
