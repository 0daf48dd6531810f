"""The executive report: at what sparsity does quality drop, and what does serving save?

`build_report` reads one experiment from the MLflow tracking store (or, with `runs_prefix`,
from a local run folder written by `prune --no-tracking`) and writes

    <output_dir>/<experiment name>-<config hash>/executive_summary.md
    <output_dir>/<experiment name>-<config hash>/executive_summary.html   (self-contained)
    <output_dir>/<experiment name>-<config hash>/figures/*.png

then logs that folder as artifacts `report/` of every parent run of the experiment.
`python -m ticketsmith.report`, `ticketsmith report` and the MLproject `report` entry point
call it. CPU only; works against a remote tracking server.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from ticketsmith.base.files import atomic_write_text
from ticketsmith.base.config import ConfigError
from ticketsmith.report.evidence import evidence, registry_section, scorecard
from ticketsmith.report.figures import (accuracy_vs_weights, early_stop_vs_weights, speedup_vs_sparsity,
                                        training_curves)
from ticketsmith.report.render import Block, Figure, Heading, para, to_html, to_markdown
from ticketsmith.report.sections import VARIANT_NAMES, answer, paired_section, pct, results_table
from ticketsmith.report.frontier import family_local, family_mlflow, frontier_section
from ticketsmith.report.language import language_model_sections
from ticketsmith.gates import is_language_model
from ticketsmith.report.sources import ReportInputs, from_local, from_mlflow
from ticketsmith.report.stats import Facts, analyse
from ticketsmith.tracking.run_summary import NOTE_TAG, figure_markdown
from ticketsmith.tracking.tracker import retry


FIGURE = "figures/accuracy_vs_weights.png"   # ticket vs random re-init vs dense, one chart


def make_figures(facts: Facts, inputs: ReportInputs, folder: Path) -> list[Block]:
    """Draw every figure the data allow into `folder/figures`; say which could not be drawn."""
    figs = folder / "figures"
    shutil.rmtree(figs, ignore_errors=True)  # no stale figure from an earlier build
    figs.mkdir(parents=True)
    out: list[Block] = [Heading("Figures")]
    if facts.dense is None:
        return out + [para("No figures: there is no dense baseline to plot against.")]
    safe = facts.level(facts.champion.level).density if facts.champion else None
    accuracy_vs_weights(facts.stats, facts.gate.max_accuracy_drop,
                        folder / FIGURE, safe)
    out.append(Figure(FIGURE, "Test accuracy vs weights remaining: "
                      "ticket vs random re-init (mean ± std over replicates), dense band "
                      "(mean ± std) and the quality-gate threshold."))
    early_stop_vs_weights(facts.stats, figs / "early_stop_vs_weights.png")
    out.append(Figure("figures/early_stop_vs_weights.png", "Early-stopping iteration (minimum "
                      "validation loss) vs weights remaining."))
    if speedup_vs_sparsity(facts.bench, figs / "speedup_vs_sparsity.png"):
        out.append(Figure("figures/speedup_vs_sparsity.png", "Measured serving speedup vs "
                          "sparsity per format, with each format's ideal (bytes moved) and the "
                          "1/density bound."))
    else:
        out.append(para("No speedup figure: no serving benchmark has been recorded."))
    curves = [(label, variant, inputs.load_curve(rep, level, variant))
              for label, rep, level, variant in curve_picks(facts)]
    if training_curves(curves, figs / "training_curves.png"):
        out.append(Figure("figures/training_curves.png", "Training loss and validation accuracy "
                          "of replicate 0 at a few levels (dashed: random re-init)."))
    return out


def curve_picks(facts: Facts) -> list[tuple[str, int, int, str]]:
    """A few runs worth seeing: dense, a middle level, the champion, the break, the sparsest."""
    tickets = sorted((s for s in facts.stats if s.variant == "ticket"), key=lambda s: s.level)
    levels = [0] + ([tickets[len(tickets) // 2].level, tickets[-1].level] if tickets else [])
    for s in (facts.champion, facts.ticket_break):
        if s is not None:
            levels.append(s.level)
    picks = []
    for level in sorted(set(levels)):
        s = facts.level(level, "dense" if level == 0 else "ticket")
        if s is not None:
            rep = min(s.by_replicate)
            picks.append((f"L{level} {VARIANT_NAMES[s.variant]} ({pct(s.density)} weights)",
                          rep, level, s.variant))
    if tickets and (r := facts.level(tickets[-1].level, "random_reinit")) is not None:
        picks.append((f"L{r.level} random re-init ({pct(r.density)} weights)",
                      min(r.by_replicate), r.level, "random_reinit"))
    return picks


# --- the whole report ----------------------------------------------------------------------

def report_folder(output_dir: str | Path, inputs: ReportInputs) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", inputs.name).strip("_") or "experiment"
    return Path(output_dir) / f"{safe}-{inputs.exp_hash}"


def build_report(client, experiment_ref: str | None, output_dir: str | Path = "reports", *,
                 runs_prefix: str | Path | None = None) -> Path:
    """Write the executive summary (markdown + HTML + figures); return the markdown path.

    client: an MlflowClient (None: the default tracking URI); ignored with `runs_prefix`.
    experiment_ref: experiment name or config hash (with `runs_prefix`: the hash folder,
    optional when the prefix holds one run folder).
    """
    if runs_prefix is not None:
        inputs = from_local(runs_prefix, experiment_ref)
    elif not experiment_ref:
        raise ConfigError("--experiment: give an MLflow experiment name or config hash "
                          "(or --runs-prefix PATH for a local run folder)")
    else:
        if client is None:
            from mlflow import MlflowClient

            client = MlflowClient()
        inputs = from_mlflow(client, experiment_ref)
    facts = analyse(inputs)
    family = (family_local(runs_prefix, inputs) if runs_prefix is not None
              else family_mlflow(client, inputs))
    folder = report_folder(output_dir, inputs)
    title = f"Executive summary — {inputs.name} ({inputs.exp_hash})"
    if is_language_model(inputs.records):  # bits per byte, perplexity and samples
        blocks: list[Block] = [*language_model_sections(facts, inputs, folder),
                               *registry_section(facts, inputs),
                               *evidence(facts, inputs)]
    else:
        blocks = [Heading("The answer"), *answer(facts), *results_table(facts),
                  *paired_section(facts), *make_figures(facts, inputs, folder),
                  *frontier_section(facts, family, folder),
                  *scorecard(facts), *registry_section(facts, inputs),
                  *evidence(facts, inputs)]
    md = folder / "executive_summary.md"
    atomic_write_text(md, to_markdown(title, blocks))
    atomic_write_text(folder / "executive_summary.html", to_html(title, blocks, folder))
    for run_id in inputs.parents.values():
        retry(lambda: client.log_artifacts(run_id, str(folder), "report"), "upload report")
        retry(lambda: client.set_tag(run_id, NOTE_TAG, parent_description(
            facts, run_id, folder, blocks[1:4] if is_language_model(inputs.records) else None)),
              "describe parent run")
    return md


def parent_description(facts: Facts, run_id: str, folder: Path,
                       lm_answer: list[Block] | None = None) -> str:
    """The parent run's description in the MLflow UI (its Overview tab): the report's answer,
    the ticket-vs-random figure (one chart with both, which MLflow's default charts are not),
    then where the rest is."""
    answer_md = to_markdown("", lm_answer or answer(facts)).split("\n", 2)[-1].strip()
    if lm_answer is not None:  # a language model: bits per byte, its own figure
        served = (", and with a serving benchmark `tokens_per_s/decode_batch_1`, "
                  "`usd_per_m_tokens/decode_batch_1` and the like" if facts.bench else "")
        return (f"{answer_md}\n\nPer level: **Model metrics** (`bpb/ticket`, "
                f"`bpb/random_reinit`, `bpb/dense`, `bpb/random_reinit_minus_ticket`{served}); "
                "the full executive report is the artifact `report/executive_summary.html`.")
    figure = ""
    if (folder / FIGURE).is_file():
        figure = figure_markdown(run_id, f"report/{FIGURE}", "Test accuracy vs weights "
                                 "remaining: ticket vs random re-init and dense") + "\n\n"
    return (f"{answer_md}\n\n{figure}Per level: **Model metrics** (`accuracy/ticket`, "
            "`accuracy/random_reinit`, `accuracy/ticket_minus_random_reinit`, ...); the full "
            "executive report is the artifact `report/executive_summary.html`.")

