"""The report's headline sections: the answer, the results table and the ticket-vs-random
statistics. Each returns document blocks (`report_render`) built from `Facts`."""
from __future__ import annotations

from typing import Any

from ticketsmith.gates import FAIL, label
from ticketsmith.report import deployed
from ticketsmith.serving.plan.layout import HEADLINE_BATCH_SIZES
from ticketsmith.report.render import Block, Bullets, Code, Heading, Strong, Table, para
from ticketsmith.report.stats import (ALPHA, Facts, batch_sizes, best_format, min_rejecting_n,
                                      speedup_text)

VARIANT_NAMES = {"dense": "dense", "ticket": "ticket", "random_reinit": "random re-init",
                 "random_prune": "random prune"}


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def answer(facts: Facts) -> list[Block]:
    """The answer to the business question in two sentences, then the details behind it."""
    if facts.dense is None:
        return [para(Strong("No answer yet:"), " no dense baseline (level 0) has finished, so "
                     "nothing can be compared. Run or resume the experiment first.")]
    if not facts.verdicts:
        return [para(Strong("No answer yet:"), " no pruned level has a finished ticket; dense "
                     f"test accuracy is {facts.dense.accuracy.text(2, '%')}.")]
    blocks: list[Block] = [para(*quality_sentence(facts), " ", serving_headline(facts)),
                           Bullets(tuple(details(facts)))]
    if facts.replicates < 2:
        blocks.append(para(Strong("n=1:"), " one replicate only — no error bars and no claim "
                           "of significance. Run with ", Code("--set experiment.replicates=5"),
                           " for the spread."))
    return blocks


def quality_sentence(facts: Facts) -> list[Any]:
    """Sentence one: the safe zone (or that there is none) and where random re-init breaks."""
    thr, d, ch = facts.gate.max_accuracy_drop, facts.dense.accuracy, facts.champion
    if ch is not None:
        s = facts.level(ch.level)
        parts: list[Any] = [
            Strong(f"Safe optimisation zone: up to {pct(ch.sparsity)} sparsity"),
            f" ({pct(s.density)} of the weights left): the ticket keeps "
            f"{s.accuracy.text(2, '%')} test accuracy vs dense {d.text(2, '%')}, within the "
            f"{thr:g}-point quality gate"]
    else:
        first = facts.verdicts[0]
        parts = [Strong("No pruned level passes the quality gate"),
                 f" (already at {pct(first.sparsity)} sparsity: " + "; ".join(
                     g.detail for g in first.gates if g.passed is False) + ")"]
    rb = facts.random_break
    if not any(s.variant == "random_reinit" for s in facts.stats):
        parts.append("; no random re-init control was run.")
    elif rb is not None:
        parts.append(f"; random re-init of the same masks breaks at {pct(rb.sparsity)} "
                     f"({rb.accuracy.text(2, '%', paren=False)}).")
    else:
        parts.append("; random re-init of the same masks stays within the gate at every level.")
    return parts


def serving_headline(facts: Facts) -> str:
    """Sentence two: the measured serving speedup at the safe level, or why there is none."""
    level = facts.champion.level if facts.champion is not None else None
    d = facts.deployed
    if level is not None and d is not None and d.measured():
        return deployed.headline(d)  # what ships, not the best of every format
    if not facts.bench:
        return "No serving benchmark has been recorded yet, so the speedup is unknown."
    if level is None:
        return "No ticket qualifies for serving, so no speedup is claimed."
    if level not in facts.bench:
        return "The serving speedup at the safe level was not measured."
    rows = [(bs, r) for bs in batch_sizes(facts) if (r := best_format(facts.bench[level], bs))]
    if not rows:
        return "No serving format passed its correctness checks at that level."
    best = max(r["speedup"] for _, r in rows)
    verdict = (" — not faster than dense on this hardware" if best < 1.0 else
               " — about the same as dense on this hardware" if best < 1.1 else "")
    return ("Served there, it measured " + " and ".join(
        f"{r['speedup']:.2f}× at batch {bs}" for bs, r in rows)
        + f" vs dense (the best format at each batch size, on "
        f"{facts.bench[level].get('environment', {}).get('device', 'cpu')})"
        + verdict + ".")


