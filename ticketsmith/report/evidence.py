"""The report's supporting sections: the serving scorecard, the registry outcome and the
evidence (sources, versions, run ids, and plainly what the evidence does not support)."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ticketsmith import __version__
from ticketsmith.gates import FAIL, is_language_model, label
from ticketsmith.serving.benchmark import format_bytes
from ticketsmith.report import deployed
from ticketsmith.tracking import serving_tags
from ticketsmith.report.render import Block, Bullets, Code, Heading, Link, Strong, Table, para
from ticketsmith.report.stats import ALPHA, Facts, mean_bpb, min_rejecting_n

if TYPE_CHECKING:
    from ticketsmith.report.sources import ReportInputs


def _bytes(n: int | None) -> str:
    return "—" if n is None else format_bytes(n)


def scorecard(facts: Facts) -> list[Block]:
    """Latency, throughput and memory: dense vs the champion ticket, with the environment;
    then what the registered champion ships and how fast it measured."""
    return [Heading("Serving scorecard"), *measured(facts), *deployed.section(facts.deployed)]


def measured(facts: Facts) -> list[Block]:
    """Every format the benchmark timed at the champion's level (or the sparsest one)."""
    out: list[Block] = []
    if not facts.bench:
        return out + [para("No serving benchmark recorded yet: latency, throughput and memory "
                           "are unknown. Run prune with ", Code("--set experiment.benchmark=true"),
                           ", or ",
                           Code("ticketsmith benchmark --checkpoint models:/<name>@champion"),
                           ".")]
    ticket_levels = [lv for lv in facts.bench if lv > 0]
    if facts.champion is not None and facts.champion.level in facts.bench:
        level, who = facts.champion.level, "the champion ticket"
    elif ticket_levels:
        level = max(ticket_levels)
        who = "the sparsest benchmarked ticket (no champion was benchmarked)"
    else:
        return out + [para("Only the dense model was benchmarked; no ticket was timed.")]
    bench = facts.bench[level]
    m, env = bench.get("model", {}), bench.get("environment", {})
    out.append(para(f"Dense vs {who}: level {level}, {100 * m.get('sparsity', 0):.1f}% sparse, "
                    f"{m.get('nonzero_params', '?'):,} of {m.get('total_params', '?'):,} "
                    "parameters nonzero. Each format was checked against the masked model's "
                    "outputs before it was timed, side by side with dense in one process."))
    rows = []
    for r in bench.get("results", []):
        if r.get("correct"):
            lat = r.get("latency_ms") or {}
            acc = r.get("accuracy")
            rows.append((r["format"], str(r["batch_size"]), *(f"{lat.get(q, float('nan')):.3f}"
                                                              for q in ("p50", "p95", "p99")),
                         f"{r['throughput']:,.0f}", f"{r['speedup']:.2f}×",
                         f"{r['ideal_speedup']:.2f}×" if r.get("ideal_speedup") else "—",
                         _bytes(r.get("weight_bytes")), _bytes(r.get("peak_memory_bytes")),
                         f"{100 * acc:.2f}%" if acc is not None else "—"))
        else:
            rows.append((r["format"], str(r["batch_size"]), FAIL, "", "", "", "", "", "", "",
                         str(r.get("error") or "failed its correctness check")[:120]))
    out.append(Table(("Format", "Batch", "p50 ms", "p95 ms", "p99 ms", "Throughput (samples/s)",
                      "Speedup", "Ideal", "Weights", "Peak memory", "Accuracy"), tuple(rows),
                     numeric=tuple(range(1, 11))))
    keys = ("cpu", "cpu_count", "gpu", "device", "threads", "torch", "cuda", "quantized_engine",
            "python", "platform", "trials", "warmup", "timer", "peak_memory")
    out.append(Bullets(tuple((f"{k}: ", Code(str(env[k]))) for k in keys
                             if env.get(k) is not None)))
    plan = bench.get("plan") or {}
    if plan.get("formats"):
        out.append(para("Auto plan (per layer): ", Code(", ".join(
            f"{k}={v}" for k, v in plan["formats"].items()))))
    return out


