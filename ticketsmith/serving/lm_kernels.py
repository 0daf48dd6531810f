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

import numpy as np
import torch
from torch import nn

from ticketsmith.engine.transformer import GPT
from ticketsmith.serving.compaction import compact_gpt
from ticketsmith.serving.formats import CSRLinear
from ticketsmith.serving.measure import median

LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


class ScipyCSRLinear(nn.Module):
    """y = x W^T + b with W as a scipy CSR matrix; its arrays are buffers (so they count in
    `formats.weight_bytes`) that the scipy matrix shares without copying. CPU, float32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        import scipy.sparse as sp

        w = sp.csr_matrix(weight.detach().cpu().numpy())
        for name in ("data", "indices", "indptr"):
            self.register_buffer(name, torch.from_numpy(getattr(w, name)))
        self.matrix = sp.csr_matrix((self.data.numpy(), self.indices.numpy(),
                                     self.indptr.numpy()), shape=w.shape, copy=False)
        self.register_buffer("bias", bias.detach().cpu().clone() if bias is not None
                             else torch.zeros(weight.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).numpy()
        # One row: a matrix-vector product; more: (W x^T)^T, the sparse operand first.
        y = self.matrix @ flat[0] if len(flat) == 1 else (self.matrix @ flat.T).T
        out = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)) + self.bias
        return out.reshape(*x.shape[:-1], -1)


def get_linear(block: nn.Module, path: str) -> nn.Linear:
    """A GPT block's Linear at `path` (one of LINEARS, e.g. "mlp.fc")."""
    first, second = path.split(".")
    return getattr(getattr(block, first), second)


def set_linear(block: nn.Module, path: str, new: nn.Module) -> None:
    first, second = path.split(".")
    setattr(getattr(block, first), second, new)


def _time(fn, reps: int = 20) -> float:
    """Median seconds of `fn` over `reps` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times)


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
            block, path = name.split(".", 2)[1], name.split(".", 2)[2]
            layer = get_linear(out.blocks[int(block)], path)
            set_linear(out.blocks[int(block)], path, _candidates(layer)[kernel])
    return out


@torch.inference_mode()
def choose_kernels(model: GPT, rows: int, reps: int = 20, timer=None,
                   why: dict[str, str] | None = None) -> dict[str, str]:
    """Per block Linear, the kernel measured fastest at `rows` input rows (dense where no
    sparse kernel wins). Kernels whose output differs from dense beyond float rounding are
    never timed. `timer` (name -> callable, timed side by side -> seconds per call) replaces
    the default of `reps` calls each; `why` receives the times per layer."""
    chosen: dict[str, str] = {}
    g = torch.Generator().manual_seed(0)
    for i, block in enumerate(model.blocks):
        for path in LINEARS:
            layer = get_linear(block, path)
            x = torch.randn(rows, layer.in_features, generator=g).to(layer.weight.device)
            ref = layer(x)
            calls = {name: (lambda c=cand: c(x)) for name, cand in _candidates(layer).items()
                     if name == "dense" or torch.allclose(cand(x), ref, rtol=1e-4, atol=1e-5)}
            times = timer(calls) if timer else {n: _time(f, reps) for n, f in calls.items()}
            name = f"blocks.{i}.{path}"
            chosen[name] = min(times, key=times.get)
            if why is not None:
                why[name] = ", ".join(f"{k} {t * 1e6:.1f} us" for k, t in times.items())
    return chosen


def sparse_model(model: GPT, rows: int, reps: int = 20) -> tuple[GPT, dict[str, str]]:
    """A copy of `model` whose block Linears each run the kernel measured fastest at `rows`
    input rows (`choose_kernels`), and the choice per layer."""
    chosen = choose_kernels(model, rows, reps)
    return with_kernels(model, chosen), chosen


def compacted_model(model: GPT) -> tuple[GPT, str]:
    """`compact_gpt`: exact, smaller when whole heads or hidden units are zero."""
    return compact_gpt(model)
