"""The executive report's figures (PNG, matplotlib, no display needed).

Every sparsity axis is "weights remaining" on a log scale, decreasing to the right as in
Frankle & Carbin (2019), with the matching sparsity written along the top.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from ticketsmith.report.stats import LevelStats

COLORS = {"dense": "#444444", "ticket": "#1f5fbf", "random_reinit": "#e07b00",
          "random_prune": "#2a9d3a"}
LABELS = {"dense": "dense", "ticket": "ticket (rewound init)", "random_reinit": "random re-init",
          "random_prune": "random prune"}
FORMAT_COLORS = ["#1f5fbf", "#e07b00", "#2a9d3a", "#8e44ad", "#c0392b", "#16a085", "#7f8c8d"]
GATE_COLOR = "#b00020"
DPI = 110


def _weights_axis(ax, densities: list[float]) -> None:
    """Log x axis of weights remaining (%), sparser to the right; sparsity on top."""
    ticks = sorted({round(100 * d, 6) for d in densities}, reverse=True)
    if len(ticks) > 8:  # keep labels legible: every k-th level, always the sparsest
        step = -(-len(ticks) // 8)
        ticks = sorted(set(ticks[::step]) | {ticks[-1]}, reverse=True)
    ax.set_xscale("log")
    ax.set_xlim(max(ticks) * 1.25, min(ticks) / 1.25)
    ax.set_xticks(ticks, [f"{t:.3g}%" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("weights remaining (log scale) — sparser to the right")
    top = ax.secondary_xaxis("top")
    top.set_xticks(ticks, [f"{100 - t:.3g}%" for t in ticks])
    top.minorticks_off()
    top.set_xlabel("sparsity")
    ax.grid(alpha=0.3, which="major")


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kw):
    """pyplot.subplots on a bare Figure: PNG files only (Agg), no pyplot import (about 0.3 s)
    and no figure manager holding figures until they are closed."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kw)


# Fixed margins, inches: tick and axis labels left and below, the sparsity axis and the
# title above. `tight_layout` found them by measuring every text of the figure, a draw of
# its own beside savefig's: about a third of the report's figure time.
MARGINS = {"left": 0.95, "right": 0.3, "bottom": 0.65, "top": 0.95}


def _save(fig, path: Path, rect=(0, 0, 1, 1), *, gap: float = 0.0, **inches: float) -> Path:
    """Save `fig` at DPI with fixed margins (inches; MARGINS unless given) inside `rect`
    (figure fractions left, bottom, right, top: what stays free for a legend or a
    suptitle); `gap`: inches between side-by-side panels."""
    m = {**MARGINS, **inches}
    width, height = fig.get_size_inches()
    x0, y0, x1, y1 = rect
    left, right = x0 + m["left"] / width, x1 - m["right"] / width
    cols = fig.axes[0].get_subplotspec().get_gridspec().ncols if fig.axes else 1
    panel = ((right - left) * width - (cols - 1) * gap) / cols  # inches per panel
    fig.subplots_adjust(left=left, right=right, bottom=y0 + m["bottom"] / height,
                        top=y1 - m["top"] / height, wspace=gap / panel)
    fig.savefig(path, dpi=DPI)
    return path


def _series(stats: list[LevelStats], variant: str, attr: str):
    rows = [s for s in stats if s.variant == variant and getattr(s, attr) is not None]
    rows.sort(key=lambda s: -s.density)
    return ([100 * s.density for s in rows], [getattr(s, attr).mean for s in rows],
            [getattr(s, attr).std or 0.0 for s in rows], rows)


def accuracy_vs_weights(stats: list[LevelStats], max_drop: float, path: Path,
                        safe_density: float | None = None) -> Path:
    """Test accuracy (mean ± std over replicates) per variant, the dense band and the gate."""
    fig, ax = subplots(figsize=(8.5, 5))
    dense = next(s for s in stats if s.variant == "dense")
    d, std = dense.accuracy.mean, dense.accuracy.std or 0.0
    ax.axhspan(d - std, d + std, color=COLORS["dense"], alpha=0.15,
               label=f"dense {dense.accuracy.text(2, '%')}")
    ax.axhline(d, color=COLORS["dense"], lw=1)
    ax.axhline(d - max_drop, color=GATE_COLOR, ls="--", lw=1.3,
               label=f"quality gate: dense − {max_drop:g} points")
    for variant in ("ticket", "random_reinit", "random_prune"):
        x, y, e, rows = _series(stats, variant, "accuracy")
        if rows:
            n = max(s.accuracy.n for s in rows)
            ax.errorbar(x, y, yerr=e, marker="o", ms=5, capsize=3, color=COLORS[variant],
                        label=f"{LABELS[variant]} (mean ± std, n={n})")
    pruned = [s.density for s in stats]
    if safe_density is not None:
        ax.axvspan(100 * 1.25, 100 * safe_density, color="#2a9d3a", alpha=0.07,
                   label="safe optimisation zone (passes every gate)")
    _weights_axis(ax, pruned)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy vs weights remaining")
    ax.legend(loc="best", fontsize=8.5)
    return _save(fig, path)