def registry_section(facts: Facts, inputs: ReportInputs) -> list[Block]:
    out: list[Block] = [Heading("Registry outcome")]
    reg = inputs.registry
    if not inputs.from_mlflow:
        return out + [para("Not available: built from a local run folder, which has no model "
                           "registry.")]
    if reg is None or not reg.versions:
        from ticketsmith.tracking.registry import model_name_for  # MLflow only when the report reads MLflow

        name = model_name_for(inputs.name, inputs.exp_hash)
        return out + [para(f"No version of registered model '{name}' comes from this "
                           "experiment (registration switched off, or no level was gated).")]
    champ = reg.aliases.get("champion")
    mine = {v.version: v for v in reg.versions}
    if champ in mine:
        v = mine[champ]
        line = ["Registered model ", Code(reg.model_name), ": version ", Strong(f"v{champ}"),
                " is ", Code("champion"),
                f" (level {v.level}, {100 * (v.sparsity or 0):.1f}% sparse, run ",
                Link(v.run_id, inputs.run_link(v.run_id)), ")."]
        if v.serving.get(serving_tags.PLAN):
            line += [" It ships its checked serving plan: ", Code(v.serving[serving_tags.FORMAT]),
                     " (version tags ", Code(serving_tags.PREFIX + "*"),
                     "; see the serving scorecard)."]
        elif v.serving.get(serving_tags.ROUTES):  # a language model's plan
            line += [" It ships its checked serving plan (", Code(serving_tags.ROUTES), "): ",
                     v.serving[serving_tags.ROUTES], "; checked ",
                     v.serving.get(serving_tags.CHECKED, ""), "."]
        elif v.serving.get(serving_tags.FORMAT):
            line += [" It serves ", Code(v.serving[serving_tags.FORMAT]),
                     "; no checked serving plan is recorded for it."]
    elif champ:
        line = ["Registered model ", Code(reg.model_name), ": ", Code("champion"),
                f" is v{champ}, which does not come from this config hash."]
    else:
        line = ["Registered model ", Code(reg.model_name), ": no version holds ",
                Code("champion"), " (no ticket passed every gate)."]
    prev = reg.aliases.get("previous-champion")
    if prev:
        line += [f" v{prev} is ", Code("previous-champion"), " (kept for rollback)."]
    out.append(para(*line))
    rows = []
    for v in reg.versions:
        failed = [f"{k} {s}" for k, s in v.gates.items() if s.startswith(FAIL)]
        why = ("; ".join(failed) if failed else "every gate passed" if v.quality_gate == "passed"
               else "—")
        rows.append((f"v{v.version}", "—" if v.level is None else str(v.level),
                     "—" if v.sparsity is None else f"{100 * v.sparsity:.1f}%",
                     label(True) if v.quality_gate == "passed" else f"{FAIL} ({v.quality_gate})",
                     ", ".join(v.aliases) or "—", why, Link(v.run_id, inputs.run_link(v.run_id))))
    out.append(Table(("Version", "Level", "Sparsity", "Quality gate", "Aliases", "Why",
                      "Source run"), tuple(rows), numeric=(1, 2)))
    return out


def few_pairs(n: int) -> str | None:
    """What n ≥ 2 pairs allow the report's test (the one-sided exact sign-flip test, whose
    smallest p is 1/2^n): nothing below `min_rejecting_n()`, only a unanimous result just
    above it; None once that limit no longer binds."""
    least, smallest = min_rejecting_n(), 1 / 2 ** n
    if n < least:
        return (f"n={n} replicates: the one-sided exact test cannot reach p < {ALPHA} (its "
                f"smallest p is 1/2^{n} = {smallest:.3g}; that needs n ≥ {least} pairs); "
                "spreads are rough estimates from few samples.")
    if 2 * smallest >= ALPHA:  # the next most extreme assignment already fails
        return (f"n={n} replicates: the one-sided exact test reaches p < {ALPHA} only when "
                f"every pair favours the ticket (its smallest p is 1/2^{n} = {smallest:.3g}); "
                "spreads are rough estimates from few samples.")
    return None


