"""Measurement: side-by-side timing, peak memory, a traffic model and the environment.

Timing: warm-up, then `trials` rounds in which the calls take turns (rotating who goes
first) so all see the same machine noise; each turn times single calls for about `block_s`
seconds: with `time.perf_counter` on CPU, with CUDA events around each call on GPU (read after
one synchronisation per turn, so no call pays a host synchronisation of its own).
"""
from __future__ import annotations

import gc
import math
import os
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ticketsmith.base.environment import environment
from ticketsmith.serving.formats import weight_bytes, weighted_layers


def timing_environment(device: torch.device) -> dict[str, Any]:
    """`ticketsmith.base.environment.environment` plus what a timing depends on."""
    cuda = device.type == "cuda"
    return {**environment(device), "interop_threads": torch.get_num_interop_threads(),
            "quantized_engine": torch.backends.quantized.engine,
            "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(device)))
            if cuda else None,
            "timer": "cuda events per call, one synchronize per turn" if cuda else
            "perf_counter per call",
            "peak_memory": "the format's weight bytes + cuda allocator peak rise while it runs"
            if cuda else "process peak RSS (VmHWM, reset before each format)",
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "blas_threads": _blas_threads()}


def _blas_threads() -> int | None:
    """Threads of numpy's BLAS now (threadpoolctl), None when it cannot tell."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    found = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    return found[0] if found else None


class Clock:
    """Host clock: `start`/`stop` around one call; `seconds` turns the marks into durations."""

    def sync(self) -> None:
        pass

    def start(self) -> Any:
        return time.perf_counter()

    def stop(self, started: Any) -> Any:
        return time.perf_counter() - started

    def seconds(self, marks: list[Any]) -> list[float]:
        return list(marks)


class CudaClock(Clock):
    """CUDA events recorded on the stream around each call: the GPU's own time for it, with
    no per-call host synchronisation (about 10 us, which would pull batch-1 speedups to 1x)."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def start(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, started: Any) -> Any:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        return started, end

    def seconds(self, marks: list[Any]) -> list[float]:
        self.sync()
        return [a.elapsed_time(b) / 1e3 for a, b in marks]  # elapsed_time is in ms


def clock_for(device: torch.device) -> Clock:
    return CudaClock(device) if device.type == "cuda" else Clock()


@contextmanager
def _no_gc():
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def time_side_by_side(calls: dict[str, Callable[[], object]], *, trials: int, warmup: int,
                      block_s: float, clock: Clock | None = None
                      ) -> dict[str, list[list[float]]]:
    """name -> per round, the seconds of each call. Rounds rotate which call goes first.

    Each turn runs a call about `block_s` seconds' worth (at least 3 times), judged from the
    median of 3 timed calls after `warmup`; a turn that stalls stops after 4 x block_s of
    host time.
    """
    clock = clock or Clock()
    reps = {}
    for name, fn in calls.items():
        for _ in range(warmup):
            fn()
        clock.sync()
        once = clock.seconds([_timed(fn, clock) for _ in range(3)])
        reps[name] = max(3, min(1000, int(block_s / max(median(once), 1e-7))))
    names = list(calls)
    samples: dict[str, list[list[float]]] = {n: [] for n in names}
    with _no_gc():
        for r in range(trials):
            for name in names[r % len(names):] + names[:r % len(names)]:
                fn, marks = calls[name], []
                clock.sync()
                t0 = time.perf_counter()
                for _ in range(reps[name]):
                    marks.append(_timed(fn, clock))
                    if len(marks) >= 3 and time.perf_counter() - t0 > 4 * block_s:
                        break
                samples[name].append(clock.seconds(marks))
    return samples


def _timed(fn: Callable[[], object], clock: Clock) -> Any:
    started = clock.start()
    fn()
    return clock.stop(started)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def _proc_status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory(fn: Callable[[], object], device: torch.device,
                own_bytes: int = 0) -> tuple[int, int]:
    """(peak bytes while running `fn`, rise above the bytes in use before it).

    CUDA: `own_bytes` (the measured format's weights) + the allocator's peak rise, so the
    weights of other formats resident on the same GPU are not counted. CPU: the process's peak
    RSS (VmHWM), reset just before `fn` by writing 5 to /proc/self/clear_refs (Linux >= 4.0);
    elsewhere the process-lifetime peak.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        rise = int(torch.cuda.max_memory_allocated(device) - before)
        return own_bytes + rise, rise
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    before = _proc_status("VmRSS")
    fn()
    peak = _proc_status("VmHWM")
    if peak is None or before is None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024), 0
    return peak, max(0, peak - before)


def _macs_per_output(m: nn.Module) -> float:
    w = m.weight() if callable(getattr(m, "weight", None)) else m.weight  # int8 Linear: weight()
    if w.layout == torch.sparse_csr:
        return w._nnz() / w.shape[0]
    per = w.shape[1:].numel()
    return per / 2 if getattr(w, "packed", None) is not None else per  # 2:4 skips half


def traffic(module: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(bytes moved, multiply-adds) of one forward pass under a simple cost model.

    Bytes: each weighted layer (dense, CSR or int8 Linear, Conv) reads its weights as stored
    (values, indices, scales) and its input activation once and writes its output once;
    elementwise ops, index-selects, caches and per-call overhead are ignored. dense / format
    is the speedup a purely memory-bound execution could reach (the `ideal_speedup` beside
    the measured one). Multiply-adds: what the kernel computes, zeros included for dense
    layers; dense / format bounds a compute-bound execution (large batches).
    """
    moved, macs = 0, 0.0

    def hook(m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        nonlocal moved, macs
        moved += weight_bytes(m) + inp[0].numel() * inp[0].element_size() + \
            out.numel() * out.element_size()
        macs += out.numel() * _macs_per_output(m)  # conv: per output pixel of each channel

    hooks = [m.register_forward_hook(hook) for m in weighted_layers(module)]
    try:
        with torch.inference_mode():
            module(x)
    finally:
        for h in hooks:
            h.remove()
    return moved, int(macs)
