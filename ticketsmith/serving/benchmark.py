"""The serving benchmark: one ticket against its dense baseline, side by side in one process.

Every format from `ticketsmith.serving` is built, checked against the masked model's outputs
(exact formats to float rounding; inexact ones by relative error and, with test data, by
their re-measured accuracy against a gate), then timed with `measure.time_side_by_side`:
many short interleaved turns, so every format sees the same machine noise. Reported per
format and batch size: latency p50/p95/p99 over all calls, throughput, speedup = median over
rounds of (dense / format) within the round, with its range; the ideal speedups of a
bytes-moved and a multiply-add model beside it; weight bytes; peak memory; accuracy. Dense
is also timed against itself: that ratio's range is the run's noise floor.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ticketsmith.engine.checkpoint import atomic_write_text, load_checkpoint, model_from_checkpoint
from ticketsmith.engine.models import count_params, prunable_for
from ticketsmith.engine.store import RunStore
from ticketsmith.base.secrets import redact
from ticketsmith.serving import agreement
from ticketsmith.serving.measure import (Clock, clock_for, timing_environment, median, peak_memory, percentile,
                                         time_side_by_side, traffic)
from ticketsmith.serving.formats import (BuildContext, FormatUnavailable, Served, build_format, default_formats,
                                         weight_bytes)
from ticketsmith.base.errors import BenchmarkError  # noqa: F401 (re-exported)
from ticketsmith.serving.plan.layout import (HEADLINE_BATCH_SIZES, PLAN, ROUTES, default_threads,
                                             shipped)

log = logging.getLogger("ticketsmith.benchmark")
# Many short turns: the finer the interleaving, the more alike the noise each format sees.
QUICK = {"trials": 20, "warmup": 3, "block_s": 0.003}
FULL = {"trials": 40, "warmup": 10, "block_s": 0.01}
_AA = "dense (again)"
RESULT_KEYS = ("format", "batch_size", "correct", "latency_ms", "throughput", "speedup",
               "ideal_speedup", "weight_bytes", "peak_memory_bytes", "accuracy")


def load_ticket(path: str | Path, device: str | torch.device = "cpu",
                allow_factory: bool | str | None = False) -> tuple[nn.Module, Any, dict]:
    """(model with its mask applied, mask or None, metadata): `checkpoint.model_from_checkpoint`,
    whose factory policy every loader shares."""
    return model_from_checkpoint(path, device, allow_factory)


def model_summary(model: nn.Module, mask, meta: dict) -> dict[str, Any]:
    weights = prunable_for(model, meta)
    size = sum(w.numel() for w in weights.values())
    kept = mask.kept() if mask is not None else sum(int(torch.count_nonzero(w))
                                                    for w in weights.values())
    total = count_params(model)
    info = {"name": meta.get("model", type(model).__name__), "sparsity": 1 - kept / size,
            "density": kept / size, "nonzero_params": total - (size - kept), "total_params": total}
    info.update({k: meta[k] for k in ("level", "variant", "replicate", "hash", "dataset")
                 if k in meta})
    return info


# --- the benchmark ---------------------------------------------------------------------------

def _inputs(input_shape: tuple[int, ...], data, batch_sizes: list[int],
            device: torch.device) -> dict[int, torch.Tensor]:
    """Real test images when there are data (repeated to fill a batch), else seeded noise."""
    if data is not None:
        return {bs: data.test_x[torch.arange(bs) % len(data.test_x)].to(device)
                for bs in batch_sizes}
    g = torch.Generator().manual_seed(0)
    return {bs: torch.randn(bs, *input_shape, generator=g).to(device) for bs in batch_sizes}


def _accuracy_fn(data, device: torch.device) -> Callable[[nn.Module], float]:
    from ticketsmith.engine.train import evaluate

    x, y = data.test_x.to(device), data.test_y.to(device)
    return lambda module: evaluate(module, x, y, batch_size=2048)[1]


def _compare(served: Served, out: torch.Tensor, ref: torch.Tensor) -> tuple[float, str | None]:
    """(max |error|, None when the outputs pass the format's check else why not)."""
    got, want = out.float().cpu().numpy(), ref.float().cpu().numpy()
    if served.exact:
        record, why = agreement.exact(got, want)
    else:  # inexact formats are gated on their re-measured accuracy, not on labels here
        record, why = agreement.inexact(got, want, served.tolerance, min_agreement=0.0)
    return record["max_abs_error"], why


def _prepare(name: str, model: nn.Module, mask, ctx: BuildContext, checks: dict,
             accuracy_fn, dense_accuracy: float | None, max_drop: float) -> dict[str, Any]:
    """Build one format and check it; entry['error'][bs] is None where it may be timed."""
    entry: dict[str, Any] = {"served": None, "accuracy": None, "max_abs_error": None, "note": ""}
    try:
        served = build_format(name, model, mask, ctx)
    except (FormatUnavailable, RuntimeError, ValueError) as exc:
        kind = "unavailable" if isinstance(exc, FormatUnavailable) else "build failed"
        entry["error"] = {bs: f"{kind}: {str(exc).splitlines()[0]}" for bs in checks}
        return entry
    entry.update(served=served, note=served.note)
    with torch.inference_mode():
        if accuracy_fn is not None:
            entry["accuracy"] = accuracy_fn(served.module)
        errors, worst = {}, 0.0
        for key, (x, ref) in checks.items():
            try:
                err, why = _compare(served, served.module(x), ref)
            except RuntimeError as exc:
                err, why = math.inf, f"forward failed: {str(exc).splitlines()[0]}"
            errors[key], worst = why, max(worst, err)
    entry["max_abs_error"] = worst if math.isfinite(worst) else None
    gate = None
    if not served.exact and entry["accuracy"] is not None and dense_accuracy is not None:
        drop = (dense_accuracy - entry["accuracy"]) * 100
        if drop > max_drop:
            gate = (f"accuracy {entry['accuracy']:.2%} is {drop:.2f} points below dense "
                    f"(gate {max_drop})")
    check_err = errors.pop("check")
    entry["error"] = {bs: check_err or gate or why for bs, why in errors.items()}
    return entry


def _stats(samples: list[list[float]], dense: list[list[float]], bs: int) -> dict[str, Any]:
    calls = [t for block in samples for t in block]
    per_round = [median(b) for b in samples]
    ratios = [median(d) / median(s) for d, s in zip(dense, samples)]
    return {"latency_ms": {q: percentile(calls, p) * 1e3 for q, p in
                           (("p50", 50), ("p95", 95), ("p99", 99))},
            "throughput": bs * len(calls) / sum(calls), "speedup": median(ratios),
            "spread": {"p50_ms_min": min(per_round) * 1e3, "p50_ms_max": max(per_round) * 1e3,
                       "speedup": median(ratios), "speedup_min": min(ratios),
                       "speedup_max": max(ratios),
                       "rounds": len(samples), "calls": len(calls)}}


def benchmark_model(model: nn.Module, mask, meta: dict, *, batch_sizes=HEADLINE_BATCH_SIZES,
                    formats: list[str] | None = None, trials: int | None = None,
                    quick: bool = False, data=None, device: str | torch.device = "cpu",
                    max_accuracy_drop: float = 1.0, plan_dir: str | Path | None = None,
                    clock: Clock | None = None) -> dict[str, Any]:
    """Benchmark a masked model (weights already masked) in every format; the JSON contract.

    The serving plan's routes (formats `onnxruntime`, `numpy`) are built once, timed like
    every format, ranked per batch size by their measured speedups, checked against the
    masked model and, with `plan_dir`, written there: what is timed is what ships.
    clock: what every timing reads (default: `clock_for(device)`); a test hands in one that
    reads like a noisy machine."""
    device = torch.device(device)
    batch_sizes = sorted({int(b) for b in batch_sizes})
    if not batch_sizes or batch_sizes[0] < 1:
        raise BenchmarkError(f"batch sizes must be positive integers, got {batch_sizes}")
    formats = list(dict.fromkeys(["dense", *(formats or default_formats(device))]))
    cfg = dict(QUICK if quick else FULL, **({"trials": trials} if trials else {}))
    model = model.to(device).eval()
    shape = tuple(meta.get("input_shape") or data.input_shape)
    xs = _inputs(shape, data, batch_sizes, device)
    clock = clock or clock_for(device)
    accuracy_fn = _accuracy_fn(data, device) if data is not None else None

    def timer(calls):  # the auto plan's per-layer clock: as many rounds, shorter turns
        got = time_side_by_side(calls, trials=cfg["trials"], warmup=cfg["warmup"],
                                block_s=cfg["block_s"] / 2, clock=clock)
        # A low quantile: interference only ever adds time, and a plan must not follow it.
        return {n: percentile([t for b in v for t in b], 10) for n, v in got.items()}

    ctx = BuildContext(device, xs, timer, accuracy_fn, max_accuracy_drop, meta=meta,
                       threads=torch.get_num_threads())
    with torch.inference_mode():
        check_x = data.test_x[:512].to(device) if data is not None else xs[batch_sizes[-1]]
        checks = {"check": (check_x, model(check_x).float()),
                  **{bs: (x, model(x).float()) for bs, x in xs.items()}}
        dense_acc = accuracy_fn(model) if accuracy_fn else None
    entries = {f: _prepare(f, model, mask, ctx, checks, accuracy_fn, dense_acc,
                           max_accuracy_drop) for f in formats}
    results, noise, env = [], {}, {**timing_environment(device), **cfg}
    same_runtime: dict[str, dict[int, float]] = {}
    for bs, x in xs.items():
        ok = [f for f in formats if entries[f]["error"][bs] is None]
        if "dense" not in ok:
            raise BenchmarkError(f"the dense model itself fails at batch {bs}: "
                                 f"{entries['dense']['error'][bs]}")
        calls = {f: (lambda m=entries[f]["served"].module: m(x)) for f in ok}
        calls[_AA] = calls["dense"]  # dense against itself: the noise floor of every ratio
        with torch.inference_mode():
            samples = time_side_by_side(calls, trials=cfg["trials"], warmup=cfg["warmup"],
                                        block_s=cfg["block_s"], clock=clock)
            noise[str(bs)] = _stats(samples[_AA], samples["dense"], bs)["spread"]
            noise[str(bs)]["one_thread_ratio"] = _one_thread_ratio(
                entries["dense"]["served"].module, x, samples["dense"], device)
            for route, base in (("onnxruntime", "onnxruntime_dense"), ("numpy", "numpy_dense"),
                                ("onnxruntime_int8", "onnxruntime_dense")):
                if route in samples and base in samples:  # against dense in its own runtime
                    same_runtime.setdefault(route, {})[bs] = _stats(
                        samples[route], samples[base], bs)["speedup"]
            dense_cost = traffic(entries["dense"]["served"].module, x)
            for f in formats:
                results.append(_result(f, bs, entries[f], samples.get(f), samples["dense"],
                                       dense_cost, x, device))
    env["load_average_end"] = timing_environment(device)["load_average"]
    env["noise_floor"] = {bs: {k: v[k] for k in ("speedup", "speedup_min", "speedup_max",
                                                 "one_thread_ratio")}
                          for bs, v in noise.items()}  # dense / dense: 1.0 on a quiet machine
    env["warning"] = busy_warning(env)
    serving = _serving_plan(ctx, model, checks["check"][0], results, plan_dir, same_runtime,
                            env["warning"])
    return {"environment": env, "model": model_summary(model, mask, meta),
            "results": results, "plan": _plan(entries.get("auto"), results), "serving": serving,
            "settings": {"batch_sizes": batch_sizes, "formats": formats, "quick": quick,
                         "max_accuracy_drop": max_accuracy_drop,
                         "accuracy_data": getattr(data, "name", None),
                         "dense_accuracy": dense_acc}}


def _result(fmt: str, bs: int, entry: dict, samples, dense_samples, dense_cost: tuple[int, int],
            x: torch.Tensor, device: torch.device) -> dict[str, Any]:
    served: Served | None = entry["served"]
    row: dict[str, Any] = {
        "format": fmt, "batch_size": bs, "correct": samples is not None, "latency_ms": None,
        "throughput": None, "speedup": None, "ideal_speedup": None, "ideal_speedup_macs": None,
        "weight_bytes": weight_bytes(served.module) if served else None,
        "peak_memory_bytes": None, "peak_memory_delta_bytes": None, "accuracy": entry["accuracy"],
        "exact": served.exact if served else None, "max_abs_error": entry["max_abs_error"],
        "layers": served.layers if served else {}, "note": entry["note"],
        "error": entry["error"][bs]}
    if samples is not None:
        module = served.module
        row.update(_stats(samples, dense_samples, bs))
        moved, macs = traffic(getattr(module, "proxy", module), x)  # a plan route: its network
        row["ideal_speedup"] = dense_cost[0] / moved  # bytes-moved model (measure.traffic)
        row["ideal_speedup_macs"] = dense_cost[1] / max(macs, 1)
        row["peak_memory_bytes"], row["peak_memory_delta_bytes"] = peak_memory(
            lambda: [module(x) for _ in range(3)], device, row["weight_bytes"])
    return row


def _plan(entry: dict | None, results: list[dict]) -> dict[str, Any]:
    rows = [r for r in results if r["format"] == "auto"]
    served = entry["served"] if entry else None
    return {"formats": served.layers if served else {},
            "speedup": {str(r["batch_size"]): r["speedup"] for r in rows},
            "exact": served.exact if served else None,
            "note": (entry or {}).get("note", "")
            or next((r["error"] for r in rows if r["error"]), "")}


def _serving_plan(ctx: BuildContext, model: nn.Module, probe: torch.Tensor, results: list[dict],
                  plan_dir: str | Path | None, same_runtime: dict[str, dict[int, float]],
                  warning: str | None = None) -> dict[str, Any] | None:
    """Rank the plan's routes by this run's speedups, check it, and ship it to `plan_dir`.
    same_runtime: route → batch size → speedup over the dense network in that runtime."""
    from ticketsmith.serving.plan.check import check_plan
    from ticketsmith.serving.plan.rank import describe, rank_routes, shipped_speedups

    if ctx.baseline_folder is not None:
        shutil.rmtree(ctx.baseline_folder.parent, ignore_errors=True)
    if ctx.plan_folder is None:
        return None
    speedups: dict[str, dict[int, float | None]] = {}
    for r in results:
        if r["format"] in ROUTES:
            speedups.setdefault(r["format"], {})[r["batch_size"]] = r["speedup"]
    check = check_plan(ctx.plan_folder, model, probe)
    plan = rank_routes(ctx.plan_folder, speedups, check, ctx.threads, warning)
    folder = ctx.plan_folder
    if plan_dir is not None:
        folder = Path(plan_dir)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(ctx.plan_folder, tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    shutil.rmtree(ctx.plan_folder.parent, ignore_errors=True)
    best = shipped_speedups(plan)
    return {**describe(plan), "path": str(folder) if plan_dir is not None else None,
            "ranking": plan["ranking"], "threads": plan["threads"], "check": check,
            "speedup": {str(b): s for b, (_, s) in best.items()},
            "same_runtime_speedup": {str(b): (same_runtime.get(r) or {}).get(b)
                                     for b, (r, _) in best.items()},
            "same_runtime": {r: {str(b): x for b, x in v.items()} for r, v in same_runtime.items()},
            "kernels_why": plan["kernels_why"]}


def _load_data(meta: dict, data_root: str | Path, device: torch.device):
    """The checkpoint's test split when it fits the model; None for data that are not a
    built-in set (a factory's label). Missing or corrupt data are bad input: DataError."""
    from ticketsmith.engine.data import DATASETS, DataError, load_dataset

    name = meta.get("dataset")
    if name not in DATASETS:
        log.info("no accuracy: %r is not a built-in data set", name)
        return None
    try:
        data = load_dataset(name, root=data_root, val_size=0, device=device)
    except (DataError, OSError) as exc:
        raise DataError(f"{' '.join(str(exc).split())}; fix the data under {data_root} or pass "
                        "--no-data to benchmark without accuracies") from None
    if (list(data.input_shape) != list(meta["input_shape"])
            or data.num_classes != meta["num_classes"]):
        log.warning("no accuracy: %s data %s do not fit the model's input %s", name,
                    data.input_shape, meta["input_shape"])
        return None
    none_x = torch.empty(0, *data.input_shape, device=device)  # only the test split is used
    none_y = torch.empty(0, dtype=torch.int64, device=device)
    return replace(data, train_x=none_x, train_y=none_y, val_x=none_x, val_y=none_y)


def benchmark_checkpoint(path: str | Path, *, batch_sizes=HEADLINE_BATCH_SIZES,
                         formats: list[str] | None = None, threads: int | None = None,
                         trials: int | None = None, quick: bool = False, data=None,
                         data_root: str | Path | None = "data", device: str = "cpu",
                         allow_factory: bool | str | None = False, max_accuracy_drop: float = 1.0,
                         plan_dir: str | Path | None = None, source: str | None = None,
                         clock: Clock | None = None) -> dict[str, Any]:
    """Benchmark one ticket checkpoint (a local file) against its dense baseline.

    data: a `ticketsmith.data.Dataset` for accuracies; else the checkpoint's data set is
    loaded from `data_root` (None: no accuracies). threads: for torch and ONNX Runtime alike,
    fixed for the run and recorded (restored afterwards); default all cores
    (`plan.layout.default_threads`), as a deployment would use. numpy's BLAS runs on one thread, as
    in the served plan. plan_dir: where to write the checked serving plan. source: what to
    record as the checkpoint (e.g. the MLflow URI it was downloaded from; default `path`).
    clock: as in `benchmark_model`.
    """
    from threadpoolctl import threadpool_limits

    from ticketsmith.engine.train import resolve_device

    dev = resolve_device(device)  # the experiments' rule: 'auto' follows $TICKETSMITH_DEVICE
    model, mask, meta = load_ticket(path, dev, allow_factory)
    if data is None and data_root is not None:
        data = _load_data(meta, data_root, dev)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        # numpy's BLAS (OpenBLAS) runs on one thread, as in the served plan (pyfunc_model):
        # its idle threads spin for ~0.1 s, taking the cores torch's threads wait on; with
        # two pools on two cores the dense baseline stalled at 16 ms per call instead of 45 us.
        with threadpool_limits(limits=1, user_api="blas"):
            result = benchmark_model(model, mask, meta, batch_sizes=batch_sizes, formats=formats,
                                     trials=trials, quick=quick, data=data, device=dev,
                                     max_accuracy_drop=max_accuracy_drop, plan_dir=plan_dir,
                                     clock=clock)
    finally:
        torch.set_num_threads(before)
    result["model"]["checkpoint"] = redact(str(source or path))
    return result


def write_benchmark(result: dict[str, Any], path: str | Path) -> Path:
    """Write the scorecard JSON atomically."""
    atomic_write_text(Path(path), json.dumps(result, indent=2, sort_keys=False, default=str))
    return Path(path)


def format_bytes(n: int | None) -> str:
    """1536 → '1.5 KB'; None → '-'."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _one_thread_ratio(module: nn.Module, x: torch.Tensor, dense: list[list[float]],
                      device: torch.device) -> float | None:
    """Dense at one thread / dense at the run's threads, timed right after the run: below 1
    the multi-threaded baseline was slower than one thread, i.e. it waited on cores that
    other work held. None where it does not apply (one thread, or CUDA)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2:
        return None
    torch.set_num_threads(1)
    try:
        one = time_side_by_side({"dense": lambda: module(x)}, trials=3, warmup=3, block_s=0.003)
    finally:
        torch.set_num_threads(threads)
    return median([median(b) for b in dense]) / median([median(b) for b in one["dense"]])


def busy_warning(env: dict[str, Any]) -> str | None:
    """A warning when the run's own noise floor (dense timed against itself, round by round)
    strays beyond 2x either way: then something else held the cores (a multi-threaded call
    waits milliseconds for a descheduled thread) and single ratios are not to be trusted.
    None when every batch size's floor stays within [0.5, 2]."""
    floor = env.get("noise_floor") or {}
    bad = {b: v for b, v in floor.items() if v["speedup_min"] < 0.5 or v["speedup_max"] > 2.0}
    slow = {b: v["one_thread_ratio"] for b, v in floor.items()
            if (v.get("one_thread_ratio") or 0) > 2.0}
    if not bad and not slow:
        return None
    load = env.get("load_average") or []
    said = [f"dense against itself ranged {v['speedup_min']:.2f}-{v['speedup_max']:.2f}x at "
            f"batch {b}" for b, v in bad.items()]
    said += [f"dense at {env.get('threads')} threads was {r:.1f}x slower than at one thread at "
             f"batch {b}" for b, r in slow.items()]
    return ("WARNING: noisy machine: " + "; ".join(said)
            + (f" (load average {load[0]:.1f} on {env.get('cpu_count')} cores at the start)"
               if load else "") + f" with {env.get('threads')} threads; speedups are unreliable: "
            "rerun on an idle machine, or with --threads 1")


def level_line(level: int, variant: str, result: dict[str, Any]) -> str:
    """One short line per benchmarked level: the route that ships and its speedup against
    dense at each measured batch size, and the noise warning (a second line) when it fired.
    Every format's figures stay in the scorecard and benchmark.json."""
    serving = result.get("serving")
    ships = shipped(serving) if serving else {}
    said = ", ".join(f"{ships[int(b)]} {s:.2f}x at batch {b}" if s else
                     f"{ships[int(b)]} (not measured) at batch {b}"
                     for b, s in (serving or {}).get("speedup", {}).items())
    line = f"level {level} {variant}: " + (f"ships {said}" if said else "no serving plan")
    warning = result["environment"].get("warning")
    return line + (f"\n  {warning}" if warning else "")


def format_scorecard(result: dict[str, Any]) -> str:
    """A readable table of the scorecard, with the model, the environment and the plan."""
    m, env = result["model"], result["environment"]
    where = " ".join(f"{k} {m[k]}" for k in ("level", "variant") if k in m)
    lines = [f"{m['name']} {where}: sparsity {m['sparsity']:.2%}, {m['nonzero_params']:,} of "
             f"{m['total_params']:,} parameters nonzero",
             f"{env['cpu']} ({env['cpu_count']} cpus){', ' + env['gpu'] if env['gpu'] else ''}; "
             f"torch {env['torch']}; {env['threads']} threads; {env['device']}; "
             f"{env['trials']} interleaved rounds per batch size",
             f"{'format':<20}{'batch':>6} {'ok':<3}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
             f"{'samples/s':>11}{'speedup':>9} {'(range)':<13}{'ideal':>7}{'weights':>10}"
             f"{'peak mem':>10}{'accuracy':>9}"]
    for r in result["results"]:
        acc = f"{r['accuracy']:.2%}" if r["accuracy"] is not None else "-"
        if r["correct"]:
            lat, sp = r["latency_ms"], r["spread"]
            rng = f"({sp['speedup_min']:.2f}-{sp['speedup_max']:.2f})"
            lines.append(
                f"{r['format']:<20}{r['batch_size']:>6} {'yes':<3}{lat['p50']:>9.3f}"
                f"{lat['p95']:>9.3f}{lat['p99']:>9.3f}{r['throughput']:>11.0f}"
                f"{r['speedup']:>8.2f}x {rng:<13}{r['ideal_speedup']:>6.2f}x"
                f"{format_bytes(r['weight_bytes']):>10}{format_bytes(r['peak_memory_bytes']):>10}"
                f"{acc:>9}")
        else:
            lines.append(f"{r['format']:<20}{r['batch_size']:>6} {'NO':<3}  {r['error']}")
    if env.get("warning"):
        lines.append(env["warning"])
    floor = env.get("noise_floor") or {}
    if floor:
        lines.append("noise floor, dense against itself: " + ", ".join(
            f"batch {b}: {v['speedup']:.2f}x ({v['speedup_min']:.2f}-{v['speedup_max']:.2f})"
            for b, v in floor.items()))
    plan = result["plan"]
    if plan["formats"]:
        speed = ", ".join(f"batch {b}: {s:.2f}x" for b, s in plan["speedup"].items()
                          if s is not None)
        lines.append(f"auto plan: {', '.join(f'{k}={v}' for k, v in plan['formats'].items())}"
                     f" -> {speed or 'not timed'}")
    serving = result.get("serving")
    if serving:
        ships = shipped(serving)  # serving["ranking"] is the plan's
        speed = ", ".join(f"batch {b}: {ships[int(b)]} {s:.2f}x" if s else
                          f"batch {b}: {ships[int(b)]}" for b, s in serving["speedup"].items())
        chk = serving["check"]
        same = ", ".join(f"batch {b}: {s:.2f}x" for b, s in
                         (serving.get("same_runtime_speedup") or {}).items() if s)
        speed += f" (against the dense network in the same runtime: {same})" if same else ""
        lines.append(f"serving plan ({serving['threads']} threads): {speed}; checked on "
                     f"{chk['probe']} inputs, max |diff| {chk['max_abs_error']:.2g}, argmax "
                     f"agreement {chk['argmax_agreement']:.2%}"
                     + (f"; written to {serving['path']}" if serving.get("path") else ""))
    notes = {r["format"]: r["note"] for r in result["results"] if r.get("note")}
    lines += [f"  {f}: {n}" for f, n in notes.items()]
    return "\n".join(lines)


def benchmark_experiment(run_root: str | Path, records: list[dict], *, levels=None,
                         quick: bool = True, force: bool = False, data=None,
                         threads: int | None = None, **kw) -> list[dict[str, Any]]:
    """Benchmark each level's replicate-0 ticket (level 0: dense) of a finished experiment.

    Writes `benchmark.json` next to each checkpoint and returns the results in level order,
    each with `level`, `variant` and `path` (of its benchmark.json) added at the top; a level
    whose benchmark.json was made with the same settings is read, not re-run.
    Threads default to all cores, as in `ticketsmith benchmark`: the pipeline and the CLI
    give the same speedups for the same ticket. Each ticket's checked serving plan is written
    next to its checkpoint (`RunStore.serving_path`), for the registry to ship.
    kw: passed to `benchmark_checkpoint` (batch_sizes, formats, trials, device, ...).
    """
    threads = threads or default_threads()
    store = RunStore(Path(run_root))
    found = sorted({r["level"] for r in records if r.get("replicate", 0) == 0
                    and r["variant"] == ("dense" if r["level"] == 0 else "ticket")})
    wanted = [lv for lv in found if levels is None or lv in set(levels)]
    request = {"quick": quick, "threads": threads,
               **{k: kw[k] for k in ("batch_sizes", "formats", "trials", "device",
                                     "max_accuracy_drop") if k in kw}}
    out = []
    for level in wanted:
        variant = "dense" if level == 0 else "ticket"
        path, target = store.checkpoint_path(0, level, variant), store.benchmark_path(0, level, variant)
        plan_dir = store.serving_path(0, level, variant) if variant == "ticket" else None
        where = {"level": level, "variant": variant, "path": str(target)}
        if target.is_file() and not force:
            old = json.loads(target.read_text())
            if (old.get("settings", {}).get("request") == json.loads(json.dumps(request))
                    and (plan_dir is None or (plan_dir / PLAN).is_file())):
                out.append({**old, **where})
                continue
        if data is None and kw.get("data_root", "data") is not None:
            data = _load_data(load_checkpoint(path).meta, kw.get("data_root", "data"),
                              torch.device(kw.get("device", "cpu")))
        result = benchmark_checkpoint(path, quick=quick, data=data, threads=threads,
                                      plan_dir=plan_dir, **kw)
        if result["environment"].get("warning") and threads > 1:
            # Shared cores stall a multi-threaded baseline (see busy_warning): measure again
            # at one thread, which such stalls do not reach, rather than ship wild ratios.
            first = result["environment"]["warning"]
            log.warning("level %d: %s; measuring again at 1 thread", level, first)
            result = benchmark_checkpoint(path, quick=quick, data=data, threads=1,
                                          plan_dir=plan_dir, **kw)
            result["environment"]["first_attempt"] = {"threads": threads, "warning": first}
        result["settings"]["request"] = request
        write_benchmark(result, target)
        log.info("%s", level_line(level, variant, result))
        out.append({**result, **where})
    return out
