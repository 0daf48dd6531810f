"""Building a plan from a masked model (needs torch): compaction, the ONNX graph, per-layer
kernels chosen by measurement, ONNX Runtime's dynamic int8 quantization.

Routes start in the default order (onnxruntime, numpy) until `rank.rank_routes` records the
benchmark's measured order.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ticketsmith.base.files import atomic_folder
from ticketsmith.serving.plan.inputs import input_spec
from ticketsmith.serving.plan.layout import (INEXACT, KIND, NEEDS, ONNX, ONNX_INT8, PLAN, VERSION,
                                             WEIGHTS, default_threads, missing, write_plan)
from ticketsmith.serving.plan.runtime import _NumpyRoute, linear_kernel

log = logging.getLogger("ticketsmith.serving")


def build_plan(model, meta: dict[str, Any], folder: str | Path, *,
               examples: dict[int, np.ndarray] | None = None,
               timer: Callable[[dict[str, Callable[[], object]]], dict[str, float]] | None = None,
               threads: int | None = None, compact_units: bool = True) -> Path:
    """Write the plan of a masked model (mask baked into its weights) to `folder`.

    compact_units=False (with no timer): the network as it is, dense kernels — the dense
    model in the plan's own runtimes, the baseline a same-runtime speedup is measured against.

    examples: batch size → model input; with `timer` (name → callable → seconds per call,
    measured side by side) each Linear layer of the numpy route gets the kernel that measured
    fastest at each batch size, else dense. Routes start in the default order (onnxruntime,
    numpy) until `rank_routes` records the benchmark's measured order.
    """
    import torch

    from ticketsmith.serving.compaction import Chain, CompactionError, Select, as_chain, compact
    from ticketsmith.serving.export import onnx_bytes

    folder = Path(folder)
    shape = [int(s) for s in meta["input_shape"]]
    examples = examples or {1: np.zeros((1, *shape), np.float32)}
    net, summary = copy_model(model), "not compacted"
    chain = as_chain(net)
    if chain is not None and not compact_units:
        net, summary = chain, "not compacted: the dense baseline"
    elif chain is not None:
        try:
            net, summary = compact(chain)
        except CompactionError as exc:
            net, summary = chain, f"not compacted: {exc}"
    else:
        summary = f"not compacted: {type(model).__name__} is not a chain"
    with atomic_folder(folder, prefix=".plan-") as tmp:
        (tmp / ONNX).write_bytes(onnx_bytes(net, tuple(shape)))
        routes: dict[str, Any] = {"onnxruntime": {"needs": NEEDS["onnxruntime"]}}
        # int8 serves only where a benchmark measured it, so an unmeasured plan has none
        if compact_units and timer is not None and _quantize(tmp / ONNX, tmp / ONNX_INT8):
            routes["onnxruntime_int8"] = {"needs": NEEDS["onnxruntime"], "exact": False}
        steps, arrays, why = [], {}, {}
        if isinstance(net, Chain) and all(isinstance(m, (torch.nn.Linear, torch.nn.ReLU,
                                                         torch.nn.Flatten, torch.nn.Identity,
                                                         torch.nn.Dropout, Select))
                                          for m in net.layers):
            steps, arrays = _numpy_steps(net)
            if timer is not None:
                why = _choose_kernels(steps, arrays, examples, timer)
            # Kernels fall back one by one (FALLBACK), so the route itself needs only numpy.
            routes["numpy"] = {"needs": NEEDS["numpy"]}
        from safetensors.numpy import save_file

        save_file(arrays or {"empty": np.zeros(0, np.float32)}, str(tmp / WEIGHTS))
        plan = {"kind": KIND, "version": VERSION, "input": input_spec(meta),
                "num_classes": int(meta.get("num_classes", 0)),
                "compaction": summary, "steps": steps, "routes": routes,
                "batch_sizes": sorted(examples), "threads": threads or default_threads(),
                "ranking": {str(b): [r for r in routes if r not in INEXACT]
                            for b in sorted(examples)},
                "kernels_why": why, "measured": {},
                "source": {k: meta[k] for k in ("model", "dataset", "level", "variant",
                                                 "replicate", "hash") if k in meta}}
        write_plan(tmp, plan)
    return folder


def _quantize(src: Path, dst: Path) -> bool:
    """ONNX Runtime's dynamic int8 quantization of `src`'s weights into `dst`; False (and no
    route) where it cannot quantize this graph."""
    try:
        import logging as _logging

        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        return False
    quiet = _logging.getLogger().level
    _logging.getLogger().setLevel(_logging.ERROR)  # its pre-processing advice is not news
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    except Exception as exc:  # the quantizer raises many types; all mean "no int8 route"
        log.info("no int8 route: %s", str(exc).splitlines()[0] if str(exc) else type(exc))
        dst.unlink(missing_ok=True)
        return False
    finally:
        _logging.getLogger().setLevel(quiet)
    return dst.is_file()


def copy_model(model):
    import copy

    return copy.deepcopy(model).cpu().eval()


def _numpy_steps(net) -> tuple[list[dict], dict[str, np.ndarray]]:
    import torch

    from ticketsmith.serving.compaction import Select

    steps, arrays = [], {}
    for i, m in enumerate(net.layers):
        if isinstance(m, Select):
            arrays[f"select.{i}"] = m.index.cpu().numpy().astype(np.int64)
            steps.append({"op": "select", "index": f"select.{i}", "full": int(m.full)})
        elif isinstance(m, torch.nn.Flatten):
            steps.append({"op": "flatten"})
        elif isinstance(m, torch.nn.ReLU):
            steps.append({"op": "relu"})
        elif isinstance(m, torch.nn.Linear):
            w = m.weight.detach().cpu().numpy().astype(np.float32)
            arrays[f"layer.{i}.weight"] = w
            arrays[f"layer.{i}.bias"] = (m.bias.detach().cpu().numpy().astype(np.float32)
                                         if m.bias is not None else np.zeros(len(w), np.float32))
            steps.append({"op": "linear", "name": net.names[i] or f"layers.{i}",
                          "weight": f"layer.{i}.weight", "bias": f"layer.{i}.bias",
                          "shape": list(w.shape), "kernel": {}})
    first = next(i for i, s in enumerate(steps) if s["op"] in ("select", "linear"))
    if steps[first]["op"] == "linear":  # no select to fuse the transpose with
        steps.insert(first, {"op": "transpose"})
    if not steps or steps[0]["op"] != "flatten":
        steps.insert(0, {"op": "flatten"})
    return steps, arrays


def _choose_kernels(steps, arrays, examples, timer) -> dict[str, str]:
    """Per Linear layer and batch size, dense or CSR, by measurement on that layer's input."""
    import scipy.sparse as sp

    why = {}
    for bs, x0 in sorted(examples.items()):
        route = _NumpyRoute([s for s in steps if s["op"] != "linear"], arrays, [bs], [])
        x = np.ascontiguousarray(x0, dtype=np.float32)
        for step in steps:
            if step["op"] != "linear":
                x = _NumpyRoute([step], arrays, [bs], []).calls[bs][0][1](x)
                continue
            kernels = [k for k in ("dense", "csr", "torch_csr") if not missing(NEEDS[k])]
            calls = {k: (lambda f=linear_kernel(k, arrays, step), xin=x: f(xin))
                     for k in kernels}
            times = timer(calls)
            pick = min(times, key=times.get)
            step["kernel"][str(bs)] = pick
            density = np.count_nonzero(arrays[step["weight"]]) / max(arrays[step["weight"]].size, 1)
            why[f"{step['name']}@{bs}"] = f"{pick}: " + ", ".join(
                f"{k} {t * 1e6:.1f} us" for k, t in times.items()) + f" at density {density:.1%}"
            x = calls["dense"]()
        del route
    for step in steps:
        if step["op"] == "linear" and {"csr", "torch_csr"} & set(step["kernel"].values()):
            csr = sp.csr_matrix(arrays[step["weight"]])
            arrays[step["weight"] + ".data"] = csr.data.astype(np.float32)
            arrays[step["weight"] + ".indices"] = csr.indices.astype(np.int32)
            arrays[step["weight"] + ".indptr"] = csr.indptr.astype(np.int32)
    return why


def ensure_plan(folder: str | Path, checkpoint: str | Path,
                allow_factory: bool | str | None = False) -> Path:
    """The plan at `folder`, built unmeasured (kernels dense, routes in default order) when
    the benchmark did not write one."""
    folder = Path(folder)
    if not (folder / PLAN).is_file():
        from ticketsmith.engine.checkpoint import model_from_checkpoint

        model, _, meta = model_from_checkpoint(checkpoint, "cpu", allow_factory)
        build_plan(model, meta, folder)
    return folder