def limits(facts: Facts, inputs: ReportInputs) -> list[Any]:
    """Plain statements of what the evidence does not support."""
    out: list[Any] = []
    n = facts.replicates
    if n < 2:
        out.append("n=1: no error bars, and no claim that the ticket beats random re-init is "
                   "statistically supported.")
    elif (few := few_pairs(n)) is not None:
        out.append(few)
    counts = {s.accuracy.n for s in facts.stats}
    if len(counts) > 1:
        out.append(f"Levels have unequal replicate counts ({', '.join(map(str, sorted(counts)))}"
                   "): an unfinished replicate; means are over the runs that finished.")
    if not any(s.variant == "random_reinit" for s in facts.stats):
        out.append("No random re-init control: nothing here shows that the initialisation "
                   "matters (the beats-random gate was not evaluated).")
    if not facts.bench:
        out.append("No serving benchmark: no speedup, latency or memory claim can be made.")
    else:
        out.append("Speedups come from one model per level (replicate 0) on one machine; other "
                   "hardware, thread counts and batch sizes will differ.")
    sparsest = max((s.sparsity for s in facts.stats if s.variant == "ticket"), default=None)
    if facts.ticket_break is None and sparsest is not None:
        out.append(f"The ticket never broke: the real breaking point lies beyond "
                   f"{100 * sparsest:.1f}% sparsity, which was not tested.")
    ch = facts.champion
    if ch is not None and facts.dense is not None:
        out += worst_replicate(facts)
        below = [v.level for v in facts.verdicts if not v.passed and v.sparsity < ch.sparsity]
        if below:
            out.append(f"Not monotone: level(s) {', '.join(map(str, below))} fail although the "
                       "sparser champion passes — a sign of noise at this n.")
    if inputs.config is not None and inputs.config.data.name == "synthetic":
        out.append("Synthetic generated data: these numbers say nothing about a real data set.")
    if facts.gate_error:
        out.append(f"Gates could not be evaluated: {facts.gate_error}.")
    return out + list(inputs.notes)


def worst_replicate(facts: Facts) -> list[str]:
    """The gate is on the mean: say so when one replicate alone at the champion level is
    beyond it (accuracy points for images, bits per byte for language models)."""
    reps = facts.level(facts.champion.level).by_replicate.values()
    if is_language_model(reps):
        rise = max(r["test_bpb"] for r in reps) - mean_bpb(facts.dense)
        bound = facts.gate.max_bpb_increase
        return ([f"The gate is on the mean: at the champion level one replicate alone is "
                 f"{rise:+.3f} bits per byte above dense, beyond the {bound:g} gate."]
                if rise > bound else [])
    drop = facts.dense.accuracy.mean - 100 * min(r["test_accuracy"] for r in reps)
    return ([f"The gate is on the mean: at the champion level one replicate alone is "
             f"{drop:.2f} points below dense, beyond the {facts.gate.max_accuracy_drop:g}"
             "-point gate."] if drop > facts.gate.max_accuracy_drop else [])


def determinism_text(policy: str) -> str:
    """The train.determinism policy in words (see ticketsmith.execution.determinism)."""
    what = {"strict": "deterministic kernels required (an op without one stops the run)",
            "warn": "deterministic kernels where torch has them, a warning where not",
            "off": "cuDNN autotuning and TF32 on: GPU results do not repeat exactly"}[policy]
    return (f"{policy} — on GPU, {what}; CPU results repeat exactly under every policy, and "
            "levels trained on another device or policy are refused on resume")


