"""Tokens per second: a GPT ticket's serving formats against its dense model, in one process.

For each batch size (default 1 and 8) and round, every format takes a turn (rotating who goes
first, so all see the same machine noise): it prefills a prompt of `prompt_tokens` tokens
(timed `prefill_reps` times) and then decodes `new_tokens` tokens with the KV cache, each step
timed on its own. Reported per format and batch: prefill tokens/s, time to the first token
(prefill + picking the token), decode tokens/s, per-token latency p50/p99, speedups against
dense as the median over rounds of the within-round ratio with its range, peak memory and
weight bytes. Dense also runs against itself ("dense (again)"): that ratio's range is the
noise floor. Beside each speedup, the bound it cannot pass: for decode, the weight and KV
bytes a decoded token reads (dense / format, and tokens/s at the measured memory
bandwidth); for prefill, multiply-adds per prefilled token (dense / format). Every format is
checked against the masked model's logits (prefill and decode steps) before it is timed.

Cost: dollars per million generated tokens = usd_per_hour / (decode tokens/s x 3600) x 1e6,
at a configured instance price (`NODES` holds the documented defaults).
"""
from __future__ import annotations

import gc
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from ticketsmith.base.errors import BenchmarkError
from ticketsmith.engine.generate import Cache, Decoder, pick, Sampling
from ticketsmith.engine.transformer import GPT
from ticketsmith.serving.formats import weight_bytes
from ticketsmith.serving.lm_kernels import compacted_model, sparse_model
from ticketsmith.serving.measure import median, peak_memory, percentile, timing_environment

EXACT_RTOL = 1e-4  # max |error| <= EXACT_RTOL * max(1, max |dense logit|)
_AA = "dense (again)"
# On-demand list prices, Linux, us-east-1, from the AWS EC2 price list (2024-06): change them
# with --usd-per-hour; `--node` picks one of these.
NODES = {
    "cpu": {"instance": "AWS c7i.large (2 vCPU Intel Xeon, 4 GiB)", "usd_per_hour": 0.08925,
            "price_date": "2024-06"},
    "gpu": {"instance": "AWS g5.xlarge (1 NVIDIA A10G 24 GB, 4 vCPU)", "usd_per_hour": 1.006,
            "price_date": "2024-06"},
}
LM_FORMATS = ("compacted", "sparse")  # beside dense, the baseline
# wall: what a user waits. cpu: this thread's CPU time, which the preemptions of a loaded
# machine do not inflate (a 2 ms step preempted for a 4 ms time slice reads 6 ms on the wall).
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
FIGURES = ("prefill_tokens_per_s", "ttft_ms", "decode_tokens_per_s", "token_latency_ms",
           "peak_memory_bytes", "weight_bytes", "usd_per_million_tokens")


def memory_bandwidth(nbytes: int = 128 << 20, reps: int = 5) -> float:
    """Bytes/s of a numpy copy of `nbytes` (far beyond the last-level cache; read + write
    counted), median of `reps`."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return 2 * src.nbytes / median(times)


def _linear_macs(model: GPT) -> tuple[int, int]:
    """(multiply-adds the block Linears compute per token, nonzero weights among them)."""
    macs = nnz = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Linear):
            macs, nnz = macs + w.numel(), nnz + int(torch.count_nonzero(w))
        elif hasattr(m, "indptr"):  # scipy CSR
            macs, nnz = macs + m.data.numel(), nnz + m.data.numel()
        elif w is not None and w.layout == torch.sparse_csr:
            macs, nnz = macs + w._nnz(), nnz + w._nnz()
    return macs, nnz


def macs_per_prefilled_token(model: GPT, prompt: int) -> int:
    """Block Linears + attention (q.k and p.v over on average prompt/2 keys) + output head."""
    linear, _ = _linear_macs(model)
    attention = sum(2 * b.attn.heads * b.attn.head_dim * prompt // 2 for b in model.blocks)
    return linear + attention + model.vocab * model.width


def bytes_per_decoded_token(model: GPT, kv_bytes: int, batch: int) -> int:
    """Weights (as stored, embeddings included: the output head reads all of them) and the
    KV cache, read once per decode step, shared by the `batch` rows."""
    return (weight_bytes(model) + kv_bytes) // batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    """`batch` prompts of `length` seeded random token ids: the same for every format timed."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(vocab, (batch, length), generator=g).tolist()


