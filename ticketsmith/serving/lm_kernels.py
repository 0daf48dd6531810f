"""Serving formats of a GPT ticket for generation, each checked against the masked model.

- `dense`: the masked model as trained (zeros stored), decoded with the KV cache: the baseline;
- `compacted`: a structured ticket as a smaller dense GPT (fewer heads, narrower MLP,
  `serving.compaction.compact_gpt`); an unstructured ticket loses nothing here and stays as is;
- `sparse`: every block's projection and MLP Linear runs the kernel that measured fastest on
  its own weight and row count (rows = batch in decode, batch x prompt in prefill): dense,
  scipy CSR (sparse operand first; at one row a matrix-vector product) or torch CSR.
"""
from __future__ import annotations

import copy
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from ticketsmith.engine.transformer import GPT
from ticketsmith.serving.compaction import compact_gpt
from ticketsmith.serving.formats import CSRLinear
from ticketsmith.serving.measure import median

LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
# kernel name -> call, timed side by side -> kernel name -> seconds per call
KernelTimer = Callable[[dict[str, Callable[[], object]]], dict[str, float]]


try:  # scipy's own CSR matrix-vector loop (private): y += A x into an output we own
    from scipy.sparse._sparsetools import csr_matvec as _csr_matvec
except ImportError:  # moved or renamed in another scipy: the public product, same numbers
    _csr_matvec = None


class ScipyCSRLinear(nn.Module):
    """y = x W^T + b with W as a scipy CSR matrix; its arrays are buffers (so they count in
    `formats.weight_bytes`) that the scipy matrix shares without copying. CPU, float32.

    One row (decode at batch 1) costs 13-15 us less per call than `matrix @ x` plus a
    bias add: a copy of the bias is the output, scipy's `csr_matvec` accumulates W x into it
    (numpy views of torch's memory both ways: no reshape, copy or dtype conversion), and
    torch takes the result without a copy. `fast=False`, or a scipy without `csr_matvec`,
    takes the public product instead (the same numbers: tests/serving/test_lm_kernels.py)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fast: bool = True):
        super().__init__()
        import scipy.sparse as sp

        w = sp.csr_matrix(weight.detach().cpu().numpy())
        for name in ("data", "indices", "indptr"):
            self.register_buffer(name, torch.from_numpy(getattr(w, name)))
        self.matrix = sp.csr_matrix((self.data.numpy(), self.indices.numpy(),
                                     self.indptr.numpy()), shape=w.shape, copy=False)
        self.register_buffer("bias", bias.detach().cpu().clone() if bias is not None
                             else torch.zeros(weight.shape[0]))
        # plain attributes: a buffer's lookup goes through nn.Module.__getattr__ (~1 us)
        self._arrays = (*w.shape, self.matrix.indptr, self.matrix.indices, self.matrix.data)
        self._bias = self.bias.numpy()
        self._fast = fast and _csr_matvec is not None
        self.out_features, self.in_features = w.shape  # as nn.Linear names them

    def forward_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`self(x)`, written into `out` at one row when `out` is contiguous (scipy's loop
        writes there: a decode step's outputs, its KV cache); else a new tensor
        (`engine.decode_step.linear_to`)."""
        n_out, n_in = self._arrays[:2]
        if (self._fast and x.numel() == n_in and x.dtype == torch.float32
                and out.numel() == n_out and out.is_contiguous()):
            y = out.numpy().reshape(-1)
            y[:] = self._bias
            _csr_matvec(*self._arrays, x.numpy().ravel(), y)
            return out
        return self(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_out, n_in = self._arrays[:2]
        if self._fast and x.numel() == n_in and x.dtype == torch.float32:
            y = self._bias.copy()
            _csr_matvec(*self._arrays, x.numpy().ravel(), y)
            return torch.from_numpy(y.reshape(*x.shape[:-1], n_out))
        flat = x.reshape(-1, x.shape[-1]).numpy()
        # One row: a matrix-vector product; more: (W x^T)^T, the sparse operand first.
        y = self.matrix @ flat[0] if len(flat) == 1 else (self.matrix @ flat.T).T
        out = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)) + self.bias
        return out.reshape(*x.shape[:-1], -1)


def get_linear(block: nn.Module, path: str) -> nn.Linear:
    """A GPT block's Linear at `path` (one of LINEARS, e.g. "mlp.fc")."""
    first, second = path.split(".")
    return getattr(getattr(block, first), second)


def site(name: str) -> tuple[int, str]:
    """A block Linear's name ("blocks.1.mlp.fc") as (block index, path in the block)."""
    _, block, path = name.split(".", 2)
    return int(block), path


def set_linear(block: nn.Module, path: str, new: nn.Module) -> None:
    first, second = path.split(".")
    setattr(getattr(block, first), second, new)


def _candidates(layer: nn.Linear) -> dict[str, nn.Module]:
    cands: dict[str, nn.Module] = {"dense": layer}
    if layer.weight.device.type == "cpu" and layer.weight.dtype == torch.float32:
        cands["scipy_csr"] = ScipyCSRLinear(layer.weight, layer.bias)
    cands["torch_csr"] = CSRLinear(layer.weight, layer.bias)
    return cands


