"""Where a decoded token's time goes: torch.profiler over decode steps of a trained dense GPT
and its ticket's serving format, side by side in one process, at one batch size.

    python benchmarks/lm_decode_profile.py --dense DENSE.safetensors --ticket TICKET.safetensors
        [--format compacted|sparse] [--batch 1] [--prompt 128] [--steps 64] [--rounds 3]

Per model, the median over rounds of: wall time per step (ms), and the profiler's self CPU
time per step grouped into Linears (block weights and the output head), attention over the
KV cache, layer norms and GELU, copies and indexing (the cache writes) and the rest; "Python
and dispatch" is the wall time no operator accounts for. The profiler adds its own cost per
operator, so compare the columns, not the walls with the benchmark's. The speedup a format
can reach is limited by the groups it does not shrink.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ticketsmith.engine.generate import Decoder
from ticketsmith.serving.lm_kernels import compacted_model, sparse_model
from ticketsmith.serving.lm_load import load_lm

# aten operator name fragments -> group (first match wins; the head is the last mm of a step)
GROUPS = (("attention", ("scaled_dot_product", "_flash_attention", "softmax", "bmm", "baddbmm")),
          ("layer norm + GELU", ("layer_norm", "gelu")),
          ("block Linears", ("addmm", "linear", "mm", "matmul", "csr", "sparse", "numpy")),
          ("copies and indexing", ("copy_", "index", "cat", "slice", "select", "view",
                                   "embedding", "add", "mul", "masked", "where", "argmax")))


def group_of(name: str) -> str:
    return next((g for g, keys in GROUPS if any(k in name for k in keys)), "other")


@torch.inference_mode()
def profile_steps(model, batch: int, prompt: int, steps: int) -> dict[str, float]:
    """ms per decode step: wall, and self CPU time per operator group."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(model.vocab, (batch, prompt), generator=g).tolist()
    dec = Decoder(model)
    tokens = dec.prefill(prompts, steps + 1).argmax(-1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            tokens = dec.step(tokens).argmax(-1)
        wall = (time.perf_counter() - t0) * 1e3 / steps
    out = {"wall": wall}
    for e in prof.key_averages():
        if e.key.startswith("aten::") or "csr" in e.key:
            grp = group_of(e.key.removeprefix("aten::"))
            out[grp] = out.get(grp, 0.0) + e.self_cpu_time_total / 1e3 / steps
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
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dense = load_lm(args.dense)[0].eval()
    ticket = load_lm(args.ticket)[0].eval()
    fmt = (compacted_model(ticket)[0] if args.format == "compacted"
           else sparse_model(ticket, args.batch)[0])
    models = {"dense": dense, args.format: fmt}
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in models}
    for r in range(args.rounds):  # interleaved, rotating who goes first
        for n in list(models)[r % 2:] + list(models)[:r % 2]:
            runs[n].append(profile_steps(models[n], args.batch, args.prompt, args.steps))
    keys = ["wall", *sorted({k for rs in runs.values() for r in rs for k in r} - {"wall"})]
    print(f"ms per decode step, batch {args.batch}, prompt {args.prompt}, {args.steps} steps, "
          f"median of {args.rounds} rounds, {args.threads} thread(s), torch {torch.__version__}")
    print(f"{'':>22}" + "".join(f"{n:>12}" for n in models) + f"{'ratio':>8}")
    for k in keys:
        v = [statistics.median(r.get(k, 0.0) for r in runs[n]) for n in models]
        ratio = f"{v[0] / v[1]:8.2f}" if v[1] > 0.005 else ""
        print(f"{k:>22}" + "".join(f"{x:12.3f}" for x in v) + ratio)


if __name__ == "__main__":
    main()