@torch.inference_mode()
def check_logits(fmt: nn.Module, ref: nn.Module, prompt: int, steps: int = 4) -> float:
    """Max |logit error| / max(1, max |ref logit|) over prefill and `steps` greedy decode
    steps of a batch of two prompts."""
    prompts = random_prompts(2, prompt, ref.vocab)
    a, b = Decoder(fmt), Decoder(ref)
    la, lb = a.prefill(prompts, steps), b.prefill(prompts, steps)
    worst = 0.0
    for i in range(steps + 1):
        worst = max(worst, float((la - lb).abs().max()) / max(1.0, float(lb.abs().max())))
        if i < steps:
            tokens = lb.argmax(-1)
            la, lb = a.step(tokens), b.step(tokens)
    return worst


@torch.inference_mode()
def _turn(model: nn.Module, prompts: list[list[int]], new: int, reps: int,
          device: torch.device, decode: bool = True, clock=time.perf_counter) -> dict[str, Any]:
    """One format's turn: `reps` timed prefills, then `new` - 1 timed decode steps."""
    prefill, ttft = [], []
    for _ in range(reps):
        _sync(device)
        t0 = clock()
        dec = Decoder(model)
        logits = dec.prefill(prompts, new)
        tokens = pick(logits, Sampling(), None)
        _sync(device)
        ttft.append(clock() - t0)
        prefill.append(ttft[-1])  # the pick is a tiny argmax; prefill time = time to 1st token
    steps = []
    for _ in range(new - 1 if decode else 0):
        t0 = clock()
        tokens = pick(dec.step(tokens), Sampling(), None)
        _sync(device)
        steps.append(clock() - t0)
    kv = dec.cache.nbytes() if isinstance(dec.cache, Cache) else 0
    return {"prefill": prefill, "ttft": ttft, "steps": steps, "kv_bytes": kv}


def rounds(models: dict[str, nn.Module], prompts, new: int, trials: int, reps: int,
           device: torch.device, decode: bool = True,
           clock=time.perf_counter) -> dict[str, list[dict]]:
    """name -> per round, its turn (`_turn`): one warm-up each, then `trials` rounds that
    rotate who goes first. The language-model serving plan ranks its routes with this too."""
    names = list(models)
    out: dict[str, list[dict]] = {n: [] for n in names}
    was = gc.isenabled()
    gc.disable()
    try:
        for n in names:  # warm-up
            _turn(models[n], prompts, min(new, 4), 1, device)
        for r in range(trials):
            for n in names[r % len(names):] + names[:r % len(names)]:
                out[n].append(_turn(models[n], prompts, new, reps, device, decode, clock))
    finally:
        if was:
            gc.enable()
    return out


def _ratios(dense: list[dict], fmt: list[dict], key: str) -> list[float]:
    return [median(d[key]) / median(f[key]) for d, f in zip(dense, fmt)]


def _spread(xs: list[float]) -> dict[str, float]:
    return {"median": median(xs), "min": min(xs), "max": max(xs)}


def _prefill_figures(bs: int, prompt: int, turns: list[dict], dense: list[dict],
                     model: nn.Module, dense_model: nn.Module) -> dict[str, Any]:
    prefill = median([t for turn in turns for t in turn["prefill"]])
    macs = macs_per_prefilled_token(model, prompt)
    return {"prefill_tokens_per_s": bs * prompt / prefill,
            "ttft_ms": median([t for turn in turns for t in turn["ttft"]]) * 1e3,
            "prefill_speedup": _spread(_ratios(dense, turns, "prefill")),
            "prefill_macs_per_token": macs,
            "prefill_ideal_speedup": macs_per_prefilled_token(dense_model, prompt) / macs}


