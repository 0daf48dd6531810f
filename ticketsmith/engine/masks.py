"""Masks and pruning: pure functions from (weights, old mask, fraction) to a new mask.

Nothing here mutates its inputs or knows about training. A `Mask` is a validated value:
0/1 boolean tensors keyed by the prunable parameter names of one model.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from ticketsmith.base.errors import MaskError  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Mask(Mapping[str, torch.Tensor]):
    """Boolean keep-mask per prunable weight (True = kept).

    Stored as bool tensors so "0/1 only" holds by construction; built from any 0/1 tensor.
    """

    tensors: Mapping[str, torch.Tensor]

    def __post_init__(self) -> None:
        clean = {}
        for name, t in self.tensors.items():
            if t.dtype != torch.bool:
                if not torch.all((t == 0) | (t == 1)):
                    raise MaskError(f"mask[{name}]: values must be 0 or 1")
                t = t != 0
            clean[name] = t.detach().clone()
        object.__setattr__(self, "tensors", clean)

    # Mapping protocol
    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @classmethod
    def ones_like(cls, weights: Mapping[str, torch.Tensor]) -> "Mask":
        return cls({n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()})

    def kept(self) -> int:
        return sum(int(t.sum()) for t in self.tensors.values())

    def size(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def density(self) -> float:
        return self.kept() / max(self.size(), 1)

    def sparsity(self) -> float:
        return 1.0 - self.density()

    def layer_density(self) -> dict[str, float]:
        return {n: float(t.float().mean()) for n, t in self.tensors.items()}

    def to(self, device: str | torch.device) -> "Mask":
        return Mask({n: t.to(device) for n, t in self.tensors.items()})

    def check_fits(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Raise MaskError unless keys and shapes match the model's prunable weights."""
        if set(self.tensors) != set(weights):
            missing = sorted(set(weights) - set(self.tensors))
            extra = sorted(set(self.tensors) - set(weights))
            raise MaskError(f"mask does not fit model: missing {missing}, unexpected {extra}")
        for n, w in weights.items():
            if tuple(self.tensors[n].shape) != tuple(w.shape):
                raise MaskError(
                    f"mask[{n}]: shape {tuple(self.tensors[n].shape)} != weight {tuple(w.shape)}"
                )

    def issubset(self, other: "Mask") -> bool:
        return all(not torch.any(self[n] & ~other[n]) for n in self)

    def state(self, prefix: str = "mask.") -> dict[str, torch.Tensor]:
        """Flat tensor dict (uint8) for safetensors."""
        return {prefix + n: t.to(torch.uint8).cpu().contiguous() for n, t in self.tensors.items()}

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], prefix: str = "mask.") -> "Mask":
        return cls({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def _smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` smallest scores; among equal scores the lower index goes first.

    A stable sort gives that order on every device; `topk` leaves the order of ties
    unspecified, and CUDA's differs from the CPU's.
    """
    return torch.sort(scores, stable=True).indices[:k]


def _prune_count(remaining: int, fraction: float) -> int:
    # Round to the nearest whole weight so density follows (1-p)^k as closely as integers allow.
    return int(round(fraction * remaining))


def fraction_after(rate: float, levels: int) -> float:
    """Share of the weights (or units) gone after `levels` levels that each remove `rate` of
    what remains: 1 - (1 - rate)^levels (what one-shot pruning removes at once)."""
    return 1 - (1 - rate) ** levels


def check_fractions(fractions: Mapping[str, float]) -> None:
    """Raise MaskError unless every pruning fraction is in [0, 1)."""
    for name, f in fractions.items():
        if not 0.0 <= f < 1.0:
            raise MaskError(f"prune fraction for {name} must be in [0, 1), got {f}")


def drop_lowest(scores: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
    """Bool per unit: the `k` lowest-scoring alive units, never every alive unit (a layer,
    head group or MLP keeps one). Removed units score +inf; of equal scores the lower goes."""
    k = min(k, int(alive.sum()) - 1)
    drop = torch.zeros(len(scores), dtype=torch.bool)
    if k > 0:
        drop[_smallest(scores, k)] = True
    return drop


def drop_lowest_global(scores: Mapping[str, torch.Tensor], alive: Mapping[str, torch.Tensor],
                       rate: float) -> dict[str, torch.Tensor]:
    """Bool per unit of each key: the lowest-scoring `rate` of all alive units together
    (keys in order, then unit index, breaking ties), each key keeping one unit."""
    names = list(scores)
    flat = torch.cat([scores[n] for n in names])
    owner = [(n, i) for n in names for i in range(len(scores[n]))]
    left = {n: int(alive[n].sum()) for n in names}
    drop = {n: torch.zeros(len(scores[n]), dtype=torch.bool) for n in names}
    k = _prune_count(sum(left.values()), rate)
    for j in torch.sort(flat, stable=True).indices.tolist():
        if k == 0 or flat[j] == float("inf"):
            break
        n, i = owner[j]
        if left[n] > 1:
            drop[n][i] = True
            left[n] -= 1
            k -= 1
    return drop


def prune_magnitude(
    weights: Mapping[str, torch.Tensor],
    mask: Mask,
    fractions: Mapping[str, float],
    scope: str = "layerwise",
) -> Mask:
    """Remove the smallest-|w| `fraction` of the weights that `mask` still keeps.

    layerwise: each layer loses `fractions[name]` of its own remaining weights.
    global: all layers compete; the total removed is fractions' shared value of all remaining
    weights (layers named in `fractions` take part; a fraction of 0 exempts a layer).
    Ties go to position: of equal |w|, the lower flat index (layers in order) is pruned first,
    on CPU and CUDA alike. Pure: inputs are not modified.
    """
    mask.check_fits(weights)
    check_fractions(fractions)
    if scope == "layerwise":
        new = {}
        for name, w in weights.items():
            keep = mask[name].clone()
            k = _prune_count(int(keep.sum()), fractions.get(name, 0.0))
            if k:
                scores = w.detach().abs().flatten().float().clone()
                scores[~keep.flatten()] = float("inf")
                drop = _smallest(scores, k)
                flat = keep.flatten()
                flat[drop] = False
                keep = flat.view_as(keep)
            new[name] = keep
        return Mask(new)
    if scope == "global":
        rates = {f for n, f in fractions.items() if f > 0}
        if len(rates) > 1:
            raise MaskError(f"global pruning takes one fraction for all layers, got {sorted(rates)}")
        rate = rates.pop() if rates else 0.0
        names = [n for n in weights if fractions.get(n, 0.0) > 0]
        scores = torch.cat([
            torch.where(mask[n], weights[n].detach().abs().float(), torch.tensor(float("inf"),
                        device=weights[n].device)).flatten().cpu()
            for n in names
        ]) if names else torch.empty(0)
        remaining = sum(int(mask[n].sum()) for n in names)
        k = _prune_count(remaining, rate)
        drop_flat = torch.zeros_like(scores, dtype=torch.bool)
        if k:
            drop_flat[_smallest(scores, k)] = True
        new, offset = {}, 0
        for name in weights:
            keep = mask[name].clone()
            if name in names:
                n = keep.numel()
                keep = keep & ~drop_flat[offset:offset + n].view_as(keep).to(keep.device)
                offset += n
            new[name] = keep
        return Mask(new)
    raise MaskError(f"pruning scope must be 'layerwise' or 'global', got {scope!r}")


def prune_to_density(
    weights: Mapping[str, torch.Tensor],
    densities: Mapping[str, float],
    scope: str = "layerwise",
) -> Mask:
    """One-shot: keep the largest-|w| weights so each layer (or all, globally) has `densities`."""
    full = Mask.ones_like(weights)
    return prune_magnitude(weights, full, {n: 1.0 - d for n, d in densities.items()}, scope)


def random_mask_like(mask: Mask, generator: torch.Generator) -> Mask:
    """A random mask with exactly the same number of kept weights per layer as `mask`."""
    new = {}
    for name, m in mask.items():
        n, kept = m.numel(), int(m.sum())
        order = torch.randperm(n, generator=generator)
        flat = torch.zeros(n, dtype=torch.bool)
        flat[order[:kept]] = True
        new[name] = flat.view(m.shape).to(m.device)
    return Mask(new)


# cuSPARSELt, the kernel behind torch's fp16/bf16 2:4 tensors, takes a weight only when both
# dimensions are multiples of 16 (SparseSemiStructuredTensorCUSPARSELT's shape constraints in
# torch/sparse/semi_structured.py); the serving format converts Linear layers only.
SEMI_STRUCTURED_MULTIPLE = 16


def semi_structured_skip(weight: torch.Tensor) -> str | None:
    """Why a 2:4 serving kernel cannot run this weight, or None when it can."""
    if weight.dim() != 2:
        return "not a Linear layer (2:4 serving converts Linear layers only)"
    rows, cols = weight.shape
    if rows % SEMI_STRUCTURED_MULTIPLE or cols % SEMI_STRUCTURED_MULTIPLE:
        return (f"shape {rows}x{cols}: cuSPARSELt needs both dimensions to be multiples of "
                f"{SEMI_STRUCTURED_MULTIPLE}")
    return None


def semi_structured_plan(weights: Mapping[str, torch.Tensor]) -> dict[str, str | None]:
    """Per prunable weight: None where the 2:4 pattern applies, else why it is skipped."""
    return {name: semi_structured_skip(w) for name, w in weights.items()}


def describe_plan(plan: Mapping[str, str | None]) -> str:
    """One line: which layers get 2:4 and which are skipped, and why."""
    applied = [n for n, why in plan.items() if why is None]
    skipped = [f"{n} ({why})" for n, why in plan.items() if why is not None]
    return (f"2:4 pattern on {', '.join(applied) or 'no layer'}"
            + (f"; skipped, pruned unstructured: {'; '.join(skipped)}" if skipped else ""))


def prune_n_m(weights: Mapping[str, torch.Tensor], mask: Mask, n: int = 2, m: int = 4,
              layers: Iterable[str] | None = None) -> Mask:
    """Semi-structured N:M: in every group of `m` consecutive inputs keep the `n` largest |w|.

    Applied on top of `mask` (already-pruned weights score lowest) to `layers` (default:
    every layer whose input dimension is a multiple of `m`); other layers keep their old mask.
    Of equal |w| in a group, the lower index is kept.
    """
    mask.check_fits(weights)
    chosen = set(weights if layers is None else layers)
    new = {}
    for name, w in weights.items():
        keep = mask[name]
        flat_in = w.detach().reshape(w.shape[0], -1)
        if flat_in.shape[1] % m or name not in chosen:
            new[name] = keep.clone()
            continue
        scores = torch.where(keep.reshape_as(flat_in), flat_in.abs().float(),
                             torch.full_like(flat_in, -1.0, dtype=torch.float32))
        groups = scores.reshape(flat_in.shape[0], -1, m)
        top = groups.sort(dim=-1, descending=True, stable=True).indices[..., :n]
        nm = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
        new[name] = nm.reshape(w.shape) & keep
    return Mask(new)


def apply_mask_(params: Mapping[str, torch.Tensor], mask: Mask) -> None:
    """Zero pruned weights in place (called after every optimizer step)."""
    with torch.no_grad():
        for name, p in params.items():
            p.mul_(mask[name])
