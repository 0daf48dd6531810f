"""Serving formats: ways to execute a masked model that a user could deploy.

A masked model is a dense model with zeros and is never faster. Each format is a plain builder
in `FORMATS`, `(model with masks baked into its weights, mask, ctx) -> Served`; the benchmark
checks every one against the masked model's outputs before it is timed.

    dense               exact  the masked model as is: the baseline
    csr                 exact  Linear layers large and sparse enough to pay as torch CSR with
                               int32 indices (CSR_MAX_DENSITY, CSR_MIN_WEIGHTS); others dense
    compacted           exact  dead units / channels / input features removed, constants
                               folded into the next bias (`ticketsmith.compaction`)
    compacted_int8      no     compacted + dynamic int8 quantization of Linear layers (CPU)
    auto                *      per Linear layer of the compacted model the fastest measured of
                               dense / CSR (/ int8 while the accuracy gate holds)
    onnxruntime         exact  the serving plan's compacted ONNX graph in ONNX Runtime (CPU)
    numpy               exact  the serving plan's compacted chain in numpy, per layer dense or
                               scipy CSR as measured (`ticketsmith.serving.plan`, CPU)
    onnxruntime_int8    no     the plan's ONNX graph with int8 weights (ONNX Runtime dynamic
                               quantization); accuracy re-measured and gated
    onnxruntime_dense,  exact  the network uncompacted with dense kernels in those runtimes:
    numpy_dense                the baselines of the same-runtime speedups
    fp16, bf16          no     CUDA: a half-precision copy
    semi_structured_2:4 no     CUDA: fp16 with `to_sparse_semi_structured` on 2:4 Linear layers
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
import tempfile
from typing import Callable

import torch
from torch import nn

from ticketsmith.serving.agreement import INEXACT_RTOL
from ticketsmith.serving.compaction import Chain, CompactionError, Select, as_chain, compact
from ticketsmith.engine.masks import Mask, semi_structured_skip

# CSR pays only for large, very sparse layers. Measured with 2 threads on a 2-core EPYC (torch
# 2.14): a 300x784 layer at 5% density ties dense at batch 256 and wins from ~2%; a 4096x4096
# layer breaks even at 10% density. Below ~64K weights the sparse kernel's fixed cost (~9 us
# per call vs ~3-5 us dense) loses at any density. The auto plan measures instead of guessing.
CSR_MAX_DENSITY = 0.1
CSR_MIN_WEIGHTS = 1 << 16
CUDA_ONLY = ("fp16", "bf16", "semi_structured_2:4")
CPU_ONLY = ("compacted_int8", "onnxruntime", "numpy", "onnxruntime_int8", "onnxruntime_dense",
            "numpy_dense")


# The dense network in each runtime: what a ticket's formats are measured against, never a
# saving of the ticket itself (a "best format" never picks one of these).
BASELINES = ("dense", "onnxruntime_dense", "numpy_dense")


class FormatUnavailable(RuntimeError):
    """This format cannot serve this model on this device; the message says why."""


@dataclass
class Served:
    module: nn.Module             # called with the same input as the masked model
    layers: dict[str, str]        # original layer name -> how it is executed
    exact: bool = True            # outputs equal the masked model's up to float rounding
    tolerance: float = 0.0        # inexact formats: largest relative L2 error of the outputs
    note: str = ""


@dataclass
class BuildContext:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    example: dict[int, torch.Tensor] = field(default_factory=dict)  # batch size -> model input
    # calls by name -> typical seconds per call, measured side by side (the auto plan's clock)
    timer: Callable[[dict[str, Callable[[], object]]], dict[str, float]] | None = None
    accuracy: Callable[[nn.Module], float] | None = None  # test accuracy in [0, 1]
    max_accuracy_drop: float = 1.0  # points a quantized plan may lose against the masked model
    meta: dict = field(default_factory=dict)  # the checkpoint's metadata (input shape, data set)
    threads: int | None = None  # the serving plan's runtimes use this many threads
    plan_folder: Path | None = None  # the serving plan, built by the first route format asked
    baseline_folder: Path | None = None  # the dense network in the plan's runtimes


class CSRLinear(nn.Module):
    """y = x W^T + b with W as CSR (int32 indices), computed as (W x^T)^T: sparse operand first."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        with warnings.catch_warnings():  # "CSR support is in beta": known, and checked below
            warnings.simplefilter("ignore", UserWarning)
            csr = weight.detach().to_sparse_csr()
            self.register_buffer("weight", torch.sparse_csr_tensor(
                csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32),
                csr.values(), csr.shape, check_invariants=True))
        b = bias.detach() if bias is not None else weight.new_zeros(weight.shape[0])
        self.register_buffer("bias", b.reshape(-1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
        # (W x^T)^T: a transposed view comes out, which a following CSRLinear reads as is.
        return torch.addmm(self.bias, self.weight, x.t()).t()


class Cast(nn.Module):
    """Run `module` in `dtype`; inputs are cast in and outputs back to float32."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self.dtype)).float()


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def _int8(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, but it is still torch's
        # own CPU path for dynamic int8 Linear in 2.14 and needs no extra dependency.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)


def _source_names(module: nn.Module) -> dict[str, str]:
    """named_modules() name -> the source model's layer name (Chain layers map back)."""
    if isinstance(module, Chain):
        return {f"layers.{i}": n for i, n in enumerate(module.names) if n is not None}
    return {n: n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _compacted_or_copy(model: nn.Module) -> tuple[nn.Module, str, str]:
    chain = as_chain(copy.deepcopy(model))
    if chain is None:
        return copy.deepcopy(model), "", f"not compacted: {type(model).__name__} is not a chain"
    try:
        compacted, summary = compact(chain)
    except CompactionError as exc:
        return copy.deepcopy(model), "", f"not compacted: {exc}"
    return compacted, "compacted+", summary


# --- builders --------------------------------------------------------------------------------

def _dense(model: nn.Module, mask: Mask | None, ctx: BuildContext) -> Served:
    return Served(model, {n: "dense" for n in _source_names(model).values()})


def _csr(model: nn.Module, mask: Mask | None, ctx: BuildContext) -> Served:
    new = copy.deepcopy(model)
    layers = {n: "dense" for n in _source_names(model).values()}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if (isinstance(m, nn.Linear) and w.numel() >= CSR_MIN_WEIGHTS
                and int(torch.count_nonzero(w)) <= CSR_MAX_DENSITY * w.numel()):
            _replace(new, name, CSRLinear(w, m.bias))
            layers[name] = "csr"
    note = "" if "csr" in layers.values() else "no Linear layer large and sparse enough for CSR"
    return Served(new, layers, note=note)


def _compacted(model: nn.Module, mask: Mask | None, ctx: BuildContext) -> Served:
    chain = as_chain(copy.deepcopy(model))
    if chain is None:
        raise FormatUnavailable(f"{type(model).__name__} is not a chain of Linear/Conv2d layers")
    try:
        compacted, summary = compact(chain)
    except CompactionError as exc:
        raise FormatUnavailable(str(exc)) from None
    return Served(compacted, {n: "compacted" for n in _source_names(compacted).values()},
                  note=summary)


def _compacted_int8(model: nn.Module, mask: Mask | None, ctx: BuildContext) -> Served:
    if ctx.device.type != "cpu":
        raise FormatUnavailable("dynamic int8 quantization runs on CPU only")
    base, prefix, summary = _compacted_or_copy(model)
    names = _source_names(base)
    layers = {n: prefix + ("int8" if isinstance(base.get_submodule(k), nn.Linear) else "fp32")
              for k, n in names.items()}
    return Served(_int8(base), layers, exact=False, tolerance=INEXACT_RTOL, note=summary)


def _capture_inputs(module: nn.Module, names: list[str], example: dict[int, torch.Tensor]):
    """{layer name: {batch size: the input that layer sees}} from one forward per batch size."""
    seen: dict[str, dict[int, torch.Tensor]] = {n: {} for n in names}
    for bs, x in example.items():
        hooks = [module.get_submodule(n).register_forward_pre_hook(
            lambda m, inp, n=n, bs=bs: seen[n].__setitem__(bs, inp[0])) for n in names]
        try:
            module(x)
        finally:
            for h in hooks:
                h.remove()
    return seen


def _candidates(layer: nn.Linear, select: Select | None, ctx: BuildContext):
    """name -> (module replacing the layer, whether it reads the full pre-select input)."""
    cands = {"dense": (layer, False), "csr": (CSRLinear(layer.weight, layer.bias), False)}
    if ctx.accuracy is not None and ctx.device.type == "cpu":
        cands["int8"] = (_int8(nn.Sequential(layer))[0], False)
    if select is not None:  # or skip the index-select: widen the weight back to all inputs
        wide = nn.Linear(select.full, len(layer.weight), device=layer.weight.device)
        with torch.no_grad():
            wide.weight.zero_()[:, select.index] = layer.weight
            wide.bias.copy_(layer.bias)
        cands["dense_full_input"] = (wide.requires_grad_(False), True)
        cands["csr_full_input"] = (CSRLinear(wide.weight, layer.bias), True)
    return cands


def _auto(model: nn.Module, mask: Mask | None, ctx: BuildContext) -> Served:
    if ctx.timer is None or not ctx.example:
        raise FormatUnavailable("the auto plan needs a timer and example inputs")
    base, prefix, summary = _compacted_or_copy(model)
    src = _source_names(base)
    lin = [n for n in src if isinstance(base.get_submodule(n), nn.Linear)]
    select_name = None
    if isinstance(base, Chain):
        select_name = next((f"layers.{i}" for i, m in enumerate(base.layers)
                            if isinstance(m, Select)), None)
    seen = _capture_inputs(base, lin + ([select_name] if select_name else []), ctx.example)
    ranked = {}
    for n in lin:
        sel = base.get_submodule(select_name) if _after(select_name, n) else None
        cands = _candidates(base.get_submodule(n), sel, ctx)
        score = dict.fromkeys(cands, 0.0)  # sum over batch sizes of log(time / dense time):
        for bs in ctx.example:               # each batch size weighs the same, no one dominates
            x = seen[select_name][bs] if sel is not None else seen[n][bs]
            pre = sel if sel is not None else nn.Identity()  # the select's cost counts too
            calls = {c: (lambda m=m, wide=wide: m(x) if wide else m(pre(x)))
                     for c, (m, wide) in cands.items()}
            times = ctx.timer(calls)
            for c in cands:
                score[c] += math.log(times[c] / times["dense"])
        ranked[n] = (sorted(cands, key=score.get), cands)
    return _apply_plan(base, ranked, src, prefix, select_name, summary, ctx)


def _after(select_name: str | None, layer_name: str) -> bool:
    """True when `layer_name` is the weighted layer right after the index-select."""
    return select_name is not None and layer_name == f"layers.{int(select_name[7:]) + 1}"


def _apply_plan(base, ranked, src, prefix, select_name, summary, ctx) -> Served:
    def build(allow_int8: bool) -> tuple[nn.Module, dict[str, str]]:
        plan = copy.deepcopy(base)  # base holds dense layers only, so it can be copied
        layers = {src[n]: prefix + "dense" for n in src}
        for n, (order, cands) in ranked.items():
            pick = next(c for c in order if allow_int8 or c != "int8")
            module, wide = cands[pick]
            _replace(plan, n, module)
            if wide:
                _replace(plan, select_name, nn.Identity())
            layers[src[n]] = prefix + pick
        return plan, layers

    plan, layers = build(allow_int8=True)
    note = summary
    if any(v.endswith("int8") for v in layers.values()):
        ref, got = ctx.accuracy(base), ctx.accuracy(plan)
        if (ref - got) * 100 > ctx.max_accuracy_drop:
            plan, layers = build(allow_int8=False)
            note += f"; int8 layers dropped: accuracy {got:.2%} vs {ref:.2%}"
    exact = not any(v.endswith("int8") for v in layers.values())
    return Served(plan, layers, exact=exact, tolerance=0.0 if exact else INEXACT_RTOL,
                  note=note)


class RouteModule(nn.Module):
    """One route of a loaded serving plan behind the masked model's call: a CPU float32
    tensor in, logits out (numpy arrays underneath, shared without copies). `proxy` is the
    compacted torch network it computes, for the bytes-moved model."""

    def __init__(self, route, arrays: dict, proxy: nn.Module):
        super().__init__()
        self.route = route
        self.__dict__["proxy"] = proxy  # not a submodule: its weights are not this format's
        for i, a in enumerate(arrays.values()):  # counted by weight_bytes
            self.register_buffer(f"array{i}", torch.from_numpy(a), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.route(x.contiguous().numpy()))


def _plan_route(name: str, baseline: bool = False) -> "Builder":
    """A route of the ticket's serving plan; `baseline`: the same runtime running the network
    uncompacted with dense kernels (what a same-runtime speedup is measured against)."""
    def build(model: nn.Module, mask: Mask | None, ctx: BuildContext) -> Served:
        from ticketsmith.serving.plan.build import build_plan
        from ticketsmith.serving.plan.layout import INEXACT, ONNX_INT8, WEIGHTS, read_plan
        from ticketsmith.serving.plan.runtime import load_plan

        if ctx.device.type != "cpu":
            raise FormatUnavailable("the serving plan's runtimes run on CPU")
        attr = "baseline_folder" if baseline else "plan_folder"
        if getattr(ctx, attr) is None:
            examples = {bs: x.cpu().numpy() for bs, x in ctx.example.items()}
            folder = Path(tempfile.mkdtemp(prefix="ticketsmith-plan-")) / "serving"
            setattr(ctx, attr, build_plan(
                model, ctx.meta, folder, examples=examples, threads=ctx.threads,
                timer=None if baseline else ctx.timer, compact_units=not baseline))
        folder = getattr(ctx, attr)
        plan = read_plan(folder)
        if name not in plan["routes"]:
            raise FormatUnavailable(f"the serving plan has no {name} route "
                                    f"({plan['compaction']})")
        runner = load_plan(folder, ctx.threads, route=name)
        if name not in runner.routes:
            raise FormatUnavailable("; ".join(runner.fallbacks))
        from safetensors.numpy import load_file

        arrays = load_file(str(folder / WEIGHTS)) if name == "numpy" else {}
        proxy = copy.deepcopy(model) if baseline else _compacted_or_copy(model)[0]
        if name == "onnxruntime":  # the graph holds the compacted weights
            arrays = {k: v.detach().numpy() for k, v in proxy.state_dict().items()}
        elif name in INEXACT:  # int8 weights and their scales: the graph file's bytes
            import numpy as np

            arrays = {"graph": np.frombuffer(bytearray((folder / ONNX_INT8).read_bytes()),
                                            np.uint8)}
        kernels = {s["name"]: "+".join(sorted(set(s["kernel"].values())) or ["dense"])
                   for s in plan["steps"] if s["op"] == "linear"}
        layers = {n: ("dense+" if baseline else "compacted+") + name
                  + (f":{kernels[n]}" if n in kernels and not baseline else "")
                  for n in _source_names(proxy).values()}
        note = plan["compaction"] + "".join(f"; {m}" for m in runner.fallbacks)
        exact = name not in INEXACT  # int8: gated on its accuracy by the benchmark
        return Served(RouteModule(runner.routes[name], arrays, proxy), layers, exact=exact,
                      tolerance=0.0 if exact else INEXACT_RTOL, note=note)
    return build


def _need_cuda(ctx: BuildContext) -> None:
    if ctx.device.type != "cuda":
        raise FormatUnavailable("needs a CUDA device")


def _half(dtype: torch.dtype, tolerance: float):
    def build(model: nn.Module, mask: Mask | None, ctx: BuildContext) -> Served:
        _need_cuda(ctx)
        layers = {n: str(dtype).removeprefix("torch.") for n in _source_names(model).values()}
        return Served(Cast(copy.deepcopy(model).to(dtype), dtype), layers, exact=False,
                      tolerance=tolerance)
    return build


def is_2_4(weight: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive inputs (the cuSPARSELt pattern)."""
    w = weight.reshape(len(weight), -1)
    return w.shape[1] % 4 == 0 and bool(((w != 0).reshape(len(w), -1, 4).sum(-1) <= 2).all())


def _semi_structured(model: nn.Module, mask: Mask | None, ctx: BuildContext) -> Served:
    _need_cuda(ctx)
    from torch.sparse import to_sparse_semi_structured

    half = copy.deepcopy(model).half()
    layers = {n: "float16" for n in _source_names(model).values()}
    reasons = []
    for name, m in half.named_modules():
        if isinstance(m, nn.Linear) and is_2_4(m.weight):
            if (why := semi_structured_skip(m.weight)) is not None:
                reasons.append(f"{name}: {why}")  # masks.prune_n_m left it unstructured
                continue
            try:
                m.weight = nn.Parameter(to_sparse_semi_structured(m.weight.detach()),
                                        requires_grad=False)
                layers[name] = "2:4"
            except (RuntimeError, ValueError) as exc:
                reasons.append(f"{name}: {str(exc).splitlines()[0]}")
    if "2:4" not in layers.values():
        raise FormatUnavailable("no Linear layer has a 2:4 mask with a shape cuSPARSELt accepts "
                                f"(train with prune.pattern=2:4) {'; '.join(reasons)}".strip())
    return Served(Cast(half, torch.float16), layers, exact=False, tolerance=1e-2,
                  note="; ".join(reasons))


Builder = Callable[[nn.Module, "Mask | None", BuildContext], Served]

FORMATS: dict[str, Builder] = {
    "dense": _dense,
    "csr": _csr,
    "compacted": _compacted,
    "compacted_int8": _compacted_int8,
    "auto": _auto,
    "onnxruntime": _plan_route("onnxruntime"),
    "numpy": _plan_route("numpy"),
    "onnxruntime_int8": _plan_route("onnxruntime_int8"),
    "onnxruntime_dense": _plan_route("onnxruntime", baseline=True),
    "numpy_dense": _plan_route("numpy", baseline=True),
    "fp16": _half(torch.float16, 1e-2),
    "bf16": _half(torch.bfloat16, 5e-2),
    "semi_structured_2:4": _semi_structured,
}


def default_formats(device: torch.device | str) -> list[str]:
    """Every format that can run on `device`, dense first."""
    cuda = torch.device(device).type == "cuda"
    return [f for f in FORMATS if (cuda or f not in CUDA_ONLY) and (not cuda or f not in CPU_ONLY)]


def build_format(name: str, model: nn.Module, mask: Mask | None, ctx: BuildContext) -> Served:
    if name not in FORMATS:
        raise FormatUnavailable(f"unknown serving format {name!r}; choose from {sorted(FORMATS)}")
    with torch.no_grad():
        served = FORMATS[name](model, mask, ctx)
    served.module.eval()
    return served


def _nbytes(t: torch.Tensor) -> int:
    if t.layout == torch.sparse_csr:
        return sum(_nbytes(x) for x in (t.crow_indices(), t.col_indices(), t.values()))
    packed = getattr(t, "packed", None)  # SparseSemiStructuredTensor: values + metadata
    if packed is not None:
        return sum(_nbytes(x) for x in (packed, getattr(t, "meta", None)) if x is not None)
    return t.numel() * t.element_size()


def weight_bytes(module: nn.Module) -> int:
    """Bytes of what a forward pass reads besides activations: weights, biases, indices."""
    total = 0
    for m in module.modules():
        packed = getattr(m, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):  # dynamic int8 Linear
            w, bias = packed._weight_bias()
            total += w.numel() * w.element_size() + 8 + (_nbytes(bias) if bias is not None else 0)
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            total += _nbytes(t)
    return total


def weighted_layers(module: nn.Module) -> list[nn.Module]:
    """Modules that read weights (dense, CSR, int8): the unit of the bytes-moved model."""
    return [m for m in module.modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, CSRLinear))
            or hasattr(getattr(m, "_packed_params", None), "_weight_bias")]