def _figures(name: str, bs: int, prompt: int, turns: list[dict], dense: list[dict],
             model: nn.Module, dense_model: nn.Module, bandwidth: float,
             price: float) -> dict[str, Any]:
    steps = [t for turn in turns for t in turn["steps"]]
    # At the median step, like prefill: a busy machine's stalls (see p99) would swamp a mean,
    # and $ per token then disagree with the median speedup beside it.
    decode_tps = bs / median(steps)
    kv = turns[-1]["kv_bytes"]
    moved = bytes_per_decoded_token(model, kv, bs)
    return {"format": name, "batch_size": bs,
            **_prefill_figures(bs, prompt, turns, dense, model, dense_model),
            "decode_tokens_per_s": decode_tps,
            "token_latency_ms": {"p50": percentile(steps, 50) * 1e3,
                                 "p99": percentile(steps, 99) * 1e3},
            "decode_speedup": _spread(_ratios(dense, turns, "steps")),
            "decode_bytes_per_token": moved, "decode_kv_bytes": kv,
            "decode_ideal_speedup": bytes_per_decoded_token(dense_model, kv, bs) / moved,
            "decode_tokens_per_s_at_bandwidth": bandwidth / moved,
            "usd_per_million_tokens": price / (decode_tps * 3600) * 1e6}


