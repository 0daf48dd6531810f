"""The report of a language-model experiment: bits per byte and perplexity, lower is better.

The answer, the table, the breaking point and the paired statistics speak in test bits per
byte (comparable across tokenizers); the figure plots it against weights remaining; the
samples of dense, the champion and random re-init at the breaking point stand side by side so
a reader sees what the quality loss looks like. Tokens per second and dollars per million tokens
per level, the answer's cost line and the serving scorecard come from `lm_serving`; the registry
and evidence sections are the shared ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from ticketsmith.report import lm_serving
from ticketsmith.report.figures import COLORS, GATE_COLOR, LABELS, _save, _weights_axis, subplots
from ticketsmith.report.render import Block, Figure, Heading, Table, para
from ticketsmith.report.sources import ReportInputs
from ticketsmith.report.stats import Facts, directional_verdict, paired_t_p, sign_flip_p

NAMES = {"dense": "dense", "ticket": "ticket", "random_reinit": "random re-init",
         "random_prune": "random prune"}
LM_FIGURE = "figures/bpb_vs_weights.png"


@dataclass(frozen=True)
class Row:
    level: int
    variant: str
    density: float
    bpb: list[float]           # test bits per byte, one per replicate
    ppl: list[float]           # test perplexity per token
    by_replicate: dict[int, dict[str, Any]]

    @property
    def mean(self) -> float:
        return mean(self.bpb)

    def text(self, values: list[float], digits: int = 3) -> str:
        sd = f" ± {stdev(values):.{digits}f}" if len(values) > 1 else ""
        return f"{mean(values):.{digits}f}{sd} (n={len(values)})"


def rows(records: list[dict[str, Any]]) -> list[Row]:
    groups: dict[tuple[int, str], dict[int, dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["level"], r["variant"]), {})[r["replicate"]] = r
    out = [Row(lv, v, mean(r["density"] for r in reps.values()),
               [r["test_bpb"] for r in reps.values()],
               [r["test_perplexity"] for r in reps.values()], reps)
           for (lv, v), reps in groups.items()]
    order = list(NAMES)
    return sorted(out, key=lambda r: (r.level, order.index(r.variant) if r.variant in order else 9))


def breaking(table: list[Row], at) -> Row | None:
    """The row of a breaking level found by `stats.analyse` (in bits per byte), None if none."""
    return None if at is None else next(r for r in table
                                        if r.level == at.level and r.variant == at.variant)


def answer(facts: Facts, table: list[Row], rewind: int | None) -> list[Block]:
    bound, dense = facts.gate.max_bpb_increase, next(r for r in table if r.variant == "dense")
    ch = facts.champion
    t_break, r_break = breaking(table, facts.ticket_break), breaking(table, facts.random_break)
    head = (f"Safe optimisation zone: up to {ch.sparsity:.1%} sparsity"
            if ch else "No ticket passes every gate")
    detail = (f" ({1 - ch.sparsity:.1%} of the prunable weights left): the ticket's test bits "
              f"per byte are {ch.ticket_bpb:.3f} against dense {dense.text(dense.bpb)}, within "
              f"the {bound:g} bits-per-byte gate." if ch else
              f" within {bound:g} bits per byte of dense ({dense.text(dense.bpb)}).")
    lines = [para(head, detail),
             lm_serving.cost_line(facts, ch.ticket_bpb - dense.mean if ch else None),
             para(f"Ticket: {_broke(t_break)}. Random re-init of the same masks: "
                  f"{_broke(r_break)}. Lower is better; perplexity is per token. "
                  + (f"Survivors are rewound to iteration {rewind} of the dense run "
                     "(late rewinding)." if rewind else
                     "Survivors are rewound to the initialisation (iteration 0)."))]
    if facts.replicates < 2:
        lines.append(para("n=1: one replicate only — no error bars and no claim of "
                          "significance. Run with `--set experiment.replicates=5`."))
    return lines


def _broke(r: Row | None) -> str:
    return (f"breaks the gate at level {r.level} ({1 - r.density:.1%} sparse, "
            f"{r.text(r.bpb)} bits per byte)" if r else "did not break within the levels run")


def table_section(table: list[Row], facts: Facts) -> list[Block]:
    dense = next(r for r in table if r.variant == "dense")
    verdict = {v.level: ("PASS" if v.passed else "FAIL") for v in facts.verdicts}
    body = [[NAMES.get(r.variant, r.variant), str(r.level), f"{1 - r.density:.1%}",
             r.text(r.bpb), r.text(r.ppl, 2),
             "—" if r.level == 0 else f"{r.mean - dense.mean:+.3f}",
             verdict.get(r.level, "—") if r.variant == "ticket" else "—",
             *lm_serving.level_cells(facts, r.level,  # what a level serves
                                     r.variant == ("dense" if r.level == 0 else "ticket"))]
            for r in table]
    return [Heading("Results by level"),
            para("Test bits per byte and perplexity per token over replicates (mean ± sample "
                 f"std, n); Δ is the rise in bits per byte over dense; the gate bounds it by "
                 f"{facts.gate.max_bpb_increase:g} on validation and test and asks the ticket "
                 "to beat random re-init. Decode tokens/s (speedup vs dense) and dollars per "
                 "million generated tokens are for the model each level serves (level 0: "
                 "dense; then the ticket), replicate 0, at batch 1; the serving scorecard has "
                 "every batch and phase."),
            Table(("Variant", "Level", "Sparsity", "Bits per byte", "Perplexity", "Δ bpb",
                   "Gate", "Decode tok/s BS=1", "$/M tokens BS=1"),
                  tuple(tuple(r) for r in body), numeric=(1, 2, 3, 4, 5, 7, 8))]


def paired_section(table: list[Row]) -> list[Block]:
    body = []
    for t in (r for r in table if r.variant == "ticket"):
        other = next((r for r in table if r.level == t.level and r.variant == "random_reinit"), None)
        if other is None:
            continue
        common = sorted(set(t.by_replicate) & set(other.by_replicate))
        diffs = [other.by_replicate[k]["test_bpb"] - t.by_replicate[k]["test_bpb"] for k in common]
        if not diffs:
            continue
        p = sign_flip_p(diffs) if len(diffs) > 1 else None
        t_p = paired_t_p(diffs)
        sd = f" ± {stdev(diffs):.3f}" if len(diffs) > 1 else ""
        body.append([str(t.level), f"{1 - t.density:.1%}", str(len(diffs)),
                     f"{mean(diffs):+.3f}{sd}", "—" if t_p is None else f"{t_p:.3g}",
                     "—" if p is None else f"{p:.3g}",
                     "n=1: no test" if p is None else directional_verdict(mean(diffs), p)])
    if not body:
        return []
    return [Heading("Does the initialisation matter? Ticket vs random re-init"),
            para("Random re-init minus ticket in test bits per byte, paired by replicate: "
                 "positive means the ticket is better. Exact sign-flip test (one-sided, ticket "
                 "better) beside the two-sided paired t-test."),
            Table(("Level", "Sparsity", "Pairs", "Random − ticket (bpb)", "Paired t p",
                   "Sign-flip p", "Verdict"), tuple(tuple(r) for r in body),
                  numeric=(0, 1, 2, 3, 4, 5))]


def figure(table: list[Row], bound: float, folder: Path) -> list[Block]:
    path = folder / LM_FIGURE
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = subplots(figsize=(8.5, 5))
    dense = next(r for r in table if r.variant == "dense")
    ax.axhline(dense.mean, color=COLORS["dense"], lw=1, label=f"dense {dense.text(dense.bpb)}")
    ax.axhline(dense.mean + bound, color=GATE_COLOR, ls="--", lw=1.3,
               label=f"quality gate: dense + {bound:g} bits per byte")
    for variant in ("ticket", "random_reinit", "random_prune"):
        rs = sorted((r for r in table if r.variant == variant), key=lambda r: -r.density)
        if rs:
            ax.errorbar([100 * r.density for r in rs], [r.mean for r in rs],
                        yerr=[stdev(r.bpb) if len(r.bpb) > 1 else 0 for r in rs], marker="o",
                        capsize=3, color=COLORS[variant], label=LABELS[variant])
    _weights_axis(ax, [r.density for r in table])
    ax.set_ylabel("test bits per byte (lower is better)")
    ax.set_title("Bits per byte vs weights remaining")
    ax.legend(fontsize=8.5)
    _save(fig, path)
    caption = "Test bits per byte vs weights remaining: ticket vs random re-init, dense and the gate."
    return [Heading("Figures"), Figure(LM_FIGURE, caption)]


def parse_samples(text: str) -> dict[str, dict[str, str]]:
    """samples.txt (tasks.text_samples) → prompt → {"greedy": ..., "sampled": ...}."""
    out: dict[str, dict[str, str]] = {}
    for chunk in text.split("### prompt: ")[1:]:
        head, _, rest = chunk.partition("\n--- greedy\n")
        greedy, _, sampled = rest.partition("\n--- sampled")
        out[head.strip()] = {"greedy": greedy.strip(), "sampled": sampled.partition("\n")[2].strip()}
    return out


def _cell(text: str, limit: int = 160) -> str:
    flat = " ↵ ".join(text.splitlines())  # a table cell holds one line
    return flat if len(flat) <= limit else flat[:limit] + " …"


def samples_section(table: list[Row], facts: Facts, inputs: ReportInputs) -> list[Block]:
    """Dense, the champion and random re-init at the breaking point (or the sparsest level)."""
    broke = breaking(table, facts.ticket_break)
    at = broke or max((r for r in table if r.variant == "ticket"), key=lambda r: r.level,
                      default=None)
    picks = [("dense", 0, "dense")]
    if facts.champion is not None:
        picks.append((f"champion (level {facts.champion.level})", facts.champion.level, "ticket"))
    if at is not None:
        picks.append((f"random re-init (level {at.level}{', breaking point' if broke else ''})",
                      at.level, "random_reinit"))
    found = [(title, parse_samples(text)) for title, lv, v in picks
             if (text := inputs.load_samples(0, lv, v))]
    if not found:
        return []
    prompts = list(found[0][1])
    blocks: list[Block] = [Heading("Samples side by side"),
                           para("Replicate 0's continuations of the same prompts, as written by "
                                "each trained model (↵ marks a line break).")]
    for mode in ("greedy", "sampled"):
        body = tuple((p, *(_cell(s.get(p, {}).get(mode, "")) for _, s in found))
                     for p in prompts)
        blocks += [Heading(f"{mode.capitalize()} continuations", 3),
                   Table(("Prompt", *(t for t, _ in found)), body)]
    return blocks


def language_model_sections(facts: Facts, inputs: ReportInputs, folder: Path) -> list[Block]:
    table = rows(inputs.records)
    rewind = inputs.config.prune.rewind_iteration if inputs.config is not None else None
    return [Heading("The answer"), *answer(facts, table, rewind), *table_section(table, facts),
            *paired_section(table), *figure(table, facts.gate.max_bpb_increase, folder),
            *samples_section(table, facts, inputs),
            *lm_serving.scorecard(facts, {r.level: r.mean - dense_mean(table) for r in table
                                          if r.variant == "ticket"})]


def dense_mean(table: list[Row]) -> float:
    return next(r.mean for r in table if r.variant == "dense")
