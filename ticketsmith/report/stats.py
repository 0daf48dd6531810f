"""Statistics behind the executive report: pure functions of engine-style records, and
`Facts`, everything the report says, computed once from its inputs.

Records hold `test_accuracy` in 0..1; everything here is in accuracy points (0–100).
Spreads are the sample standard deviation (n-1) over replicates. The ticket-vs-random
comparison is paired by replicate (same seed, data order, mask and budget), so it tests
the initialisation and nothing else.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from statistics import mean, stdev
from typing import TYPE_CHECKING, Any, Iterable

from ticketsmith.base.config import GateConfig
from ticketsmith.gates import (GateError, LevelVerdict, champion_level, evaluate_gates,
                               is_language_model)
from ticketsmith.report.deployed import Deployed, champion_deployed

if TYPE_CHECKING:
    from ticketsmith.report.sources import ReportInputs

VARIANT_ORDER = ("dense", "ticket", "random_reinit", "random_prune")
ALPHA = 0.05  # significance level of the paired test


@dataclass(frozen=True)
class Spread:
    """mean ± std over n replicates (std None when n < 2)."""
    mean: float
    std: float | None
    n: int

    def text(self, digits: int = 2, unit: str = "", paren: bool = True) -> str:
        """'97.38 ± 0.18% (n=2)'; paren=False: '97.38 ± 0.18%, n=2'."""
        value = (f"{self.mean:.{digits}f}{unit}" if self.std is None else
                 f"{self.mean:.{digits}f} ± {self.std:.{digits}f}{unit}")
        return f"{value} (n={self.n})" if paren else f"{value}, n={self.n}"


def spread(values: Iterable[float]) -> Spread:
    values = [float(v) for v in values]
    if not values:
        raise ValueError("spread of no values")
    return Spread(mean(values), stdev(values) if len(values) > 1 else None, len(values))


@dataclass(frozen=True)
class LevelStats:
    """One (level, variant) over its replicates."""
    level: int
    variant: str
    sparsity: float                 # mean over replicates, fraction of prunable weights
    density: float
    accuracy: Spread                # test accuracy, points
    early_stop: Spread | None       # early-stopping iteration
    by_replicate: dict[int, dict[str, Any]]   # replicate → record

    @property
    def runs(self) -> list[str]:
        return [str(r.get("run_id", "")) for _, r in sorted(self.by_replicate.items())]


def level_stats(records: list[dict[str, Any]]) -> list[LevelStats]:
    """Every (level, variant) present, sorted by level then variant order."""
    groups: dict[tuple[int, str], dict[int, dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["level"], r["variant"]), {})[r["replicate"]] = r
    out = []
    for (level, variant), reps in groups.items():
        rs = list(reps.values())
        stops = [r["early_stop_iteration"] for r in rs if r.get("early_stop_iteration") is not None]
        out.append(LevelStats(level, variant, mean(r["sparsity"] for r in rs),
                              mean(r["density"] for r in rs),
                              spread(100 * r["test_accuracy"] for r in rs),
                              spread(stops) if stops else None, reps))
    rank = {v: i for i, v in enumerate(VARIANT_ORDER)}
    return sorted(out, key=lambda s: (s.level, rank.get(s.variant, len(rank)), s.variant))


def mean_bpb(s: LevelStats) -> float:
    """Language models: mean test bits per byte over the replicates."""
    return mean(r["test_bpb"] for r in s.by_replicate.values())


def bpb_breaking_level(stats: list[LevelStats], variant: str, bound: float) -> LevelStats | None:
    """Language models: the first pruned level (in order of sparsity) whose mean test bits per
    byte are more than `bound` above the mean dense figure."""
    dense = dense_baseline(stats)
    if dense is None:
        return None
    for s in sorted((s for s in stats if s.variant == variant and s.level > 0),
                    key=lambda s: s.sparsity):
        if mean_bpb(s) - mean_bpb(dense) > bound:
            return s
    return None


def find(stats: list[LevelStats], level: int, variant: str) -> LevelStats | None:
    return next((s for s in stats if s.level == level and s.variant == variant), None)


def dense_baseline(stats: list[LevelStats]) -> LevelStats | None:
    return find(stats, 0, "dense")


def breaking_level(stats: list[LevelStats], variant: str, max_drop: float) -> LevelStats | None:
    """First pruned level (in order of sparsity) whose mean accuracy is more than `max_drop`
    points below the mean dense accuracy: where `variant` breaks the quality gate."""
    dense = dense_baseline(stats)
    if dense is None:
        return None
    for s in sorted((s for s in stats if s.variant == variant and s.level > 0),
                    key=lambda s: s.sparsity):
        if dense.accuracy.mean - s.accuracy.mean > max_drop:
            return s
    return None


# --- the paired comparison -----------------------------------------------------------------

@dataclass(frozen=True)
class Paired:
    """ticket − control at one level, paired by replicate (points)."""
    level: int
    sparsity: float
    diffs: tuple[float, ...]
    mean_diff: float
    std_diff: float | None
    cohen_dz: float | None           # mean / std of the differences; None when undefined
    t_p: float | None                # two-sided paired t-test (for reference)
    exact_p: float | None            # one-sided exact sign-flip test of ticket > control
    min_p: float | None              # smallest p the exact test can give with n pairs

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def verdict(self) -> str:
        if self.n < 2:
            return "n=1: no test"
        return directional_verdict(self.mean_diff, self.exact_p)


def directional_verdict(mean_diff: float, p: float | None) -> str:
    """The verdict of the one-sided test of ticket > control: only that direction is tested."""
    if mean_diff == 0:
        return "no difference"
    if mean_diff < 0:
        return "random re-init ahead: no evidence for the ticket"
    if p is not None and p < ALPHA:
        return f"ticket better (one-sided p < {ALPHA})"
    return "ticket ahead, not significant"


def sign_flip_p(diffs: list[float], alternative: str = "greater") -> float:
    """Exact sign-flip permutation test of mean(diffs) = 0 under sign symmetry.

    Every one of the 2^n sign assignments is enumerated (n is a handful of replicates).
    alternative 'greater' (the report's test, ticket > control): p = share of assignments
    whose sum is at least the observed sum; smallest possible p 1/2^n, so n = 5 pairs can
    reject at 0.05 (1/32). 'two-sided': share with |sum| at least |observed| (smallest p
    2/2^n: needs n = 6).
    """
    observed = sum(diffs)
    if alternative == "two-sided":
        observed = abs(observed)
    tol = 1e-9 * max(1.0, abs(observed))
    sums = (sum(s * d for s, d in zip(signs, diffs))
            for signs in itertools.product((1, -1), repeat=len(diffs)))
    if alternative == "two-sided":
        hits = sum(abs(t) >= observed - tol for t in sums)
    elif alternative == "greater":
        hits = sum(t >= observed - tol for t in sums)
    else:
        raise ValueError(f"alternative must be 'greater' or 'two-sided', got {alternative!r}")
    return hits / 2 ** len(diffs)


def min_rejecting_n(alpha: float = ALPHA) -> int:
    """Smallest number of pairs at which the one-sided exact test can give p < alpha."""
    return next(n for n in range(1, 64) if 1 / 2 ** n < alpha)


@dataclass(frozen=True)
class Pooled:
    """Ticket − control averaged over every compared level within each replicate: one
    difference per replicate, so one test for the whole experiment (no multiplicity)."""
    levels: tuple[int, ...]
    diffs: tuple[float, ...]
    mean_diff: float
    p: float | None                  # one-sided exact sign-flip p of ticket > control

    @property
    def verdict(self) -> str:
        return "n=1: no test" if len(self.diffs) < 2 else directional_verdict(self.mean_diff, self.p)


def pooled_comparison(stats: list[LevelStats], levels: list[int],
                      control: str = "random_reinit") -> Pooled | None:
    """Per replicate, the mean ticket − control difference over `levels` (only replicates
    that ran both variants at every one of them); None when no replicate did."""
    ticket = [find(stats, lv, "ticket") for lv in levels]
    other = [find(stats, lv, control) for lv in levels]
    if not levels or any(s is None for s in ticket + other):
        return None
    reps = sorted(set.intersection(*(set(s.by_replicate) for s in ticket + other)))
    if not reps:
        return None
    diffs = [mean(100 * (t.by_replicate[r]["test_accuracy"] - o.by_replicate[r]["test_accuracy"])
                  for t, o in zip(ticket, other)) for r in reps]
    return Pooled(tuple(levels), tuple(diffs), mean(diffs),
                  sign_flip_p(diffs) if len(diffs) > 1 else None)


def paired_t_p(diffs: list[float]) -> float | None:
    """Two-sided paired t-test p (scipy, which MLflow installs); None when undefined."""
    if len(diffs) < 2 or stdev(diffs) == 0:
        return None
    from scipy import stats

    t = mean(diffs) / (stdev(diffs) / math.sqrt(len(diffs)))
    return float(2 * stats.t.sf(abs(t), len(diffs) - 1))


def paired_comparison(stats: list[LevelStats], level: int,
                      control: str = "random_reinit") -> Paired | None:
    """Ticket vs `control` at `level` over the replicates that ran both; None if none did."""
    ticket, other = find(stats, level, "ticket"), find(stats, level, control)
    if ticket is None or other is None:
        return None
    reps = sorted(set(ticket.by_replicate) & set(other.by_replicate))
    if not reps:
        return None
    diffs = [100 * (ticket.by_replicate[r]["test_accuracy"] - other.by_replicate[r]["test_accuracy"])
             for r in reps]
    m = mean(diffs)
    sd = stdev(diffs) if len(diffs) > 1 else None
    many = len(diffs) > 1
    return Paired(level, ticket.sparsity, tuple(diffs), m, sd,
                  m / sd if sd else None, paired_t_p(diffs) if many else None,
                  sign_flip_p(diffs) if many else None, 1 / 2 ** len(diffs) if many else None)


# --- everything the report says, computed once ----------------------------------------------

@dataclass
class Facts:
    """What the report says, computed once from the inputs."""
    stats: list[LevelStats]
    dense: LevelStats | None
    gate: GateConfig
    verdicts: list[LevelVerdict]
    champion: LevelVerdict | None
    ticket_break: LevelStats | None
    random_break: LevelStats | None
    paired: list[Paired]
    bench: dict[int, dict[str, Any]]     # level → benchmark of its served model (lowest replicate)
    gate_error: str | None = None
    pooled: Pooled | None = None         # ticket − random over all compared levels
    granularity: str = "weight"          # what this experiment's masks remove (prune.granularity)
    deployed: Deployed | None = None     # the registered champion's serving plan, by its tags

    @property
    def replicates(self) -> int:
        return max((s.accuracy.n for s in self.stats), default=0)

    def level(self, level: int, variant: str = "ticket") -> LevelStats | None:
        return find(self.stats, level, variant)


def analyse(inputs: ReportInputs) -> Facts:
    stats = level_stats(inputs.records)
    gate = inputs.config.gate if inputs.config is not None else GateConfig()
    try:
        verdicts, error = evaluate_gates(inputs.records, gate), None
    except GateError as exc:
        verdicts, error = [], str(exc)
    bench: dict[int, dict[str, Any]] = {}
    for (rep, level, variant), b in sorted(inputs.benchmarks.items(), reverse=True):
        if variant == ("dense" if level == 0 else "ticket"):
            bench[level] = b  # sorted descending, so the lowest replicate wins
    paired = [p for lv in sorted({s.level for s in stats if s.level > 0})
              if (p := paired_comparison(stats, lv)) is not None]
    if is_language_model(inputs.records):  # quality is bits per byte, not accuracy
        breaks = [bpb_breaking_level(stats, v, gate.max_bpb_increase)
                  for v in ("ticket", "random_reinit")]
    else:
        breaks = [breaking_level(stats, v, gate.max_accuracy_drop)
                  for v in ("ticket", "random_reinit")]
    return Facts(stats, dense_baseline(stats), gate, verdicts, champion_level(verdicts),
                 *breaks, paired, bench, error,
                 pooled_comparison(stats, [p.level for p in paired]),
                 inputs.config.prune.granularity if inputs.config is not None else "weight",
                 champion_deployed(inputs.registry))


# --- serving numbers -----------------------------------------------------------------------

def batch_sizes(facts: Facts) -> list[int]:
    return sorted({r["batch_size"] for b in facts.bench.values() for r in b.get("results", [])})


def best_format(bench: dict[str, Any] | None, bs: int) -> dict[str, Any] | None:
    """The fastest correct format at batch size `bs` that is not a dense baseline."""
    from ticketsmith.serving.formats import BASELINES

    rows = [r for r in (bench or {}).get("results", []) if r["batch_size"] == bs
            and r.get("correct") and r.get("speedup") and r["format"] not in BASELINES]
    return max(rows, key=lambda r: r["speedup"]) if rows else None


def speedup_text(row: dict[str, Any] | None) -> str:
    if row is None:
        return "—"
    spread = row.get("spread") or {}
    rng = (f" ({spread['speedup_min']:.2f}–{spread['speedup_max']:.2f})"
           if "speedup_min" in spread else "")
    return f"{row['speedup']:.2f}×{rng}"