def details(facts: Facts) -> list[Any]:
    """The numbers behind the headline, one statement each."""
    d, out = facts.dense.accuracy, []
    tb, rb = facts.ticket_break, facts.random_break
    sparsest = max((s for s in facts.stats if s.variant == "ticket"), key=lambda s: s.sparsity)
    out.append(f"Ticket: quality drops at {pct(tb.sparsity)} sparsity (level {tb.level}): "
               f"{tb.accuracy.text(2, '%')}, {d.mean - tb.accuracy.mean:.2f} points below dense."
               if tb else f"Ticket: did not break within the levels run (down to "
               f"{pct(sparsest.density)} of the weights, "
               f"{sparsest.accuracy.text(2, '%', paren=False)}).")
    if rb is not None:
        out.append(f"Random re-init: breaks at {pct(rb.sparsity)} sparsity (level {rb.level}): "
                   f"{rb.accuracy.text(2, '%')}, {d.mean - rb.accuracy.mean:.2f} points below "
                   "dense.")
    if facts.champion is not None:
        s = facts.level(facts.champion.level)
        out.append(f"Compute: at {pct(s.sparsity)} sparsity the pruned layers keep "
                   f"{pct(s.density)} of their weights — at most {1 / s.density:.1f}× less "
                   "weight compute, if a serving format could exploit all of it.")
    out.append(serving_detail(facts))
    if facts.deployed is not None:
        out.append(deployed.detail(facts.deployed))
    return out


def serving_hardware(env: dict) -> str:
    """The hardware a benchmark ran on: the GPU on CUDA, else the CPU model."""
    if str(env.get("device", "")).startswith("cuda") and env.get("gpu"):
        return str(env["gpu"])
    return str(env.get("cpu", "unknown hardware"))


def serving_detail(facts: Facts) -> Any:
    level = facts.champion.level if facts.champion is not None else None
    if not facts.bench:
        return ("Serving: no benchmark recorded — run prune with ",
                Code("--set experiment.benchmark=true"), " (or ", Code("ticketsmith benchmark"), ").")
    benchmarked = ", ".join(str(lv) for lv in sorted(facts.bench))
    if level is None:
        return ("Serving: no ticket passes every gate, so none would be served; the speedups "
                f"measured at levels {benchmarked} are in the table.")
    if level not in facts.bench:
        return f"Serving: the safe level was not benchmarked (benchmarked levels: {benchmarked})."
    env = facts.bench[level].get("environment", {})
    rows = [(bs, r) for bs in batch_sizes(facts) if (r := best_format(facts.bench[level], bs))]
    rounds = env.get("trials")
    return ("Serving: " + "; ".join(f"{speedup_text(r)} at batch {bs} ({r['format']})"
                                    for bs, r in rows)
            + f" vs dense on {serving_hardware(env)} ({env.get('device', '?')}, "
            f"threads {env.get('threads', '?')}); one model (replicate 0)"
            + (f", median of {rounds} interleaved rounds, range in brackets." if rounds else "."))


def results_table(facts: Facts) -> list[Block]:
    """One row per (level, variant): accuracy, Δ vs dense, gate, speedups, best format."""
    sizes = batch_sizes(facts)
    small, large = (sizes[0], sizes[-1]) if sizes else HEADLINE_BATCH_SIZES
    verdict_by_level = {v.level: v for v in facts.verdicts}
    thr = facts.gate.max_accuracy_drop
    rows = []
    for s in facts.stats:
        delta = ("—" if s.variant == "dense" or facts.dense is None
                 else f"{s.accuracy.mean - facts.dense.accuracy.mean:+.2f} pts")
        if s.variant == "ticket" and s.level in verdict_by_level:
            v = verdict_by_level[s.level]
            gate = label(True) if v.passed else f"{FAIL} (" + ", ".join(
                g.name for g in v.gates if g.passed is False) + ")"
        elif s.variant == "dense":
            gate = "baseline"
        elif facts.dense is not None:
            drop = facts.dense.accuracy.mean - s.accuracy.mean
            gate = f"control: {'breaks' if drop > thr else 'within'} {thr:g} pts"
        else:
            gate = "—"
        served = s.variant == ("dense" if s.level == 0 else "ticket")
        bench = facts.bench.get(s.level) if served else None
        if s.variant == "dense" and bench is not None:
            sp1 = spl = "1.00× (baseline)"
            fmt = "dense"
        else:
            b1, bl = best_format(bench, small), best_format(bench, large)
            sp1, spl = speedup_text(b1), speedup_text(bl)
            names = {r["format"] for r in (b1, bl) if r is not None}
            fmt = ("—" if not names else next(iter(names)) if len(names) == 1 else
                   f"BS={small}: {b1['format'] if b1 else '—'}; BS={large}: "
                   f"{bl['format'] if bl else '—'}")
        if bench is None and served and s.level > 0:
            sp1 = spl = fmt = "not benchmarked"
        rows.append((VARIANT_NAMES.get(s.variant, s.variant), f"{s.level}",
                     pct(s.sparsity), s.accuracy.text(2, "%"), delta, gate, sp1, spl, fmt,
                     "—" if s.variant == "dense" else facts.granularity))
    header = ("Variant", "Level", "Sparsity", "Accuracy (mean ± std, n)", "Δ vs dense", "Gate",
              f"Speedup BS={small}", f"Speedup BS={large}", "Best serving format", "Granularity")
    return [Heading("Results by level"),
            para(f"Test accuracy over replicates (mean ± sample std, n replicates); Δ is the "
                 f"difference of means in accuracy points; the gate is the mean ticket accuracy "
                 f"within {thr:g} points of dense (plus every other configured gate). Speedups "
                 "are the best correct serving format vs the dense model at that batch size "
                 "(median over interleaved rounds, range in brackets). Granularity: what the "
                 "level's masks remove (weight: single weights; neuron / channel: whole units, "
                 "so the ticket compacts into a smaller dense network)."),
            Table(header, tuple(rows), numeric=(1, 2, 4, 6, 7), css="results")]




