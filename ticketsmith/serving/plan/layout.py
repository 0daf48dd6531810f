"""What a plan folder holds, how it is read and written, and which route ships: torch-free.

The one owner of the plan's file names, its routes and what each needs on a serving host,
the headline batch sizes, and `shipped` (the route that serves a batch size: the first of the
benchmark's measured order).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from ticketsmith.base.errors import BenchmarkError

KIND, VERSION = "ticketsmith-serving-plan", 1
PLAN, WEIGHTS, ONNX, ONNX_INT8 = ("plan.json", "weights.safetensors", "model.onnx",
                                  "model_int8.onnx")
ROUTES = ("onnxruntime", "numpy", "onnxruntime_int8")
INEXACT = ("onnxruntime_int8",)  # checked by agreement and relative error, not to rounding
# The batch sizes a benchmark measures by default and tags, report and description headline:
# one request at a time, and a large batch (samples per call).
HEADLINE_BATCH_SIZES = (1, 256)
# What each route or kernel needs on the serving host (a Python module, or a device).
NEEDS = {"onnxruntime": ["onnxruntime"], "onnxruntime_int8": ["onnxruntime"], "numpy": [],
         "dense": [], "csr": ["scipy"],
         "torch_csr": ["torch"]}
FALLBACK = {"torch_csr": "csr", "csr": "dense"}  # a kernel's stand-in where the host lacks it


class PlanError(BenchmarkError):
    """A serving plan that cannot be built, read or trusted; the message names the file."""


def default_threads() -> int:
    """All cores this process may use: what a deployment uses, and the benchmark's default."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def missing(needs: list[str]) -> list[str]:
    """The needs (modules, or 'cuda') this host lacks."""
    out = []
    for need in needs:
        if need == "cuda":
            spec = importlib.util.find_spec("torch")
            ok = spec is not None and __import__("torch").cuda.is_available()
        else:
            ok = importlib.util.find_spec(need) is not None
        if not ok:
            out.append(need)
    return out


def shipped(plan: dict[str, Any]) -> dict[int, str]:
    """Batch size → the route that ships there: the first of the measured order (a batch size
    with no route left, e.g. every route failed, is absent)."""
    return {int(b): order[0] for b, order in plan["ranking"].items() if order}


def read_plan(folder: str | Path, kind: str = KIND, version: int = VERSION) -> dict[str, Any]:
    """plan.json, checked: the right kind and version, and every file's digest (the image
    plan's by default; the language-model plan passes its own kind)."""
    folder = Path(folder)
    path = folder / PLAN
    try:
        plan = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"{path}: not a readable serving plan ({' '.join(str(exc).split())})"
                        ) from None
    if not isinstance(plan, dict) or plan.get("kind") != kind or plan.get("version") != version:
        raise PlanError(f"{path}: not a {kind} version {version}")
    for name, digest in plan.get("files", {}).items():
        f = folder / name
        if not f.is_file():
            raise PlanError(f"{f}: missing; the serving plan lists it")
        if sha256(f) != digest:
            raise PlanError(f"{f}: content differs from the digest in {PLAN} (damaged or "
                            "replaced); rebuild the plan")
    return plan


def write_plan(folder: Path, plan: dict[str, Any],
               files: tuple[str, ...] = (WEIGHTS, ONNX, ONNX_INT8)) -> None:
    """plan.json with the digests of the `files` beside it (those present), written
    atomically."""
    plan["files"] = {n: sha256(folder / n) for n in files if (folder / n).is_file()}
    tmp = folder / (PLAN + ".tmp")
    tmp.write_text(json.dumps(plan, indent=1))
    tmp.replace(folder / PLAN)
