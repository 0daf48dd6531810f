"""The serving side of a language-model report: tokens per second and dollars per million
generated tokens per level, beside bits per byte, and the answer's cost line.

Every figure comes from the levels' recorded benchmarks (`serving.lm_levels`): at each level
the format it serves (`served`) against dense timed beside it in the same process. A speedup
counts as one only when it is at least `MIN_GAIN` and beyond the run's noise span (dense timed
against itself, lowest to highest over every level's rounds); otherwise the report says plainly
that sparsity bought no measurable speed on this machine.
"""
from __future__ import annotations

from typing import Any

from ticketsmith.report import deployed
from ticketsmith.report.render import Block, Bullets, Code, Heading, Table, para
from ticketsmith.report.sections import serving_hardware
from ticketsmith.report.stats import Facts
from ticketsmith.serving.lm_levels import dense_row, served
from ticketsmith.tracking.serving_tags import CHECKED, FORMAT, PLAN, ROUTES, THREADS

MIN_GAIN = 1.1  # a decode speedup below this is not called faster, whatever the noise floor


def usd(x: float) -> str:
    """Dollars with three significant figures below $10 ($0.0248), cents above."""
    return f"${x:,.2f}" if x >= 10 else f"${x:.3g}"


def headline_batch(bench: dict[str, Any]) -> int:
    """The batch the answer quotes: the smallest timed (1 by default: one user's decode)."""
    return min(r["batch_size"] for r in bench["results"])


def machine(bench: dict[str, Any]) -> str:
    env = bench.get("environment", {})
    threads = env.get("threads", "?")
    return (f"{serving_hardware(env)}, {threads} thread{'' if threads == 1 else 's'}, "
            f"{env.get('device', 'cpu')}")


def price(bench: dict[str, Any]) -> str:
    c = bench.get("cost", {})
    if c.get("price_date"):
        return (f"{c['instance']} at ${c['usd_per_hour']:g}/h, its on-demand list price of "
                f"{c['price_date']} from memory")
    return f"a configured ${c.get('usd_per_hour', 0):g}/h"


def noise_span(benches, key: str) -> tuple[float, float] | None:
    """Lowest and highest ratio of dense timed against itself at `key` (e.g. 'decode_batch_1')
    over every level's benchmark: how far this machine's noise alone moved a ratio in the run."""
    spans = [f[key] for b in benches if (f := b.get("environment", {}).get("noise_floor", {}))
             and key in f]
    return (min(s["min"] for s in spans), max(s["max"] for s in spans)) if spans else None


def decode_verdict(row: dict[str, Any], bench: dict[str, Any], bs: int, benches) -> str:
    """'decode runs 2.10× faster' only at least MIN_GAIN and beyond the run's noise span;
    otherwise the measured ratio, the noise and the width, said plainly."""
    z = row["decode_speedup"]["median"]
    lo, hi = noise_span(benches, f"decode_batch_{bs}") or (1.0, 1.0)
    if z >= MIN_GAIN and z > hi:
        return f"decode runs {z:.2f}× faster ({row['format']}, batch {bs})"
    width = bench.get("model", {}).get("width", "?")
    bound = row.get("decode_ideal_speedup")
    return (f"decode runs no faster than dense within this machine's noise ({z:.2f}× at batch "
            f"{bs}; dense against itself {lo:.2f}–{hi:.2f}× over the run): at width {width} "
            "sparsity bought no measurable decode speed here"
            + (f", though bytes moved per token would allow {bound:.2f}×"
               if bound and bound >= MIN_GAIN else ""))


def cost_line(facts: Facts, delta_bpb: float | None) -> Block:
    """The answer's serving sentence, from the champion level's recorded benchmark."""
    ch = facts.champion
    if ch is None:
        return para("Serving cost: no ticket passes every gate, so none is priced.")
    bench = facts.bench.get(ch.level)
    if not bench or bench.get("kind") != "language_model":
        return para(f"Serving cost: tokens per second at level {ch.level} were not measured; "
                    "run prune with ", Code("--set experiment.benchmark=true"), ".")
    bs = headline_batch(bench)
    row, dense = served(bench, bs), dense_row(bench, bs)
    return para(f"At {100 * ch.sparsity:.1f}% sparsity quality holds (test bits per byte "
                f"{delta_bpb:+.3f}), {decode_verdict(row, bench, bs, facts.bench.values())}, and a "
                f"million tokens cost {usd(row['usd_per_million_tokens'])} instead of "
                f"{usd(dense['usd_per_million_tokens'])} on this machine ({machine(bench)}; "
                f"{price(bench)}).")


def level_cells(facts: Facts, level: int, is_served: bool) -> tuple[str, str]:
    """(decode tokens/s with speedup, $ per M tokens) at the headline batch for a results row."""
    bench = facts.bench.get(level) if is_served else None
    if not is_served or not facts.bench:
        return "—", "—"
    if bench is None or bench.get("kind") != "language_model":
        return "not benchmarked", "—"
    bs = headline_batch(bench)
    row = served(bench, bs)
    return (f"{row['decode_tokens_per_s']:,.0f} ({row['decode_speedup']['median']:.2f}×)",
            usd(row["usd_per_million_tokens"]))