def held_out(cfg) -> str:
    """What the validation and test splits are: examples for images, whole documents for text."""
    d = cfg.data
    if cfg.task != "language_model":
        return f"{d.val_size} validation examples held out"
    if d.factory:
        return "whole documents held out for validation and test, as the factory splits them"
    return (f"whole documents held out: of every {d.holdout_every} in name order, the second-last "
            f"goes to validation and the last to test, so no text is in two splits; tokenizer "
            f"{d.tokenizer}")


def evidence(facts: Facts, inputs: ReportInputs) -> list[Block]:
    cfg = inputs.config
    items: list[Any] = [("Source: ", inputs.source), ("Config hash: ", Code(inputs.exp_hash))]
    if cfg is not None:
        d, m, t, p = cfg.data, cfg.model, cfg.train, cfg.prune
        items += [("Data set: ", Code(d.factory or d.name), f" (options {d.options or 'none'}, "
                   f"{held_out(cfg)})"),
                  ("Model: ", Code(m.factory or m.name), f" (options {m.options or 'none'})"),
                  ("Protocol: ", f"{p.levels} levels, {p.schedule} {p.scope} pruning of "
                   f"{p.fraction:g} of the remaining weights per level, rewind to iteration "
                   f"{p.rewind_iteration}; {t.optimizer} lr {t.lr:g}, batch {t.batch_size}, "
                   + (f"{t.iterations} iterations" if t.iterations else f"{t.epochs:g} epochs")),
                  ("Gates: ", (f"validation and test bits per byte ≤ dense + "
                               f"{cfg.gate.max_bpb_increase:g}" if cfg.task == "language_model"
                               else f"accuracy drop ≤ {cfg.gate.max_accuracy_drop:g} points; loss "
                   + (f"delta ≤ {cfg.gate.max_loss_delta:g}" if cfg.gate.max_loss_delta is not None
                      else "delta not bounded")) + f"; beats random re-init: "
                   f"{cfg.gate.require_beats_random}"),
                  ("Determinism: ", determinism_text(t.determinism))]
    per_variant = {}
    for s in facts.stats:
        per_variant.setdefault(s.variant, set()).add(s.accuracy.n)
    items.append(("Replicates: ", "; ".join(f"{v} n={'/'.join(map(str, sorted(c)))}"
                                            for v, c in per_variant.items()) or "none"))
    env = inputs.environment
    if env:
        hw = ("cpu", "gpu", "device", "threads", "platform")
        sw = ("ticketsmith", "torch", "mlflow", "python")

        def join(keys: tuple[str, ...]) -> str:
            return "; ".join(f"{k} {' / '.join(env[k])}" for k in keys if k in env)

        items += [("Training hardware: ", join(hw)), ("Versions: ", join(sw)),
                  ("Git commit: ", Code(" / ".join(env.get("git_commit", ["unknown"]))))]
    items.append(("Report: ", f"ticketsmith {__version__}, built "
                  f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"))
    out: list[Block] = [Heading("Evidence"), Bullets(tuple(items))]
    if inputs.parents:
        runs = [x for r, rid in sorted(inputs.parents.items())
                for x in (f" r{r} ", Link(rid, inputs.run_link(rid)))]
        out.append(para("Parent runs (one per replicate; this report is logged to each under ",
                        Code("report/"), "):", *runs))
    what = "MLflow runs" if inputs.from_mlflow else "run folders"
    rows = tuple((str(s.level), s.variant, ", ".join(f"r{r}" for r in sorted(s.by_replicate)),
                  tuple(x for i, rid in enumerate(s.runs)
                        for x in ((", " if i else ""), Link(rid, inputs.run_link(rid)))))
                 for s in facts.stats)
    out += [Heading(f"The {what} behind every number", 3),
            Table(("Level", "Variant", "Replicates", "Runs"), rows, numeric=(0,)),
            Heading("What the evidence does not support", 3),
            Bullets(tuple(limits(facts, inputs)) or ("Nothing flagged.",))]
    return out