def _p(p: float | None) -> str:
    return "—" if p is None else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def paired_section(facts: Facts) -> list[Block]:
    kind = {"weight": "unstructured (weight)", "neuron": "neuron", "channel": "channel"}.get(
        facts.granularity, facts.granularity)
    out: list[Block] = [Heading(f"Does the initialisation matter? Ticket vs random re-init, "
                                f"{kind} tickets")]
    thr = facts.gate.max_accuracy_drop
    definition = para(
        Strong("Breaking point:"), f" the first level, in order of sparsity, whose mean test "
        f"accuracy is more than {thr:g} points below the mean dense accuracy (the quality gate's "
        "threshold), for the ticket and for random re-init separately.")
    scope = para(Strong("Scope:"), f" these statistics are for the {kind} tickets of this "
                 "experiment alone; they say nothing about tickets of another granularity."
                 + (" For structured pruning the literature (Liu et al. 2019, \"Rethinking the "
                    "Value of Network Pruning\") often finds the small architecture trained from "
                    "a fresh init as good as the rewound ticket; the test above says whether that "
                    "holds here." if facts.granularity != "weight" else ""))
    if not facts.paired:
        return out + [para("No level has both a ticket and a random re-init run: no comparison "
                           "is possible."), definition]
    n = max(p.n for p in facts.paired)
    rows = tuple((str(p.level), f"{100 * p.sparsity:.1f}%", str(p.n),
                  f"{p.mean_diff:+.2f}" + (f" ± {p.std_diff:.2f}" if p.std_diff is not None else ""),
                  "—" if p.cohen_dz is None else f"{p.cohen_dz:+.2f}", _p(p.t_p), _p(p.exact_p),
                  p.verdict) for p in facts.paired)
    out.append(Table(("Level", "Sparsity", "Pairs", "Ticket − random (points, mean ± std)",
                      "Cohen's d_z", "Paired t p (two-sided)", "Exact sign-flip p (one-sided)",
                      "Verdict"), rows, numeric=(0, 1, 2, 3, 4, 5, 6)))
    if n < 2:
        out.append(para(Strong("One replicate:"), " the differences above are single "
                        "measurements; no test is run and no significance is claimed."))
    else:
        out += [pooled_line(facts), method_note(facts, n)]
    return out + [scope, definition]


def pooled_line(facts: Facts) -> Block:
    pooled = facts.pooled
    if pooled is None:
        return para(Strong("All levels pooled:"), " not computed — no replicate ran both "
                    "variants at every compared level.")
    return para(Strong("All levels pooled:"), f" per replicate, the mean ticket − random "
                f"difference over levels {', '.join(map(str, pooled.levels))}: "
                f"{pooled.mean_diff:+.2f} points (n = {len(pooled.diffs)}), one-sided exact "
                f"sign-flip p = {_p(pooled.p)}: {pooled.verdict}.")


def method_note(facts: Facts, n: int) -> Block:
    """Which test, why, and the smallest n at which it can reject."""
    min_p = min(p.min_p for p in facts.paired if p.min_p is not None)
    return para(
        "Each replicate pairs a ticket with the random re-init of the same mask, seed, data "
        "order and budget. Effect size: Cohen's d_z = mean / std of the paired differences. "
        "Test: exact one-sided sign-flip permutation test of the claim the experiment exists to "
        "test, ticket > random re-init (all 2^n sign assignments; the verdict uses it at "
        f"α = {ALPHA} per level, and the pooled line is one test over all levels). Why one-sided: "
        "the two-sided exact test's smallest p with n pairs is 2/2^n, so 5 pairs could never "
        f"reject (0.0625); the one-sided test can from n = {min_rejecting_n()} pairs "
        f"(1/2^{min_rejecting_n()} = {1 / 2 ** min_rejecting_n():.3g}). A random re-init ahead "
        "is reported, not tested. The paired t-test (scipy, two-sided) is shown for reference "
        "and assumes normal differences."
        + (f" With n = {n} pairs the smallest p the exact test can give is {min_p:.3g}, so "
           f"no difference can be significant at {ALPHA}; the effect sizes are descriptive."
           if min_p >= ALPHA else ""))
