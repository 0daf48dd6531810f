"""Ranking a plan's routes by the benchmark's measurements, and the plan in words.

The order is written once, here, into plan.json; `layout.shipped` reads which route serves a
batch size, for the runtime, the benchmark's scorecard, the registry's tags and the report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ticketsmith.serving.plan.check import passed
from ticketsmith.serving.plan.layout import INEXACT, read_plan, shipped, write_plan


def rank_routes(folder: str | Path, speedups: dict[str, dict[int, float | None]],
                check: dict[str, Any] | None = None, threads: int | None = None,
                warning: str | None = None) -> dict:
    """Record the benchmark's measured speedups (route → batch size → dense/route, side by
    side) in plan.json and rank the routes per batch size, fastest first; unmeasured or failed
    routes go last. `check`: the plan's check against the masked model (default: the one
    recorded before). An inexact route ranks only where it was measured (the benchmark gated
    its accuracy there) and passed that check; elsewhere it is not shippable at all."""
    folder = Path(folder)
    plan = read_plan(folder)
    check = check if check is not None else plan.get("check")
    for b in plan["ranking"]:
        got = {r: (speedups.get(r) or {}).get(int(b)) for r in plan["routes"]}
        keep = [r for r in plan["routes"]
                if r not in INEXACT or (got[r] and check is not None and passed(check, r))]
        plan["ranking"][b] = sorted(keep, key=lambda r: -(got[r] or 0.0))
    plan["measured"] = {r: {str(b): s for b, s in v.items()} for r, v in speedups.items()}
    plan["warning"] = warning  # the benchmark's: its timings were noisy
    if check is not None:
        plan["check"] = check
    if threads:
        plan["threads"] = threads
    write_plan(folder, plan)
    return plan


def shipped_speedups(plan: dict[str, Any]) -> dict[int, tuple[str, float | None]]:
    """Batch size → (the route that ships, its measured speedup against dense; None where it
    was not measured)."""
    return {b: (r, (plan.get("measured", {}).get(r) or {}).get(str(b)))
            for b, r in shipped(plan).items()}


def describe(plan: dict[str, Any]) -> dict[str, str]:
    """Short strings for the version's tags: format (best route per batch size) and plan."""
    fmt = ", ".join(f"batch {b}: {r}" for b, r in shipped(plan).items())
    kernels = ", ".join(f"{s['name']}={'/'.join(sorted(set(s['kernel'].values())) or ['dense'])}"
                        for s in plan["steps"] if s["op"] == "linear")
    text = f"compacted ({plan['compaction']})"
    if kernels:
        text += f"; numpy kernels {kernels}"
    return {"format": fmt, "plan": text}