def early_stop_vs_weights(stats: list[LevelStats], path: Path) -> Path:
    """Early-stopping iteration (minimum validation loss), mean ± std per variant."""
    fig, ax = subplots(figsize=(8.5, 4.5))
    for variant in ("dense", "ticket", "random_reinit", "random_prune"):
        x, y, e, rows = _series(stats, variant, "early_stop")
        if rows:
            ax.errorbar(x, y, yerr=e, marker="s" if variant == "dense" else "o", ms=5,
                        capsize=3, color=COLORS[variant], label=LABELS[variant])
    _weights_axis(ax, [s.density for s in stats])
    ax.set_ylabel("early-stop iteration\n(min validation loss)")
    ax.set_title("Early-stopping iteration vs weights remaining (mean ± std over replicates)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8.5)
    return _save(fig, path)


def speedup_vs_sparsity(benchmarks: dict[int, dict[str, Any]], path: Path) -> Path | None:
    """Measured speedup vs dense per serving format and batch size, beside its ideal."""
    rows = [(lv, r, b["model"]["density"]) for lv, b in sorted(benchmarks.items())
            for r in b.get("results", []) if r.get("correct") and r.get("speedup")]
    if not rows:
        return None
    batch_sizes = sorted({r["batch_size"] for _, r, _ in rows})
    formats = sorted({r["format"] for _, r, _ in rows if r["format"] != "dense"})
    fig, axes = subplots(1, len(batch_sizes), figsize=(6.2 * len(batch_sizes), 4.8),
                             squeeze=False, sharey=True)
    densities = sorted({d for *_, d in rows}, reverse=True)
    for ax, bs in zip(axes[0], batch_sizes):
        for i, fmt in enumerate(formats):
            pts = sorted(((d, r) for _, r, d in rows if r["batch_size"] == bs and r["format"] == fmt),
                         key=lambda p: -p[0])
            if not pts:
                continue
            color = FORMAT_COLORS[i % len(FORMAT_COLORS)]
            x = [100 * d for d, _ in pts]
            y = [r["speedup"] for _, r in pts]
            lo = [r["speedup"] - r.get("spread", {}).get("speedup_min", r["speedup"]) for _, r in pts]
            hi = [r.get("spread", {}).get("speedup_max", r["speedup"]) - r["speedup"] for _, r in pts]
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", ms=5, capsize=3, color=color,
                        label=f"{fmt} measured")
            ideal = [r.get("ideal_speedup") for _, r in pts]
            if all(v is not None for v in ideal):
                ax.plot(x, ideal, ls="--", lw=1.2, color=color, alpha=0.8, label=f"{fmt} ideal")
        ax.plot([100 * d for d in densities], [1 / d for d in densities], ls=":", color="#777777",
                label="1 / density (weights-only bound)")
        ax.axhline(1.0, color="black", lw=1, label="dense = 1×")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(PlainLogFormatter())
        ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))
        _weights_axis(ax, densities)
        ax.set_title(f"batch size {bs}")
        ax.set_ylabel("speedup vs dense (×, log scale)")
    legend: dict[str, Any] = {}
    for ax in axes[0]:  # one legend for both panels, below them, off the data
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    order = sorted(legend, key=lambda k: (not k.endswith("measured"), not k.endswith("ideal")))
    fig.legend([legend[k] for k in order], order, loc="lower center", ncol=min(5, len(legend)),
               fontsize=8.5, frameon=False)
    fig.suptitle("Measured serving speedup vs sparsity (replicate-0 tickets; bars: range over "
                 "rounds; dashed: ideal from bytes moved)", fontsize=10)
    rows = -(-len(legend) // min(5, len(legend)))
    return _save(fig, path, rect=(0, 0.045 * rows + 0.02, 1, 1), top=1.2, gap=0.35)


class PlainLogFormatter(LogFormatter):
    """The ticks matplotlib labels on a log axis, written as plain numbers (0.2, 1, 2). Its
    default labels are mathtext (2×10⁻¹), whose parser is built on first use: about 0.1 s of
    CPU per process, and a tenth of each such figure's drawing time."""

    def __call__(self, x, pos=None):
        return f"{x:g}" if super().__call__(x, pos) else ""


def training_curves(curves: list[tuple[str, str, list[dict[str, float]]]], path: Path) -> Path | None:
    """Train loss and validation accuracy vs iteration for a few runs: (label, variant, rows)."""
    curves = [c for c in curves if c[2]]
    if not curves:
        return None
    fig, (loss_ax, acc_ax) = subplots(1, 2, figsize=(12, 4.5))
    cmap = colormaps["viridis"]
    for i, (label, variant, rows) in enumerate(curves):
        color = COLORS["dense"] if variant == "dense" else cmap(i / max(1, len(curves) - 1) * 0.85)
        ls = "--" if variant.startswith("random") else "-"
        it = [r["iteration"] for r in rows]
        loss_ax.plot(it, [r.get("train_loss", float("nan")) for r in rows], ls=ls, color=color,
                     label=label)
        acc_ax.plot(it, [100 * r.get("val_accuracy", float("nan")) for r in rows], ls=ls,
                    color=color, label=label)
        val = [(r["val_loss"], r["iteration"], r.get("val_accuracy")) for r in rows
               if r.get("val_loss") == r.get("val_loss") and "val_loss" in r]
        if val:
            _, at, acc = min(val)
            if acc is not None:
                acc_ax.plot([at], [100 * acc], marker="*", ms=11, color=color, ls="none")
    loss_ax.set_yscale("log")
    loss_ax.yaxis.set_major_formatter(PlainLogFormatter())
    loss_ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))
    loss_ax.set(xlabel="iteration", ylabel="training loss (log scale)", title="Training loss")
    acc_ax.set(xlabel="iteration", ylabel="validation accuracy (%)",
               title="Validation accuracy (★ early-stop iteration)")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=8)
    fig.suptitle("Training curves, replicate 0", fontsize=10)
    return _save(fig, path, top=0.75, gap=0.9)
