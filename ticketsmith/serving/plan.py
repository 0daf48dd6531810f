"""The deployable serving plan: what a registered ticket ships and its pyfunc runs.

A plan is a folder, with nothing pickled in it:

    plan.json            input spec, steps, kernels, routes ranked per batch size, why, digests
    weights.safetensors  numpy arrays: the compacted weights and biases, CSR parts, input index
    model.onnx           the compacted network as one ONNX graph (the `onnxruntime` route)
    model_int8.onnx      the same graph with int8 weights (ONNX Runtime's dynamic
                         quantization; the `onnxruntime_int8` route, inexact)

A *route* runs the whole network in one runtime:

    onnxruntime  the compacted network as an ONNX graph (any chain: Linear and Conv2d layers)
    onnxruntime_int8  that graph with dynamically quantized int8 weights: inexact, so it is
                 served only where the benchmark measured it and its accuracy passed the gate
    numpy        the compacted chain step by step; per Linear layer and batch size a numpy
                 dense matmul or a scipy CSR product, whichever measured faster (Linear
                 chains only)

The benchmark times every route against the dense model side by side and ranks them per
batch size; a request runs the first available route of the measured batch size nearest to
its own (log scale). A route or kernel this host cannot run (a missing library, a CUDA-only
kernel on a CPU host) is skipped for the next one, and the runner says so in `fallbacks`.

Loading (`load_plan`) needs numpy, safetensors and json, plus scipy / onnxruntime for the
routes that use them; never torch and never unpickling. Files are checked against the
digests in plan.json, so a damaged plan fails loudly instead of serving wrong answers.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ticketsmith.base.errors import BenchmarkError

log = logging.getLogger("ticketsmith.serving")
KIND, VERSION = "ticketsmith-serving-plan", 1
PLAN, WEIGHTS, ONNX, ONNX_INT8 = ("plan.json", "weights.safetensors", "model.onnx",
                                  "model_int8.onnx")
ROUTES = ("onnxruntime", "numpy", "onnxruntime_int8")
INEXACT = ("onnxruntime_int8",)  # checked by agreement and relative error, not to rounding
# An inexact route must agree with the masked model's labels on this share of the probe and
# stay within this relative L2 error of its outputs (the benchmark also gates its accuracy).
INEXACT_AGREEMENT, INEXACT_RTOL = 0.98, 0.1
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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _missing(needs: list[str]) -> list[str]:
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


# --- natural input -----------------------------------------------------------------------------

def to_model_input(data: Any, spec: dict[str, Any], feature_major: bool = False) -> np.ndarray:
    """What a user has → the float32 (N, *shape) the network was trained on.

    Images (a spec with mean/std): uint8 or integer pixels 0..255, or floats 0..1 (a sample
    with any value above 1 is read as 0..255); flat (N, C*H*W), shaped (N, H, W) for one
    channel, (N, C, H, W) or channels-last (N, H, W, C). The data set's normalisation is
    applied here. Other inputs are taken as float features, flat or shaped.
    feature_major: return (C*H*W, N) in C order instead, written in the normalising pass.
    """
    shape = tuple(spec["shape"])
    a = np.asarray(getattr(data, "values", data))  # a pandas DataFrame arrives via .values
    size = math.prod(shape)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise PlanError(f"input: expected numbers (images of shape {list(shape)}), got {a.dtype}")
    if a.ndim == 1 and a.size == size:
        a = a[None]
    if a.ndim < 2 or math.prod(a.shape[1:]) != size:
        raise PlanError(f"input: expected a batch of {size} values per sample (shape "
                        f"{list(shape)}, flat or shaped), got an array of shape {list(a.shape)}")
    if len(shape) == 3 and shape[0] > 1 and a.shape[1:] == (shape[1], shape[2], shape[0]):
        a = a.transpose(0, 3, 1, 2)  # channels-last images
    flat = a.reshape(len(a), size)
    if spec.get("mean") is None:
        if feature_major:
            return _transposed_f32(flat)
        return flat.astype(np.float32).reshape(len(a), *shape)
    scale, shift = _affine(shape, tuple(spec["mean"]), tuple(spec["std"]))
    if np.issubdtype(a.dtype, np.integer) or a.dtype == bool:
        factor = None  # 0..255: folded into scale
    else:  # 0..1, or a sample above 1 read as 0..255
        factor = np.where(flat.max(1, initial=0) > 1.0, 1 / 255.0, 1.0).astype(np.float32)
        scale = scale * 255.0
    if feature_major:
        out = _transposed_f32(flat)
        if factor is not None:
            out *= factor
        out *= scale[:, None]
        out += shift[:, None]
        return out
    out = flat.astype(np.float32)
    if factor is not None:
        out *= factor[:, None]
    out *= scale
    out += shift
    return out.reshape(len(a), *shape)


def _transposed_f32(flat: np.ndarray) -> np.ndarray:
    """(N, F) -> float32 (F, N) in C order (the numpy route's kernels read rows; torch would
    copy an F-ordered input). Narrow input is transposed before the cast: fewer bytes move."""
    if flat.dtype.itemsize <= 4:
        return np.ascontiguousarray(flat.T).astype(np.float32)  # a copy: normalised in place
    return np.ascontiguousarray(flat.astype(np.float32).T)


_AFFINE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _affine(shape: tuple[int, ...], mean: tuple[float, ...], std: tuple[float, ...]
            ) -> tuple[np.ndarray, np.ndarray]:
    """Per feature (channel-major), float32: pixel 0..255 -> (pixel / 255 - mean) / std as
    pixel * scale + shift. Cached: a request pays two multiply-adds, not their set-up."""
    key = (shape, mean, std)
    if key not in _AFFINE:
        per = math.prod(shape) // len(std)
        scale = np.repeat(1.0 / (255.0 * np.asarray(std, np.float64)), per)
        shift = np.repeat(-np.asarray(mean, np.float64) / np.asarray(std, np.float64), per)
        _AFFINE[key] = (scale.astype(np.float32), shift.astype(np.float32))
    return _AFFINE[key]


def input_spec(meta: dict[str, Any]) -> dict[str, Any]:
    """The natural-input spec of a checkpoint: its input shape and its data set's
    normalisation (None for data that are not images)."""
    from ticketsmith.engine.data import normalisation

    norm = normalisation(meta.get("dataset", ""))
    return {"shape": [int(s) for s in meta["input_shape"]],
            "mean": list(norm[0]) if norm else None, "std": list(norm[1]) if norm else None,
            "dtype": "float32"}


def finish(logits: np.ndarray, output: str) -> np.ndarray:
    """Logits → what the caller asked for: probabilities (default), labels or logits."""
    if output == "labels":
        return logits.argmax(1)
    if output == "logits":
        return logits
    if output != "probabilities":
        raise PlanError(f"output: expected probabilities, labels or logits, got {output!r}")
    return softmax(logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(1, keepdims=True)
    return z


# --- running a plan ----------------------------------------------------------------------------

class _NumpyRoute:
    """The compacted Linear chain as numpy steps; each layer's kernel per batch size.

    Activations run feature-major, (features, batch) in C order: the input is transposed
    once (fused with the input select), every layer is W @ x (a dense BLAS product or a
    scipy CSR product with the sparse operand first, which reads x's rows contiguously) and
    the output is transposed back once.
    """

    def __init__(self, steps: list[dict], arrays: dict[str, np.ndarray], sizes: list[int],
                 fallbacks: list[str]):
        self.sizes = sizes
        self.calls: dict[int, list[tuple[str, Callable[[np.ndarray], np.ndarray]]]] = {}
        for bs in sizes:
            chain, select = [], None
            for step in steps:
                op = step["op"]
                if op == "select":  # (N, F) -> the kept features, feature-major
                    select, full = arrays[step["index"]], step["full"]
                    chain.append((op, lambda x, i=select: x.T[i]))
                    chain.append(("select_fm", lambda x, i=select: x[i]))
                elif op == "linear" and select is not None:
                    fn, sparse = self._linear(dict(step, full_input=full), arrays, bs,
                                              fallbacks, select)
                    if sparse:  # CSR reads only the features it needs: no select at all
                        chain[-2:] = [("select", lambda x: np.ascontiguousarray(x.T))]
                    chain.append((op, fn))
                    select = None
                elif op == "flatten":
                    chain.append((op, lambda x: x.reshape(len(x), -1)))
                elif op == "transpose":
                    chain.append((op, lambda x: np.ascontiguousarray(x.T)))
                elif op == "relu":
                    chain.append((op, lambda x: np.maximum(x, 0, out=x)))
                elif op == "linear":
                    chain.append((op, self._linear(step, arrays, bs, fallbacks)[0]))
                else:
                    raise PlanError(f"{PLAN}: numpy route cannot run step {op!r}")
            self.calls[bs] = chain
        # Per batch size and layout, the bare list of functions: a request walks it and
        # nothing else (at batch 1 the whole route is ~15 us; bookkeeping would show).
        self.fns = {(bs, fm): [fn for op, fn in chain if op not in (
            ("flatten", "select", "transpose") if fm else ("select_fm",))]
            for bs, chain in self.calls.items() for fm in (False, True)}
        self.nearest = _nearest(sizes)

    @staticmethod
    def _linear(step: dict, arrays: dict[str, np.ndarray], bs: int, fallbacks: list[str],
                select: np.ndarray | None = None):
        """(the layer's kernel, whether it is sparse); a sparse kernel right after the input
        select reads the full input instead (its column indices mapped through `select`)."""
        kernel = step.get("kernel", {}).get(str(bs), "dense")
        if kernel not in NEEDS:
            raise PlanError(f"{PLAN}: unknown kernel {kernel!r} for {step['name']}")
        while (missing := _missing(NEEDS[kernel])):
            fallbacks.append(f"{step['name']} at batch {bs}: {kernel} needs "
                             f"{', '.join(missing)}, which this host lacks; "
                             f"{FALLBACK[kernel]} instead")
            kernel = FALLBACK[kernel]
        return linear_kernel(kernel, arrays, step, select), kernel != "dense"

    def __call__(self, x: np.ndarray, feature_major: bool = False) -> np.ndarray:
        """Logits (N, classes) of model input x: (N, *shape), or (features, N) in C order
        when `feature_major` (natural input is normalised straight into that layout)."""
        for fn in self.fns[self.nearest(x.shape[-1] if feature_major else len(x)),
                           feature_major]:
            x = fn(x)
        return np.ascontiguousarray(x.T)


def _nearest(sizes: list[int]) -> Callable[[int], int]:
    """n -> the measured batch size nearest to n on a log scale (bisection on the geometric
    midpoints between neighbours)."""
    import bisect

    sizes = sorted(sizes)
    cuts = [math.sqrt(a * b) for a, b in zip(sizes, sizes[1:])]
    return lambda n: sizes[bisect.bisect_right(cuts, n)]


def linear_kernel(kernel: str, arrays: dict[str, np.ndarray], step: dict,
                  select: np.ndarray | None = None):
    """x (in, batch) -> W x + b (out, batch): a dense BLAS product (numpy), a scipy CSR
    product, or torch's CSR product (MKL's sparse kernels in torch's x86 builds), sharing
    memory with numpy both ways."""
    col = arrays[step["bias"]].reshape(-1, 1)
    name = step["weight"]
    if kernel in ("csr", "torch_csr"):
        import scipy.sparse as sp

        if name + ".data" in arrays:
            w = sp.csr_matrix((arrays[name + ".data"], arrays[name + ".indices"],
                               arrays[name + ".indptr"]), shape=step["shape"])
        else:
            w = sp.csr_matrix(arrays[name])
        if select is not None:  # widen: input j of the layer is feature select[j]
            w = sp.csr_matrix((w.data, select[w.indices].astype(w.indices.dtype), w.indptr),
                              shape=(w.shape[0], int(step["full_input"])))
    if kernel == "torch_csr":
        import torch

        import warnings

        with warnings.catch_warnings():  # "CSR support is in beta": known; the plan is checked
            warnings.simplefilter("ignore", UserWarning)
            tw = torch.sparse_csr_tensor(torch.from_numpy(w.indptr.astype(np.int64)),
                                         torch.from_numpy(w.indices.astype(np.int64)),
                                         torch.from_numpy(w.data), w.shape)
        tcol = torch.from_numpy(col)

        def run_torch(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return torch.addmm(tcol, tw, torch.from_numpy(x)).numpy()
        return run_torch
    if kernel != "csr":
        w = np.ascontiguousarray(arrays[step["weight"]])

    def run(x: np.ndarray) -> np.ndarray:
        y = w @ x
        y += col
        return y
    return run


class _OnnxRoute:
    def __init__(self, path: Path, threads: int):
        from ticketsmith.serving.export import ort_session

        self.session = ort_session(str(path), threads)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": x})[0]


class PlanRunner:
    """A loaded plan: `logits(x)` on model input, `predict(data, output)` on natural input."""

    def __init__(self, folder: Path, plan: dict[str, Any], threads: int | None,
                 only: str | None = None):
        self.folder, self.plan = folder, plan
        self.threads = threads or plan.get("threads") or default_threads()
        self.fallbacks: list[str] = []
        self.routes: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
        wanted = [only] if only else list(plan["routes"])
        arrays = None
        for name in wanted:
            route = plan["routes"].get(name)
            if route is None:
                raise PlanError(f"{folder / PLAN}: no route {name!r}; it has "
                                f"{', '.join(plan['routes'])}")
            if (missing := _missing(route.get("needs", NEEDS.get(name, [])))):
                self.fallbacks.append(f"route {name} needs {', '.join(missing)}, which this host "
                                      "lacks")
                continue
            if name in ("onnxruntime", "onnxruntime_int8"):
                graph = ONNX if name == "onnxruntime" else ONNX_INT8
                self.routes[name] = _OnnxRoute(folder / graph, self.threads)
            elif name == "numpy":
                if arrays is None:
                    from safetensors.numpy import load_file

                    arrays = load_file(str(folder / WEIGHTS))
                sizes = [int(b) for b in plan["batch_sizes"]]
                self.routes[name] = _NumpyRoute(plan["steps"], arrays, sizes, self.fallbacks)
                if sys.modules.get("torch") is not None:  # torch CSR kernels: plan's threads
                    sys.modules["torch"].set_num_threads(self.threads)
            else:
                self.fallbacks.append(f"route {name} is not known to this version; skipped")
        if not self.routes:
            raise PlanError(f"{folder / PLAN}: no route can run on this host "
                            f"({'; '.join(self.fallbacks)})")
        ranked = {int(b): [r for r in order if r in self.routes]
                  for b, order in plan["ranking"].items()}
        self.order = {b: (r or list(self.routes)) for b, r in ranked.items()}
        self._nearest = _nearest(list(self.order))
        for b, order in plan["ranking"].items():
            if order and order[0] not in self.routes and not only:
                self.fallbacks.append(f"batch {b}: serving {self.order[int(b)][0]} instead of "
                                      f"the measured best {order[0]}")
        for msg in self.fallbacks:
            log.warning("serving plan %s: %s", folder, msg)

    def route_for(self, n: int) -> str:
        return self.order[self._nearest(n)][0]

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.routes[self.route_for(len(x))](x)

    def predict(self, data: Any, output: str = "probabilities") -> np.ndarray:
        n = len(np.asarray(getattr(data, "values", data))) if np.ndim(data) > 1 else 1
        route = self.route_for(n)
        if route == "numpy":  # normalised straight into the route's feature-major layout
            logits = self.routes[route](to_model_input(data, self.plan["input"], True), True)
        else:
            logits = self.routes[route](to_model_input(data, self.plan["input"]))
        return finish(logits, output)


def read_plan(folder: str | Path) -> dict[str, Any]:
    """plan.json, checked: the right kind and version, and every file's digest."""
    folder = Path(folder)
    path = folder / PLAN
    try:
        plan = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"{path}: not a readable serving plan ({' '.join(str(exc).split())})"
                        ) from None
    if not isinstance(plan, dict) or plan.get("kind") != KIND or plan.get("version") != VERSION:
        raise PlanError(f"{path}: not a {KIND} version {VERSION}")
    for name, digest in plan.get("files", {}).items():
        f = folder / name
        if not f.is_file():
            raise PlanError(f"{f}: missing; the serving plan lists it")
        if _sha256(f) != digest:
            raise PlanError(f"{f}: content differs from the digest in {PLAN} (damaged or "
                            "replaced); rebuild the plan")
    return plan


def load_plan(folder: str | Path, threads: int | None = None,
              route: str | None = None) -> PlanRunner:
    """Load a plan folder for serving (no torch, no unpickling); `route` forces one route."""
    folder = Path(folder)
    return PlanRunner(folder, read_plan(folder), threads, route)


# --- building a plan (needs torch) ---------------------------------------------------------------

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
    tmp = Path(tempfile.mkdtemp(prefix=".plan-", dir=folder.parent if folder.parent.is_dir()
                                else None))
    try:
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
        _write(tmp, plan)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
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


def _write(folder: Path, plan: dict[str, Any]) -> None:
    plan["files"] = {n: _sha256(folder / n) for n in (WEIGHTS, ONNX, ONNX_INT8)
                     if (folder / n).is_file()}
    tmp = folder / (PLAN + ".tmp")
    tmp.write_text(json.dumps(plan, indent=1))
    tmp.replace(folder / PLAN)


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
            kernels = [k for k in ("dense", "csr", "torch_csr") if not _missing(NEEDS[k])]
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


def rank_routes(folder: str | Path, speedups: dict[str, dict[int, float | None]],
                check: dict[str, Any] | None = None, threads: int | None = None,
                warning: str | None = None) -> dict:
    """Record the benchmark's measured speedups (route → batch size → dense/route, side by
    side) in plan.json and rank the routes per batch size, fastest first; unmeasured or failed
    routes go last. `check`: the plan's check against the masked model."""
    folder = Path(folder)
    plan = read_plan(folder)
    for b in plan["ranking"]:
        got = {r: (speedups.get(r) or {}).get(int(b)) for r in plan["routes"]}
        # an inexact route serves only where it was measured (its accuracy passed the gate)
        keep = [r for r in plan["routes"] if got[r] or r not in INEXACT]
        plan["ranking"][b] = sorted(keep, key=lambda r: -(got[r] or 0.0))
    plan["measured"] = {r: {str(b): s for b, s in v.items()} for r, v in speedups.items()}
    plan["warning"] = warning  # the benchmark's: its timings were noisy
    if check is not None:
        plan["check"] = check
    if threads:
        plan["threads"] = threads
    _write(folder, plan)
    return plan


def check_plan(folder: str | Path, model, probe) -> dict[str, Any]:
    """Every route of the plan against the masked model on a fixed probe batch (model input,
    a torch tensor): {'max_abs_error', 'argmax_agreement', 'probe', 'routes'}; PlanError
    when a route's outputs differ beyond float rounding."""
    import torch

    from ticketsmith.serving.export import ExportError, check_outputs

    plan = read_plan(folder)
    with torch.inference_mode():
        ref = model.cpu().eval()(probe.cpu()).float().numpy()
    x = probe.cpu().numpy().astype(np.float32)
    worst, agree, routes, inexact = 0.0, 1.0, [], {}
    for name in plan["routes"]:
        runner = load_plan(folder, route=name)
        if name not in runner.routes:
            continue
        out = runner.routes[name](x)
        if name in INEXACT:
            inexact[name] = _check_inexact(folder, name, out, ref)
            continue
        try:
            got = check_outputs(out, ref)
        except ExportError as exc:
            raise PlanError(f"{Path(folder) / PLAN}: route {name} fails its check: {exc}") from None
        worst, agree = max(worst, got["max_abs_error"]), min(agree, got["argmax_agreement"])
        routes.append(name)
    if not routes:
        raise PlanError(f"{Path(folder) / PLAN}: no route could be checked on this host")
    return {"max_abs_error": worst, "argmax_agreement": agree, "probe": int(len(x)),
            "routes": routes, "inexact": inexact}


def _check_inexact(folder, name: str, out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    rel = float(np.linalg.norm(out - ref) / max(float(np.linalg.norm(ref)), 1e-12))
    agree = float((out.argmax(1) == ref.argmax(1)).mean()) if out.shape == ref.shape else 0.0
    if out.shape != ref.shape or rel > INEXACT_RTOL or agree < INEXACT_AGREEMENT:
        raise PlanError(f"{Path(folder) / PLAN}: route {name} fails its check: relative error "
                        f"{rel:.3g} (at most {INEXACT_RTOL}), argmax agreement {agree:.2%} (at "
                        f"least {INEXACT_AGREEMENT:.0%})")
    return {"relative_error": rel, "argmax_agreement": agree}


def describe(plan: dict[str, Any]) -> dict[str, str]:
    """Short strings for the version's tags: format (best route per batch size) and plan."""
    best = {b: r[0] for b, r in plan["ranking"].items() if r}
    fmt = ", ".join(f"batch {b}: {r}" for b, r in best.items())
    kernels = ", ".join(f"{s['name']}={'/'.join(sorted(set(s['kernel'].values())) or ['dense'])}"
                        for s in plan["steps"] if s["op"] == "linear")
    text = f"compacted ({plan['compaction']})"
    if kernels:
        text += f"; numpy kernels {kernels}"
    return {"format": fmt, "plan": text}


def probe_batch(shape: list[int], n: int = 512):
    """A fixed probe batch when no test images are at hand: seeded standard-normal model input
    (the scale of normalised images)."""
    import torch

    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))


def verify(folder: str | Path, checkpoint: str | Path, probe=None,
           allow_factory: bool | str | None = False) -> dict[str, Any]:
    """The plan at `folder` against the masked model of `checkpoint` (which must be the one it
    was built from) on `probe` (model input; default `probe_batch`): `check_plan`'s record."""
    from ticketsmith.engine.checkpoint import model_from_checkpoint

    model, _, meta = model_from_checkpoint(checkpoint, "cpu", allow_factory)
    plan = read_plan(folder)
    src = plan.get("source", {})
    if any(src.get(k) is not None and meta.get(k) is not None and src[k] != meta[k]
           for k in ("hash", "level", "variant", "replicate")):
        raise PlanError(f"{Path(folder) / PLAN}: built for {src}, not for {checkpoint}")
    probe = probe_batch(list(meta["input_shape"])) if probe is None else probe
    return check_plan(folder, model, probe)


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
