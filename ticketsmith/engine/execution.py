"""How an experiment computes on this host: its device, its determinism policy, and the rule
that one experiment's levels are not trained on different devices unless asked for.

Neither the device nor the policy is part of the experiment hash (they say where and how, not
what), so both are written into every level's record (metrics.json, which also reaches the
artifact store) and checked before a run folder is resumed.
"""
from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch

from ticketsmith.base.config import ConfigError

# cuBLAS picks its reduction order per call unless its workspace is fixed; torch refuses
# deterministic matmuls on CUDA without this (read when the first cuBLAS handle is made).
CUBLAS_WORKSPACE = ":4096:8"


_frozen = False


def freeze_long_lived() -> None:
    """Take every object alive now out of the garbage collector's full collections, once per
    process (`gc.freeze`). Called when an experiment's imports and data are in place: torch's,
    MLflow's and the report's modules are hundreds of thousands of objects that live until
    the process ends, and each full collection during training and logging walked them all
    again, about 0.5 s of CPU in an untracked LeNet-300-100 run of 3 levels and 1-1.5 s in a
    tracked one (benchmarks/tracking_overhead.py's work). Garbage already waiting at that
    moment is never freed: once per process bounds it to what start-up left."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.freeze()


def execution_facts(device: torch.device, policy: str) -> dict[str, Any]:
    """What every record says about where it was computed."""
    cuda = device.type == "cuda"
    return {"device": device.type, "determinism": policy,
            "gpu": torch.cuda.get_device_name(device) if cuda else None}


def _describe(facts: dict[str, Any]) -> str:
    where = facts.get("device")
    if facts.get("gpu"):
        where += f" ({facts['gpu']})"
    return f"{where}, determinism {facts.get('determinism', '?')}"


def _differs(before: dict[str, Any], now: dict[str, Any]) -> bool:
    if before.get("device") != now["device"]:
        return True
    # CPU kernels are deterministic under every policy; on CUDA the policy changes the numbers.
    return now["device"] == "cuda" and before.get("determinism") != now["determinism"]


def check_resume(records: Iterable[dict[str, Any]], now: dict[str, Any], allow: bool,
                 where: str) -> None:
    """Refuse to add levels computed on `now` to finished ones computed elsewhere.

    Records written before devices were recorded (no `device` key) are accepted as they are.
    """
    if allow:
        return
    for r in records:
        if "device" in r and _differs(r, now):
            raise ConfigError(
                f"train.device: {where} level {r['level']} {r['variant']} was trained on "
                f"{_describe(r)}, this run is on {_describe(now)}; resume it there, or set "
                "train.allow_device_change=true to mix both in one experiment")


@contextmanager
def determinism(policy: str, device: torch.device) -> Iterator[None]:
    """torch's process-wide switches for `policy` while the block runs, restored after.

    On CUDA, 'strict' and 'warn' ask for deterministic kernels (cuDNN, cuBLAS, scatter/index
    ops), turn off cuDNN autotuning (it may pick different kernels run to run) and TF32 (whose
    10-bit mantissa changes results against fp32); 'strict' raises on an op that has no
    deterministic kernel, 'warn' warns. 'off' turns autotuning and TF32 on: fastest, not
    repeatable. On CPU nothing changes: its kernels do not depend on these switches.
    """
    if device.type != "cuda":
        yield
        return
    on = policy != "off"
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), cudnn.deterministic,
             cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    torch.use_deterministic_algorithms(on, warn_only=policy == "warn")
    cudnn.deterministic, cudnn.benchmark = on, not on
    cudnn.allow_tf32 = matmul.allow_tf32 = not on
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved[2:]
