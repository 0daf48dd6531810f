"""The cost–quality frontier: accuracy against measured serving speedup, per granularity.

An experiment family is every experiment of the same model and data (the same `model` and
`data` config sections) in one tracking store or run-folder prefix. When the family holds more
than one granularity (weight, neuron, channel), the report draws each granularity's tickets as
test accuracy against their measured speedup over dense, side by side per batch size: the
answer to "which kind of ticket should I ship?".
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ticketsmith.report.figures import FORMAT_COLORS, GATE_COLOR, _save, subplots
from ticketsmith.report.render import Block, Figure, Heading, Table, para
from ticketsmith.report.sources import ReportInputs, from_local, from_mlflow
from ticketsmith.report.stats import Facts, analyse, batch_sizes, best_format
from ticketsmith.tracking.tracker import TAG, retry

FIGURE = "figures/accuracy_vs_speedup.png"
MARKERS = {"weight": "o", "neuron": "s", "channel": "D"}


def _same_family(a: ReportInputs, b: ReportInputs) -> bool:
    return (a.config is not None and b.config is not None
            and a.config.model == b.config.model and a.config.data == b.config.data)


def family_mlflow(client, inputs: ReportInputs) -> list[ReportInputs]:
    """The other experiments of the same model and data in the tracking store."""
    if inputs.config is None:
        return []
    ids = [e.experiment_id for e in retry(client.search_experiments, "list experiments")]
    flt = (f"tags.`{TAG}role` = 'parent' and params.`model.name` = '{inputs.config.model.name}' "
           f"and params.`data.name` = '{inputs.config.data.name}'")
    runs = retry(lambda: client.search_runs(ids, flt, max_results=1000), "search runs")
    refs = {}
    for run in runs:
        h = run.data.tags.get(TAG + "hash")
        if h and h != inputs.exp_hash and h not in refs:
            refs[h] = f"{retry(lambda: client.get_experiment(run.info.experiment_id), 'get experiment').name}/{h}"
    found = [from_mlflow(client, ref) for ref in refs.values()]
    return [f for f in found if _same_family(inputs, f)]


def family_local(prefix: str | Path, inputs: ReportInputs) -> list[ReportInputs]:
    """The other run folders beside this one (under the same prefix) of the same model and data."""
    root = Path(prefix)
    root = root.parent if (root / "config.yaml").is_file() else root
    found = [from_local(root, p.parent.name) for p in sorted(root.glob("*/config.yaml"))
             if p.parent.name != inputs.exp_hash]
    return [f for f in found if _same_family(inputs, f)]


def _points(facts: Facts, bs: int) -> list[tuple[float, float, float, int, str]]:
    """(speedup, accuracy mean, std, level, format) of every benchmarked ticket level."""
    out = []
    for level, bench in sorted(facts.bench.items()):
        s = facts.level(level, "dense" if level == 0 else "ticket")
        row = best_format(bench, bs) if level else None
        if s is None or (level and row is None):
            continue
        out.append((row["speedup"] if row else 1.0, s.accuracy.mean, s.accuracy.std or 0.0,
                    level, row["format"] if row else "dense"))
    return out


def frontier_figure(by_granularity: dict[str, Facts], path: Path) -> Path | None:
    """One panel per batch size; in each, accuracy vs speedup for every granularity."""
    sizes = sorted({bs for f in by_granularity.values() for bs in batch_sizes(f)})
    if not sizes:
        return None
    fig, axes = subplots(1, len(sizes), figsize=(6.2 * len(sizes), 4.8), squeeze=False,
                             sharey=True)
    dense = next(iter(by_granularity.values())).dense
    for ax, bs in zip(axes[0], sizes):
        for i, (gran, facts) in enumerate(sorted(by_granularity.items())):
            pts = _points(facts, bs)
            if not pts:
                continue
            x, y, e = zip(*((p[0], p[1], p[2]) for p in pts))
            ax.errorbar(x, y, yerr=e, marker=MARKERS.get(gran, "o"), ms=5, capsize=3,
                        color=FORMAT_COLORS[i % len(FORMAT_COLORS)], label=f"{gran} tickets")
            for sp, acc, _, level, _ in pts:
                ax.annotate(f"L{level}", (sp, acc), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        if dense is not None:
            thr = next(iter(by_granularity.values())).gate.max_accuracy_drop
            ax.axhline(dense.accuracy.mean - thr, color=GATE_COLOR, ls="--", lw=1.2,
                       label=f"quality gate: dense − {thr:g} points")
        ax.axvline(1.0, color="#444444", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(f"measured speedup vs dense at batch {bs} (log scale)")
        ax.set_title(f"batch {bs}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8.5)
    axes[0][0].set_ylabel("test accuracy (%)")
    fig.suptitle("Accuracy vs measured serving speedup, per granularity")
    return _save(fig, path, rect=(0, 0, 1, 0.95), top=0.45, gap=0.35)


def frontier_section(facts: Facts, family: list[ReportInputs], folder: Path) -> list[Block]:
    """The frontier when the family holds another granularity; nothing otherwise."""
    by_granularity: dict[str, Facts] = {facts.granularity: facts}
    names: dict[str, str] = {}
    for member in family:
        other = analyse(member)
        if other.granularity not in by_granularity and other.bench:
            by_granularity[other.granularity] = other
            names[other.granularity] = f"{member.name} ({member.exp_hash})"
    if len(by_granularity) < 2:
        return []
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    if frontier_figure(by_granularity, folder / FIGURE) is None:
        return []
    rows = tuple(_best_row(g, f, names.get(g, "this experiment"))
                 for g, f in sorted(by_granularity.items()))
    return [Heading("Which kind of ticket to ship? Accuracy vs speedup by granularity"),
            para("Every benchmarked level of each granularity of the same model and data: test "
                 "accuracy (mean ± std over replicates) against the best correct serving format's "
                 "measured speedup over dense (replicate 0's model). Structured tickets compact "
                 "into smaller dense networks; unstructured ones need very high sparsity or "
                 "special kernels to be faster."),
            Figure(FIGURE, "Test accuracy vs measured speedup over dense, per granularity and "
                   "batch size; L = level; the dashed line is the quality gate."),
            Table(("Granularity", "Experiment", "Sparsest ticket within the gate",
                   "Accuracy", "Speedups"), rows)]


def _best_row(granularity: str, facts: Facts, experiment: str) -> tuple[str, ...]:
    ch = facts.champion
    if ch is None:
        return (granularity, experiment, "none passes every gate", "—", "—")
    s = facts.level(ch.level)
    sizes = batch_sizes(facts)
    speed: list[Any] = [f"{r['speedup']:.2f}× at batch {bs}" for bs in sizes
                        if (r := best_format(facts.bench.get(ch.level), bs))]
    return (granularity, experiment, f"level {ch.level}, {100 * s.sparsity:.1f}% sparse",
            s.accuracy.text(2, "%"), "; ".join(speed) or "not benchmarked")
