"""The language-model serving plan of GPT tickets: which route ships per phase and batch size,
and what generation through the plan gains over the dense route, side by side in one process.

The tickets are `lm_serving.py`'s (random weights, GPT-2's initialisation; byte vocabulary,
context 256): 90% of every block Linear pruned by magnitude, and half of every block's heads
and MLP hidden units. For each, `serving.lm_plan.build_lm_plan` compacts, chooses the sparse
kernels per layer, quantizes to int8, checks every route against the masked model and ranks
the routes by interleaved measurement. Then `LmPlanRunner.generate` (greedy, the shipped
routes, the KV cache carried between them) is timed against the same plan forced to its
dense route, in interleaved rounds: the ratio is the plan's end-to-end speedup.

    python benchmarks/lm_plan.py [--widths 384] [--trials 3] [--threads 1] [--new-tokens 64]
                                 [--output lm_plan.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from lm_serving import gpt, structured, unstructured  # noqa: E402

from ticketsmith.engine.tokenizer import ByteTokenizer  # noqa: E402
from ticketsmith.serving.lm_plan import LmPlanSettings, build_lm_plan, load_lm_plan  # noqa: E402
from ticketsmith.serving.lm_plan.check import CHECK_TEXT  # noqa: E402
from ticketsmith.serving.lm_plan.runtime import shipped_line  # noqa: E402
from ticketsmith.serving.measure import median  # noqa: E402


def end_to_end(runner, dense, prompts: list[str], new: int, trials: int) -> dict:
    """Greedy generation through the shipped routes and through dense, interleaved rounds."""
    ratios, times = [], {"plan": [], "dense": []}
    for r in range(trials + 1):
        order = [("plan", runner), ("dense", dense)][:: 1 if r % 2 else -1]
        got = {}
        for name, run in order:
            t0 = time.perf_counter()
            run.generate(prompts, max_new_tokens=new)
            got[name] = time.perf_counter() - t0
        if r:  # round 0 warms up
            times["plan"].append(got["plan"])
            times["dense"].append(got["dense"])
            ratios.append(got["dense"] / got["plan"])
    tokens = len(prompts) * new
    return {"plan_tokens_per_s": tokens / median(times["plan"]),
            "dense_tokens_per_s": tokens / median(times["dense"]),
            "speedup": {"median": median(ratios), "min": min(ratios), "max": max(ratios)}}


def dense_only(folder: Path, threads: int):
    """The same plan with every phase and batch ranked dense first: the baseline runner."""
    runner = load_lm_plan(folder, threads=threads)
    runner.order = {ph: {b: ["dense"] for b in o} for ph, o in runner.order.items()}
    return runner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="384")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--output", default="lm_plan.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    settings = LmPlanSettings(trials=args.trials)
    out = {}
    for width in (int(w) for w in args.widths.split(",")):
        for name, mask in (("unstructured_90", unstructured), ("structured_half", structured)):
            model = mask(gpt(width))
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                folder = build_lm_plan(model, ByteTokenizer(), {}, Path(tmp) / "plan",
                                       checkpoint_sha256="benchmark", settings=settings,
                                       threads=args.threads)
                built_s = time.perf_counter() - t0
                runner = load_lm_plan(folder, threads=args.threads)
                e2e = {str(b): end_to_end(runner, dense_only(folder, args.threads),
                                          [CHECK_TEXT[:128]] * b, args.new_tokens, args.trials)
                       for b in settings.batch_sizes}
                result = {"build_s": built_s, "shipped": shipped_line(runner),
                          **runner.describe(), "end_to_end": e2e}
            out[f"width_{width}/{name}"] = result
            print(f"== width {width}, {name}: built in {built_s:.0f} s; {result['shipped']}")
            for ph, per in result["measured"].items():
                for b, times in per.items():
                    base = times["dense"]
                    print(f"  {ph} batch {b}: " + ", ".join(
                        f"{r} {1 / t:.0f} tok/s ({base / t:.2f}x)" for r, t in times.items()))
            print(f"  sparse kernels: {result['sparse_kernels']}; int8: {result['int8']}")
            for b, e in e2e.items():
                print(f"  generate batch {b}, {args.new_tokens} new tokens: plan "
                      f"{e['plan_tokens_per_s']:.0f} tok/s, dense {e['dense_tokens_per_s']:.0f}"
                      f" tok/s, {e['speedup']['median']:.2f}x ({e['speedup']['min']:.2f}-"
                      f"{e['speedup']['max']:.2f})", flush=True)
    Path(args.output).write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
