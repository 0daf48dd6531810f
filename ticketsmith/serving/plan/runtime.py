"""Running a plan: its routes, `PlanRunner` and `load_plan`. What a served model imports.

Loading needs numpy, safetensors and json, plus scipy / onnxruntime for the routes that use
them; never torch (only a plan whose measured kernel is torch's CSR product brings it in) and
never unpickling. See the package's docstring for the routes.
"""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ticketsmith.serving.plan.inputs import finish, to_model_input
from ticketsmith.serving.plan.layout import (FALLBACK, NEEDS, ONNX, ONNX_INT8, PLAN, WEIGHTS,
                                             PlanError, default_threads, missing, read_plan,
                                             shipped)

log = logging.getLogger("ticketsmith.serving")


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
        while (lacks := missing(NEEDS[kernel])):
            fallbacks.append(f"{step['name']} at batch {bs}: {kernel} needs "
                             f"{', '.join(lacks)}, which this host lacks; "
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
            if (lacks := missing(route.get("needs", NEEDS.get(name, [])))):
                self.fallbacks.append(f"route {name} needs {', '.join(lacks)}, which this host "
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
        for b, best in shipped(plan).items():
            if best not in self.routes and not only:
                self.fallbacks.append(f"batch {b}: serving {self.order[b][0]} instead of "
                                      f"the measured best {best}")
        for msg in self.fallbacks:
            log.warning("serving plan %s: %s", folder, msg)

    def route_for(self, n: int) -> str:
        return self.order[self._nearest(n)][0]

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.routes[self.route_for(len(x))](x)

    def predict(self, data: Any, output: str = "probabilities", form: str = "pixels"
                ) -> np.ndarray:
        """Natural input (`inputs.to_model_input`'s contract, `form` pixels or normalized) →
        probabilities, labels or logits."""
        n = len(np.asarray(getattr(data, "values", data))) if np.ndim(data) > 1 else 1
        route = self.route_for(n)
        spec = self.plan["input"]
        if route == "numpy":  # normalised straight into the route's feature-major layout
            logits = self.routes[route](to_model_input(data, spec, True, form), True)
        else:
            logits = self.routes[route](to_model_input(data, spec, form=form))
        return finish(logits, output)


def load_plan(folder: str | Path, threads: int | None = None,
              route: str | None = None) -> PlanRunner:
    """Load a plan folder for serving (no torch, no unpickling); `route` forces one route."""
    folder = Path(folder)
    return PlanRunner(folder, read_plan(folder), threads, route)
