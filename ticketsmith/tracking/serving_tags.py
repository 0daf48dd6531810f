"""The `serving.*` tags of a registered ticket: their keys, and what the registry writes there.

The one owner of the keys: the registry writes them, the report reads them
(`report.deployed`), `benchmarks/serving_http.py --record` (images) and
`benchmarks/serving_http_lm.py --record` (language models) add the end-to-end ones. No MLflow
here: the report imports the keys without the tracking client.

    serving.format          the route that ships per batch size ("batch 1: numpy, ...")
    serving.plan            compaction and per-layer kernels, in words
    serving.threads         the thread count the plan was measured at and serves with
    serving.speedup_bs<n>   the shipped route's speedup against dense at batch n, side by side
    serving.checked         the plan's checks against the masked model
    serving.warning         the benchmark's noise warning, when it fired
    serving.<path>.<figure>_bs<n>  end to end (path pyfunc or http), added by the benchmark
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ticketsmith.serving.plan.layout import HEADLINE_BATCH_SIZES

PREFIX = "serving."
FORMAT, PLAN, THREADS, CHECKED, WARNING = (PREFIX + k for k in ("format", "plan", "threads",
                                                                "checked", "warning"))
ROUTES = PREFIX + "routes"   # a language-model plan: its route per phase and batch size
PYFUNC, HTTP = "pyfunc.", "http."  # the end-to-end paths' key infixes
# (key infix, what the reader calls that path): in-process first, then end to end.
PATHS = (("", "in-process"), (PYFUNC, "through pyfunc.predict"), (HTTP, "over HTTP"))
SPEEDUP = re.compile(r"serving\.(?:\w+\.)?speedup_bs(\d+)")   # any path's speedup key
NOT_MEASURED = "not measured"
_MAX = 4900  # characters: MLflow keeps at most 5000 per tag value


def figure_key(name: str, bs: int | str, path: str = "") -> str:
    """One figure at one batch size: ('p50_ms', 1, HTTP) → `serving.http.p50_ms_bs1`."""
    return f"{PREFIX}{path}{name}_bs{bs}"


def speedup_key(bs: int | str, path: str = "") -> str:
    """`serving.speedup_bs1`, or with path HTTP `serving.http.speedup_bs1`."""
    return figure_key("speedup", bs, path)


def path_key(name: str, path: str) -> str:
    """A figure of one end-to-end path as a whole: ('measured', HTTP) → `serving.http.measured`."""
    return f"{PREFIX}{path}{name}"


def serving_tags(plan_folder: Path, check: dict[str, Any]) -> dict[str, str]:
    """The version's `serving.*` tags: what ships, how fast it measured, how it was checked."""
    from ticketsmith.serving.plan.layout import read_plan
    from ticketsmith.serving.plan.rank import describe, shipped_speedups

    plan = read_plan(plan_folder)
    said = describe(plan)
    tags = {FORMAT: said["format"], PLAN: said["plan"][:_MAX], THREADS: str(plan["threads"])}
    best = shipped_speedups(plan)
    for bs in HEADLINE_BATCH_SIZES:
        got = best.get(bs, (None, None))[1]
        tags[speedup_key(bs)] = f"{got:.2f}" if got else NOT_MEASURED
    if plan.get("warning"):
        tags[WARNING] = plan["warning"][:_MAX]
    tags[CHECKED] = checked_phrase(check, plan.get("check"))
    return tags


def checked_phrase(check: dict[str, Any], bench: dict[str, Any] | None) -> str:
    """The registration check (and the benchmark's, when recorded) in one phrase."""
    inexact = "".join(f"; {r}: relative error {v['relative_error']:.2g}, argmax agreement "
                      f"{v['argmax_agreement']:.2%}" for r, v in check.get("inexact", {}).items())
    return (f"{check['probe']} probe inputs at registration: max |diff| "
            f"{check['max_abs_error']:.2g}, argmax agreement {check['argmax_agreement']:.2%} "
            f"({', '.join(check['routes'])}{inexact})"
            + (f"; {bench['probe']} test inputs at benchmark: max |diff| "
               f"{bench['max_abs_error']:.2g}, argmax agreement {bench['argmax_agreement']:.2%}"
               if bench else ""))


def serving_description(name: str, version: str, tags: dict[str, str]) -> str:
    """What the version serves, how fast, how checked, and how to call it, for its description."""
    if FORMAT not in tags:
        return ""

    def at(bs: int) -> str:  # "2.11x at batch 1", or "not measured at batch 1"
        value = tags.get(speedup_key(bs), NOT_MEASURED)
        return f"{value}{'x' if value.replace('.', '').isdigit() else ''} at batch {bs}"

    speed = ", ".join(at(b) for b in HEADLINE_BATCH_SIZES)
    return "\n".join([
        f"**Serving:** {tags[FORMAT]} ({tags.get(THREADS)} threads); speedup "
        f"against the dense model, side by side: {speed}. Plan: {tags.get(PLAN)}. "
        f"Checked: {tags.get(CHECKED)}.", "",
        "```python",
        "import mlflow",
        f'model = mlflow.pyfunc.load_model("models:/{name}/{version}")',
        'model.predict(images)  # uint8 0..255 or float 0..1 / 0..255, flat or shaped -> class '
        'probabilities; params={"output": "labels"} for labels',
        'model.predict(normalised, params={"input": "normalized"})  # already (x - mean) / std',
        "```",
        "Pixels outside 0..255 (negative, above 255, not finite) are refused with one line: "
        "already-normalised input must say so (`input` param, or "
        '`model_config={"input": "normalized"}`).'])


def lm_plan_tags(runner) -> dict[str, str]:
    """A language-model version's tags from its loaded serving plan (`serving.lm_plan`): the
    route per phase and batch size, and the checks every route passed."""
    said = runner.describe()
    check = runner.plan.get("check") or {}
    exact = ", ".join(f"{r} max |logit error| {c['max_abs_error']:.1e}"
                      for r, c in sorted(check.get("exact", {}).items()))
    int8 = check.get("int8")
    if int8:
        exact += (f"; int8 bits per byte {int8['bpb_delta']:+.4f} vs masked, greedy agreement "
                  f"{int8['greedy_agreement']:.1%} ({'passed' if int8['passed'] else 'failed'})")
    from ticketsmith.serving.lm_plan.runtime import shipped_line

    return {FORMAT: "lm_plan", ROUTES: shipped_line(runner)[:_MAX],
            THREADS: str(runner.threads), CHECKED: f"against the masked model: {exact}"[:_MAX],
            **({WARNING: "fallbacks: " + ", ".join(said["fallbacks"])} if said["fallbacks"]
               else {})}