def _bounded(row: dict[str, Any], phase: str) -> str:
    """'1.02× (0.98–1.10); bound 1.00×': median speedup, its range over rounds, the bound."""
    s = row[f"{phase}_speedup"]
    return (f"{s['median']:.2f}× ({s['min']:.2f}–{s['max']:.2f}); "
            f"bound {row[f'{phase}_ideal_speedup']:.2f}×")


def scorecard(facts: Facts, bpb_delta: dict[int, float]) -> list[Block]:
    """Per benchmarked level and batch: what it serves, tokens/s, speedups with their bounds,
    latency and cost, dense beside it; then the settings, machine, noise and price."""
    out: list[Block] = [Heading("Serving scorecard: tokens per second and cost")]
    benches = {lv: b for lv, b in sorted(facts.bench.items()) if b.get("kind") == "language_model"}
    if not benches:
        return out + [para("No serving benchmark recorded yet: tokens per second and cost are "
                           "unknown. Run prune with ", Code("--set experiment.benchmark=true"),
                           ", or ", Code("ticketsmith benchmark --checkpoint PATH_OR_URI"), "."),
                      *shipped(facts)]
    rows = []
    for level, b in benches.items():
        for bs in sorted({r["batch_size"] for r in b["results"]}):
            r, d = served(b, bs), dense_row(b, bs)
            lat = r["token_latency_ms"]
            rows.append((str(level), f"{100 * _sparsity(facts, level):.1f}%",
                         "—" if level == 0 else f"{bpb_delta.get(level, float('nan')):+.3f}",
                         str(bs), r["format"], f"{r['decode_tokens_per_s']:,.0f}",
                         _bounded(r, "decode"), f"{r['prefill_tokens_per_s']:,.0f}",
                         _bounded(r, "prefill"),
                         f"{r['ttft_ms']:.2f}", f"{lat['p50']:.2f} / {lat['p99']:.2f}",
                         usd(r["usd_per_million_tokens"]), usd(d["usd_per_million_tokens"])))
    first = next(iter(benches.values()))
    s, env = first["settings"], first.get("environment", {})
    out += [para("Each level's served model (level 0: dense; then the ticket, replicate 0) timed "
                 "side by side with dense in one process, in interleaved rounds, every format "
                 "checked against the masked model's logits first. The served format is the "
                 "fastest exact one by decode tokens/s (dense where nothing beats it). Speedups "
                 "are the median over rounds of the within-round ratio (range in brackets); the "
                 "bound is what bytes moved per decoded token (weights + KV cache) or multiply-"
                 "adds per prefilled token allow. Dollars are per million generated tokens at "
                 "the instance price."),
            Table(("Level", "Sparsity", "Δ bpb", "Batch", "Served format", "Decode tok/s",
                   "Decode speedup", "Prefill tok/s", "Prefill speedup", "TTFT ms",
                   "p50 / p99 ms per token", "$/M tokens", "$/M tokens dense"),
                  tuple(rows), numeric=tuple(range(0, 13))),
            Bullets((f"Settings: prompt {s['prompt_tokens']} tokens, {s['new_tokens']} new tokens, "
                     f"{s['rounds']} rounds per level.",
                     f"Machine: {machine(first)}; torch {env.get('torch', '?')}; memory bandwidth "
                     f"{env.get('memory_bandwidth_bytes_per_s', 0) / 1e9:.1f} GB/s (numpy copy).",
                     "Noise floor (dense against itself, lowest–highest over levels): "
                     + noise_text(benches.values()) + ".",
                     (f"Price: {price(first)}; set ", Code("serving.usd_per_hour"), " or ",
                      Code("serving.node"), "."))),
            *shipped(facts)]
    return out


def shipped(facts: Facts) -> list[Block]:
    """What the registered champion ships: its checked plan when it has one, else in words."""
    d = facts.deployed
    if d is None:
        return []
    if PLAN in d.tags:
        return deployed.section(d)
    if ROUTES in d.tags:  # and its end-to-end figures once serving_http_lm.py --record ran
        return [para(f"The registered champion (v{d.version}) ships its checked serving plan "
                     f"({d.tags.get(THREADS)} threads): {d.tags[ROUTES]}. Checked "
                     f"{d.tags.get(CHECKED, '')}."), *deployed.end_to_end_table(d)]
    return [para(f"The registered champion (v{d.version}) serves ", Code(d.tags[FORMAT]),
                 ": no checked serving plan is recorded for it, so the formats above are what "
                 "the benchmark measured, not what ships.")]


def noise_text(benches) -> str:
    keys = sorted({k for b in benches for k in b.get("environment", {}).get("noise_floor", {})})
    return "; ".join(f"{k.replace('_', ' ')} {lo:.2f}–{hi:.2f}×"
                     for k in keys for lo, hi in [noise_span(benches, k)]) or "not recorded"


def _sparsity(facts: Facts, level: int) -> float:
    s = facts.level(level, "dense" if level == 0 else "ticket")
    return s.sparsity if s is not None else 0.0
