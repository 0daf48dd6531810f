"""What is deployed: the registered champion's serving plan as its model version's `serving.*`
tags say — the route per batch size, the thread count, the plan's check against the masked
model, and the speedups vs dense measured in-process (by the benchmark) and, once
`benchmarks/serving_http.py --record` has run, through `pyfunc.predict` and over HTTP.

The tags arrive with the registry outcome (`sources._registry`, one registry read); nothing
here talks to MLflow, and the tag values are shown as their writers wrote them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ticketsmith.report.render import Block, Code, Heading, Table, para
from ticketsmith.serving.plan.layout import HEADLINE_BATCH_SIZES
from ticketsmith.tracking.serving_tags import (CHECKED, FORMAT, PATHS, PLAN, PREFIX, SPEEDUP,
                                               THREADS, speedup_key)

if TYPE_CHECKING:
    from ticketsmith.report.sources import RegistryOutcome

MEASURE = "python benchmarks/serving_http.py --record"
_NOTE = re.compile(r"(.+?)(?:_(ms))?_bs(\d+)")   # a per-batch-size figure and its unit


@dataclass(frozen=True)
class Deployed:
    """The champion version of this experiment and its serving tags."""
    model_name: str
    version: str
    level: int | None
    tags: dict[str, str]

    @property
    def batch_sizes(self) -> list[str]:
        found = {m.group(1) for k in self.tags if (m := SPEEDUP.fullmatch(k))}
        return sorted(found or {str(b) for b in HEADLINE_BATCH_SIZES}, key=int)

    def speedup(self, bs: str, path: str = "") -> str | None:
        return self.tags.get(speedup_key(bs, path))

    def measured(self, path: str = "") -> list[float]:
        """The numeric speedups of one path (tags may say 'not measured')."""
        return [v for bs in self.batch_sizes if (v := number(self.speedup(bs, path))) is not None]

    @property
    def end_to_end(self) -> list[tuple[str, str]]:
        """The end-to-end paths with at least one measured speedup tag."""
        return [(p, name) for p, name in PATHS[1:] if self.measured(p)]


def number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def times(text: str | None) -> str:
    """'1.70' → '1.70×'; anything else ('not measured', absent) said as text."""
    value = number(text)
    return f"{value:.2f}×" if value is not None else (text or "not measured")


def threads(d: Deployed) -> str:
    n = d.tags.get(THREADS, "?")
    return f"{n} thread" + ("" if n == "1" else "s")


def champion_deployed(reg: RegistryOutcome | None) -> Deployed | None:
    """The `champion` version when it comes from this experiment and carries a serving plan."""
    champ = reg.aliases.get("champion") if reg is not None else None
    v = next((v for v in reg.versions if v.version == champ), None) if champ else None
    if v is None or FORMAT not in v.serving:
        return None
    return Deployed(reg.model_name, v.version, v.level, dict(v.serving))


def headline(d: Deployed) -> str:
    """The answer's second sentence: what is served and how fast, in-process then end to end."""
    sizes = d.batch_sizes
    parts = [" and ".join(f"{times(d.speedup(bs))} at batch {bs}" for bs in sizes)
             + " vs dense in-process"]
    parts += [f"{' and '.join(times(d.speedup(bs, p)) for bs in sizes)} {name}"
              for p, name in d.end_to_end]
    best = max(d.measured())
    verdict = (" — not faster than dense on this hardware" if best < 1.0 else
               " — about the same as dense on this hardware" if best < 1.1 else "")
    where = f"v{d.version}" + (f", level {d.level}" if d.level is not None else "")
    return (f"The registered champion ({where}) serves its checked plan "
            f"({d.tags[FORMAT]}; {threads(d)}) and "
            "measured " + "; ".join(parts) + verdict + ".")


def how_to_measure() -> tuple:
    return ("Through pyfunc.predict and over HTTP: not measured yet — ", Code(MEASURE),
            " adds them to this version.")


