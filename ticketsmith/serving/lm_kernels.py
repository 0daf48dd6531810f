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


def _get(block: nn.Module, path: str) -> nn.Linear:
    first, second = path.split(".")
    return getattr(getattr(block, first), second)


def _set(block: nn.Module, path: str, new: nn.Module) -> None:
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


@torch.inference_mode()
def sparse_model(model: GPT, rows: int, reps: int = 20) -> tuple[GPT, dict[str, str]]:
    """A copy of `model` whose block Linears each run the kernel measured fastest at `rows`
    input rows (dense ones where no sparse kernel wins), and the choice per layer. Kernels
    whose output differs from dense beyond float rounding are never chosen."""
    out = copy.deepcopy(model)
    chosen: dict[str, str] = {}
    g = torch.Generator().manual_seed(0)
    for i, block in enumerate(out.blocks):
        for path in LINEARS:
            layer = _get(block, path)
            x = torch.randn(rows, layer.in_features, generator=g).to(layer.weight.device)
            ref = layer(x)
            best, best_t = "dense", _time(lambda: layer(x), reps)
            for name, cand in _candidates(layer).items():
                if name == "dense" or not torch.allclose(cand(x), ref, rtol=1e-4, atol=1e-5):
                    continue
                t = _time(lambda: cand(x), reps)
                if t < best_t:
                    best, best_t = name, t
            chosen[f"blocks.{i}.{path}"] = best
            if best != "dense":
                _set(block, path, _candidates(layer)[best])
    return out, chosen


def compacted_model(model: GPT) -> tuple[GPT, str]:
    """`compact_gpt`: exact, smaller when whole heads or hidden units are zero."""
    return compact_gpt(model)