def build_formats(model: GPT, batch_sizes: list[int], prompt: int,
                  formats: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """name -> {"models": {(phase, batch): module}, "note": ...} for dense, compacted, sparse."""
    wanted = formats or list(LM_FORMATS)
    unknown = sorted(set(wanted) - set(LM_FORMATS) - {"dense"})
    if unknown:
        raise BenchmarkError(f"--formats: {', '.join(unknown)} not a language-model format; "
                             f"expected some of {', '.join(LM_FORMATS)}")
    out: dict[str, dict[str, Any]] = {"dense": {"note": "masked weights, KV cache"}}
    if "compacted" in wanted:
        small, summary = compacted_model(model)
        out["compacted"] = {"module": small, "note": summary}
    if "sparse" in wanted and model.wte.weight.device.type == "cpu":
        per, kernels = {}, {}
        for bs in batch_sizes:
            for phase, rows in (("decode", bs), ("prefill", bs * prompt)):
                per[(phase, bs)], kernels[f"{phase}_batch_{bs}"] = sparse_model(model, rows)
        out["sparse"] = {"models": per, "kernels": kernels,
                         "note": "per-layer kernel measured fastest at each phase's rows"}
    return out


def _module(entry: dict, phase: str, bs: int, dense: nn.Module) -> nn.Module:
    if "models" in entry:
        return entry["models"][(phase, bs)]
    return entry.get("module", dense)


def _check_formats(entries: dict[str, dict], model: GPT, batch_sizes, prompt: int) -> None:
    """Each format's worst relative logit error over its per-phase modules, and whether it
    is exact (only exact formats are timed)."""
    for name, entry in entries.items():
        errs = [0.0] if name == "dense" else [
            check_logits(_module(entry, ph, bs, model), model, prompt)
            for ph in ("prefill", "decode") for bs in batch_sizes]
        entry["max_error"] = max(errs)
        entry["correct"] = entry["max_error"] <= EXACT_RTOL


def _peak(module: nn.Module, prompts, new: int, device: torch.device) -> int:
    """Peak memory of one prefill + decode (`measure.peak_memory`)."""
    return peak_memory(lambda: _turn(module, prompts, new, 1, device), device,
                       weight_bytes(module))[0]


def benchmark_lm_model(model: GPT, *, batch_sizes=(1, 8), prompt_tokens: int = 128,
                       new_tokens: int = 128, trials: int = 5, prefill_reps: int = 3,
                       formats: list[str] | None = None, usd_per_hour: float | None = None,
                       node: str = "cpu", bandwidth: float | None = None,
                       baseline: GPT | None = None, clock: str = "wall") -> dict[str, Any]:
    """Every figure of the module docstring, as a JSON-ready dict (see FIGURES).
    bandwidth: the machine's `memory_bandwidth()` in bytes/s, if already measured.
    baseline: the experiment's trained dense model, timed as `dense` instead of the ticket's
    masked weights (the formats are still checked against the masked ticket)."""
    if not isinstance(model, GPT):
        raise BenchmarkError(f"--checkpoint: the tokens-per-second benchmark runs the project's "
                             f"GPT, not {type(model).__name__} (generate works with both)")
    _check_baseline(model, baseline)
    if clock not in CLOCKS or (clock == "cpu" and model.wte.weight.device.type != "cpu"):
        raise BenchmarkError(f"--clock: expected 'wall' or, on a CPU, 'cpu'; got {clock!r}")
    device = model.wte.weight.device
    prompt = min(prompt_tokens, model.context // 2)
    new = max(2, min(new_tokens, model.context - prompt))
    price = NODES[node]["usd_per_hour"] if usd_per_hour is None else usd_per_hour
    env = timing_environment(device)  # the load average as the run starts
    if clock == "cpu":
        env["timer"] = "thread_time per call (the thread's CPU time)"
    entries = build_formats(model, list(batch_sizes), prompt, formats)
    _check_formats(entries, model, batch_sizes, prompt)
    if baseline is not None:
        entries["dense"] = {"module": baseline, "note": "the experiment's dense model, KV cache",
                            "max_error": 0.0, "correct": True}
    bandwidth = bandwidth or memory_bandwidth()
    results, floor = [], {}
    timed = [n for n, e in entries.items() if e["correct"]]
    for bs in batch_sizes:
        prompts = random_prompts(bs, prompt, model.vocab)
        for phase in ("decode", "prefill"):
            mods = {n: _module(entries[n], phase, bs, model) for n in timed}
            mods[_AA] = mods["dense"]
            # Prefill rounds skip decoding: they time the prefill-chosen kernels.
            turns = rounds(mods, prompts, new, trials, prefill_reps, device,
                           decode=phase == "decode", clock=CLOCKS[clock])
            for n in timed:
                if phase == "decode":
                    results.append(_figures(n, bs, prompt, turns[n], turns["dense"], mods[n],
                                            model, bandwidth, price))
                elif "models" in entries[n]:  # sparse: its prefill-chosen kernels' figures
                    row = next(r for r in results if r["format"] == n and r["batch_size"] == bs)
                    row.update(_prefill_figures(bs, prompt, turns[n], turns["dense"], mods[n],
                                                model))
            floor[f"{phase}_batch_{bs}"] = _spread(_ratios(turns["dense"], turns[_AA],
                                                           "prefill" if phase == "prefill"
                                                           else "steps"))
    peaks = {n: _peak(_module(entries[n], "decode", max(batch_sizes), model),
                      random_prompts(max(batch_sizes), prompt, model.vocab), new, device)
             for n in timed}
    for r in results:
        r["peak_memory_bytes"] = peaks[r["format"]]
        r["weight_bytes"] = weight_bytes(_module(entries[r["format"]], "decode", r["batch_size"],
                                                 model))
    env.update(memory_bandwidth_bytes_per_s=bandwidth, noise_floor=floor)
    return {"kind": "language_model",
            "settings": {"prompt_tokens": prompt, "new_tokens": new,
                         "batch_sizes": list(batch_sizes), "rounds": trials,
                         "prefill_reps": prefill_reps, "clock": clock},
            "model": {"layers": len(model.blocks), "width": model.width,
                      "heads": [b.attn.heads for b in model.blocks],
                      "mlp_hidden": [b.mlp.fc.out_features for b in model.blocks],
                      "context": model.context, "vocab": model.vocab},
            "environment": env,
            "formats": {n: {k: v for k, v in e.items() if k in ("note", "kernels", "max_error",
                                                                  "correct")}
                        for n, e in entries.items()},
            "results": results,
            "cost": cost(results, price, node, usd_per_hour is None)}


def _check_baseline(model: GPT, baseline: GPT | None) -> None:
    """A dense baseline must be the ticket's architecture (only its weights differ)."""
    if baseline is None:
        return
    def shapes(m: nn.Module) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in m.state_dict().items()}

    if not isinstance(baseline, GPT) or shapes(baseline) != shapes(model):
        raise BenchmarkError("--dense-checkpoint: not the ticket's architecture (another "
                             "experiment's model?); expected the dense level of the same "
                             "experiment")


def cost(results: list[dict], price: float, node: str, default: bool) -> dict[str, Any]:
    """Dollars per million generated tokens per batch: dense against the fastest ticket
    format (by decode tokens/s)."""
    out: dict[str, Any] = {"usd_per_hour": price,
                           "instance": NODES[node]["instance"] if default else "configured",
                           "price_date": NODES[node]["price_date"] if default else None,
                           "per_batch": {}}
    for bs in sorted({r["batch_size"] for r in results}):
        rows = [r for r in results if r["batch_size"] == bs]
        dense = next(r for r in rows if r["format"] == "dense")
        ticket = max((r for r in rows if r["format"] != "dense"),
                     key=lambda r: r["decode_tokens_per_s"], default=dense)
        out["per_batch"][str(bs)] = {
            "dense_usd_per_million_tokens": dense["usd_per_million_tokens"],
            "ticket_format": ticket["format"],
            "ticket_usd_per_million_tokens": ticket["usd_per_million_tokens"]}
    return out


def format_lm_scorecard(result: dict[str, Any]) -> str:
    """One line per format and batch: tokens/s, speedups with their bounds, $ per M tokens."""
    s, env = result["settings"], result["environment"]
    lines = [f"GPT width {result['model']['width']}, {result['model']['layers']} layers; "
             f"prompt {s['prompt_tokens']} tokens, {s['new_tokens']} new; {s['rounds']} rounds; "
             f"{s.get('clock', 'wall')} clock; "
             f"{env.get('threads')} threads; load average "
             f"{(env.get('load_average') or [0])[0]:.1f}; memory bandwidth "
             f"{env['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s"]
    for r in result["results"]:
        lines.append(
            f"{r['format']:>10} batch {r['batch_size']}: decode {r['decode_tokens_per_s']:.0f} "
            f"tok/s ({r['decode_speedup']['median']:.2f}x, bound "
            f"{r['decode_ideal_speedup']:.2f}x), prefill {r['prefill_tokens_per_s']:.0f} tok/s "
            f"({r['prefill_speedup']['median']:.2f}x, bound {r['prefill_ideal_speedup']:.2f}x), "
            f"TTFT {r['ttft_ms']:.1f} ms, "
            f"p50/p99 {r['token_latency_ms']['p50']:.2f}/{r['token_latency_ms']['p99']:.2f} ms, "
            f"${r['usd_per_million_tokens']:.2f}/M tokens")
    floor = ", ".join(f"{k} {v['min']:.2f}-{v['max']:.2f}x"
                      for k, v in env["noise_floor"].items())
    lines.append(f"noise floor (dense against itself): {floor}")
    if any(v["min"] < 0.5 or v["max"] > 2.0 for v in env["noise_floor"].values()):
        lines.append("WARNING: noisy machine: dense against itself strayed beyond 0.5-2x; "
                     "single speedups are unreliable: rerun on an idle machine")
    c = result["cost"]
    lines.append(f"price ${c['usd_per_hour']}/h ({c['instance']}, list price {c['price_date']})")
    return "\n".join(lines)


def benchmark_lm_checkpoint(path, *, threads: int | None = None,
                            allow_factory: bool | str | None = False, device: str = "cpu",
                            dense_path=None, **options: Any) -> dict[str, Any]:
    """`benchmark_lm_model` on a local language-model checkpoint (the CLI resolves URIs);
    dense_path: the experiment's dense checkpoint, timed as the baseline."""
    from ticketsmith.base.secrets import redact
    from ticketsmith.engine.train import resolve_device
    from ticketsmith.serving.lm_load import load_lm
    from ticketsmith.serving.plan.layout import default_threads

    model, _, meta, _ = load_lm(path, resolve_device(device), allow_factory)
    baseline = None
    if dense_path is not None:
        baseline = load_lm(dense_path, resolve_device(device), allow_factory)[0]
    before = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        result = benchmark_lm_model(model, baseline=baseline, **options)
    finally:
        torch.set_num_threads(before)
    result["model"].update({k: meta[k] for k in ("level", "variant", "hash") if k in meta},
                           checkpoint=redact(str(path)),
                           dense_checkpoint=redact(str(dense_path)) if dense_path else None)
    return result