def detail(d: Deployed) -> tuple:
    """The answer's bullet: the plan's check, and the end-to-end figures or how to get them."""
    checked = d.tags.get(CHECKED, "no check recorded")
    said = (f"Deployed: v{d.version}'s serving plan, checked against the masked model on "
            f"{checked}.",)
    return said + ((" ", *how_to_measure()) if not d.end_to_end else ())


def section(d: Deployed | None) -> list[Block]:
    """The scorecard's close: one small table of what the champion ships and how fast it was,
    in-process and end to end, per batch size."""
    if d is None:
        return []
    sizes = d.batch_sizes
    rows = [("speedup in-process", d.tags[FORMAT],
             *(times(d.speedup(bs)) for bs in sizes)), *end_to_end_rows(d)]
    other = end_to_end_figures(d.tags, sizes)[1]
    out: list[Block] = [
        Heading("What is deployed", 3),
        para("Registered model ", Code(d.model_name), f" v{d.version} (", Code("champion"),
             f"), {threads(d)}, speedups vs the dense model side by side; plan ",
             Code(d.tags.get(PLAN, "?")), "; checked on ",
             d.tags.get(CHECKED, "no check recorded"), "."),
        Table(("Figure", "Route", *(f"Batch {bs}" for bs in sizes)), tuple(rows),
              numeric=tuple(range(2, 2 + len(sizes))))]
    if not d.end_to_end:
        return out + [para(*how_to_measure())]
    return out + ([para("End to end: " + "; ".join(other) + ".")] if other else [])


def end_to_end_rows(d: Deployed) -> list[tuple]:
    """The table rows of the end-to-end paths: their speedups, then their other figures."""
    sizes = d.batch_sizes
    rows = [(f"speedup {name}", "the champion's pyfunc" if p == "pyfunc." else
             "mlflow models serve, JSON /invocations", *(times(d.speedup(bs, p)) for bs in sizes))
            for p, name in d.end_to_end]
    return rows + end_to_end_figures(d.tags, sizes)[0]


def end_to_end_table(d: Deployed) -> list[Block]:
    """The end-to-end figures alone (a language-model champion, whose in-process figures are
    the per-level table's), with how they were measured; nothing when none are recorded."""
    if not d.end_to_end:
        return []
    other = end_to_end_figures(d.tags, d.batch_sizes)[1]
    return [Table(("Figure", "Route", *(f"Batch {bs}" for bs in d.batch_sizes)),
                  tuple(end_to_end_rows(d)), numeric=tuple(range(2, 2 + len(d.batch_sizes)))),
            *([para("End to end: " + "; ".join(other) + ".")] if other else [])]


def end_to_end_figures(tags: dict[str, Any], sizes: list[str]) -> tuple[list[tuple], list[str]]:
    """The end-to-end tags other than speedups: per-batch figures as table rows
    (`http.p50_ms_bs1` → 'HTTP p50' row, '3.52 ms' at batch 1), the rest as 'name: value'."""
    cells: dict[str, dict[str, str]] = {}
    other = []
    for key, value in sorted(tags.items()):
        path, _, name = key[len(PREFIX):].partition(".")
        if path not in ("http", "pyfunc") or SPEEDUP.fullmatch(key):
            continue
        label = "HTTP" if path == "http" else "pyfunc"
        m = _NOTE.fullmatch(name)
        if m is None:
            other.append(f"{label} {name.replace('_', ' ')}: {value}")
            continue
        what, unit, bs = m.groups()
        share = number(value) if "share" in what else None
        cells.setdefault(f"{label} {what.replace('_per_', '/').replace('_', ' ')}", {})[bs] = (
            f"{100 * share:.0f}%" if share is not None and share <= 1 else
            f"{value} {unit}" if unit else str(value))
    rows = [(what, "", *(got.get(bs, "—") for bs in sizes)) for what, got in cells.items()]
    return rows, other