def with_kernels(model: GPT, kernels: dict[str, str]) -> GPT:
    """A copy of `model` whose block Linears named in `kernels` ("blocks.0.mlp.fc" ->
    "scipy_csr") run that kernel; the rest stay dense and share `model`'s tensors (a plan
    holds one such model per phase and batch size: one copy of the weights, not four)."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    out = copy.deepcopy(model, shared)
    for name, kernel in kernels.items():
        if kernel != "dense":
            block, path = site(name)
            layer = get_linear(out.blocks[block], path)
            set_linear(out.blocks[block], path, _candidates(layer)[kernel])
    return out


class _Timed(nn.Module):
    """A kernel whose every call adds its CPU seconds (the thread's clock) to `sink`."""

    def __init__(self, inner: nn.Module, sink: list[float]):
        super().__init__()
        self.inner, self.sink = inner, sink

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.thread_time()
        y = self.inner(x)
        self.sink.append(time.thread_time() - t0)
        return y


def _exact_kernels(model: GPT, rows: int) -> dict[str, list[str]]:
    """Per block Linear, the kernels whose output at `rows` random rows is dense's to float
    rounding (dense first)."""
    out: dict[str, list[str]] = {}
    g = torch.Generator().manual_seed(0)
    for i, block in enumerate(model.blocks):
        for path in LINEARS:
            layer = get_linear(block, path)
            x = torch.randn(rows, layer.in_features, generator=g).to(layer.weight.device)
            ref = layer(x)
            out[f"blocks.{i}.{path}"] = [
                name for name, cand in _candidates(layer).items()
                if name == "dense" or torch.allclose(cand(x), ref, rtol=1e-4, atol=1e-5)]
    return out


def in_model_times(model: GPT, rows: int, exact: dict[str, list[str]], trials: int = 5,
                   block_s: float = 0.02) -> dict[str, dict[str, float]]:
    """Layer -> kernel -> median CPU seconds per call, each call timed inside whole forward
    passes of `rows` one-token sequences through a copy of `model` whose every layer runs
    that kernel (where exact): the memory traffic of the other layers between two calls of
    one layer is the model's own, as in a decode step. Timed alone, back to back, a layer's
    weights stay hot in the cache and dense won layers that lose in the model. `trials`
    interleaved rounds of about `block_s` seconds of passes per kernel; CPU time, so the
    time other processes hold the core is left out."""
    kinds = list(dict.fromkeys(k for ks in exact.values() for k in ks))
    sinks: dict[tuple[str, str], list[float]] = {}
    variants = {}
    for kind in kinds:
        variant = with_kernels(model, {n: kind if kind in ks else "dense"
                                       for n, ks in exact.items()})
        for name, ks in exact.items():
            if kind in ks:
                block, path = site(name)
                sinks[name, kind] = []
                set_linear(variant.blocks[block], path, _Timed(
                    get_linear(variant.blocks[block], path), sinks[name, kind]))
        variants[kind] = variant
    ids = torch.randint(model.vocab, (rows, 1), generator=torch.Generator().manual_seed(0),
                        device=model.wte.weight.device)
    t0 = time.perf_counter()
    for variant in variants.values():  # warm-up, and how long one pass takes
        variant(ids)
    passes = max(2, min(64, int(block_s * len(kinds) / (time.perf_counter() - t0))))
    for sink in sinks.values():
        sink.clear()
    for r in range(trials):
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
            for _ in range(passes):
                variants[kind](ids)
    return {n: {k: median(sinks[n, k]) for k in ks} for n, ks in exact.items()}


@torch.inference_mode()
def choose_kernels(model: GPT, rows: int, trials: int = 5, timer: KernelTimer | None = None,
                   why: dict[str, str] | None = None, block_s: float = 0.02) -> dict[str, str]:
    """Per block Linear, the kernel measured fastest at `rows` input rows (dense where no
    sparse kernel wins): `in_model_times` over `trials` rounds. Kernels whose output differs
    from dense beyond float rounding are never timed. `timer` (name -> callable, timed side
    by side -> seconds per call) replaces that measurement with one of each layer alone;
    `why` receives the times per layer."""
    exact = _exact_kernels(model, rows)
    if timer is None:
        times = in_model_times(model, rows, exact, trials, block_s)
    else:
        times = {n: timer(_alone(model, n, ks, rows)) for n, ks in exact.items()}
    if why is not None:
        why.update({n: ", ".join(f"{k} {t * 1e6:.1f} us" for k, t in ts.items())
                    for n, ts in times.items()})
    return {n: min(ts, key=ts.get) for n, ts in times.items()}


def _alone(model: GPT, name: str, kernels: list[str], rows: int) -> dict[str, Callable]:
    """kernel -> a call of layer `name` alone on `rows` random rows (what a `timer` times)."""
    block, path = site(name)
    layer = get_linear(model.blocks[block], path)
    x = torch.randn(rows, layer.in_features).to(layer.weight.device)
    cands = _candidates(layer)
    return {k: (lambda c=cands[k]: c(x)) for k in kernels}


def sparse_model(model: GPT, rows: int, trials: int = 5) -> tuple[GPT, dict[str, str]]:
    """A copy of `model` whose block Linears each run the kernel measured fastest at `rows`
    input rows (`choose_kernels`), and the choice per layer."""
    chosen = choose_kernels(model, rows, trials)
    return with_kernels(model, chosen), chosen


def compacted_model(model: GPT) -> tuple[GPT, str]:
    """`compact_gpt`: exact, smaller when whole heads or hidden units are zero."""
    return compact_gpt(model)
