"""Structured pruning of transformers: whole attention heads and whole MLP hidden units.

A head h of a block is its rows of the q, k and v projections and its columns of the output
projection; an MLP hidden unit j is row j of the first MLP layer and column j of the second.
Removing a unit zeroes all of these in the mask, so its contribution to the residual stream
is exactly zero and the ticket compacts into a smaller dense transformer
(serving/compaction.py). Biases are not masked: a removed unit's output is multiplied by its
zeroed output columns. Pure functions of (weights, old mask, rate) like `structured.py`.

Hugging Face GPT-2 keeps its projections in `Conv1D` modules with weights stored (in, out):
a layout records, per weight, which axis is the output one.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ticketsmith.engine.masks import Mask, _prune_count, drop_lowest, drop_lowest_global


@dataclass(frozen=True)
class UnitGroup:
    """One block's heads or hidden units: per member weight, the axis and the positions along
    it that belong to each unit (units × positions). The first member is the incoming layer."""
    kind: str                                   # "head" or "neuron"
    block: str                                  # module name of the attention or MLP
    members: tuple[tuple[str, int, torch.Tensor], ...]

    @property
    def units(self) -> int:
        return self.members[0][2].shape[0]


def _axes(module: nn.Module) -> tuple[int, int]:
    """(output axis, input axis) of a Linear (out, in) or a GPT-2 Conv1D (in, out) weight."""
    return (1, 0) if type(module).__name__ == "Conv1D" else (0, 1)


def _blocks_of(units: int, size: int) -> torch.Tensor:
    return torch.arange(units * size).reshape(units, size)


def _attention(name: str, m: nn.Module) -> UnitGroup | None:
    if hasattr(m, "qkv") and hasattr(m, "heads"):            # ticketsmith GPT
        qkv, proj, heads, dim = "qkv", "proj", m.heads, m.head_dim
    elif hasattr(m, "c_attn") and hasattr(m, "num_heads"):   # Hugging Face GPT-2
        qkv, proj, heads, dim = "c_attn", "c_proj", m.num_heads, m.head_dim
    else:
        return None
    rows = _blocks_of(heads, dim)
    qkv_rows = torch.cat([rows + i * heads * dim for i in range(3)], dim=1)  # q | k | v
    out_in, _ = _axes(getattr(m, qkv))
    _, proj_in = _axes(getattr(m, proj))
    return UnitGroup("head", name, ((f"{name}.{qkv}.weight", out_in, qkv_rows),
                                    (f"{name}.{proj}.weight", proj_in, rows)))


def _mlp(name: str, m: nn.Module) -> UnitGroup | None:
    names = ("fc", "proj") if hasattr(m, "fc") else ("c_fc", "c_proj") if hasattr(m, "c_fc") else None
    if names is None or not hasattr(m, names[1]):
        return None
    first, second = (getattr(m, n) for n in names)
    out_axis, _ = _axes(first)
    _, in_axis = _axes(second)
    hidden = first.weight.shape[out_axis]
    return UnitGroup("neuron", name, ((f"{name}.{names[0]}.weight", out_axis, _blocks_of(hidden, 1)),
                                      (f"{name}.{names[1]}.weight", in_axis, _blocks_of(hidden, 1))))


def transformer_layout(model: nn.Module) -> list[UnitGroup]:
    """Every attention's heads and every MLP's hidden units, in module order; [] when the
    model has no transformer blocks."""
    groups = []
    for name, module in model.named_modules():
        group = _attention(name, module) or _mlp(name, module)
        if group is not None:
            groups.append(group)
    return groups


def _take(t: torch.Tensor, axis: int, idx: torch.Tensor) -> torch.Tensor:
    """t's entries at positions idx (units × k) along axis, as (units, k, rest)."""
    moved = t.movedim(axis, 0)
    return moved[idx.flatten()].reshape(*idx.shape, -1)


def alive(group: UnitGroup, mask: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Bool per unit: True while it keeps at least one incoming weight."""
    name, axis, idx = group.members[0]
    return _take(mask[name], axis, idx.to(mask[name].device)).flatten(1).any(1).cpu()


def scores(group: UnitGroup, weights: Mapping[str, torch.Tensor],
           mask: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean |w| of each unit's kept incoming weights; removed units score +inf."""
    name, axis, idx = group.members[0]
    w = torch.where(mask[name], weights[name].detach().float(), 0.0)
    s = _take(w, axis, idx.to(w.device)).flatten(1).abs().mean(1).cpu()
    return torch.where(alive(group, mask), s, torch.full_like(s, float("inf")))


def remove(mask: Mask, group: UnitGroup, drop: torch.Tensor) -> dict[str, torch.Tensor]:
    """The member masks of `group` with units `drop` (bool per unit) zeroed. Pure."""
    out = {}
    for name, axis, idx in group.members:
        m = mask[name].clone()
        gone = idx[drop].flatten().to(m.device)
        m.movedim(axis, 0)[gone] = False
        out[name] = m
    return out


def kinds(granularity: str) -> tuple[str, ...]:
    """The unit kinds a transformer granularity removes: 'head_neuron' is both."""
    return ("head", "neuron") if granularity == "head_neuron" else (granularity,)


def prune_transformer_units(weights: Mapping[str, torch.Tensor], mask: Mask,
                            layout: list[UnitGroup], granularity: str, rate: float,
                            scope: str = "layerwise") -> Mask:
    """Remove the lowest-scoring `rate` of the alive heads (granularity 'head'), MLP hidden
    units ('neuron') or both ('head_neuron', each kind on its own): per block (layerwise) or
    across blocks (global); every block keeps one."""
    for kind in kinds(granularity):
        mask = _prune_kind(weights, mask, [g for g in layout if g.kind == kind], rate, scope)
    return mask


def _prune_kind(weights: Mapping[str, torch.Tensor], mask: Mask, groups: list[UnitGroup],
                rate: float, scope: str) -> Mask:
    """One kind's units: heads and MLP units never compete (their scores are not comparable)."""
    new = {n: mask[n] for n in mask}
    score = {g.block: scores(g, weights, mask) for g in groups}
    live = {g.block: alive(g, mask) for g in groups}
    if scope == "global":
        drops = drop_lowest_global(score, live, rate)
    else:
        drops = {b: drop_lowest(score[b], live[b], _prune_count(int(live[b].sum()), rate))
                 for b in score}
    for g in groups:
        new.update(remove(Mask(new), g, drops[g.block]))
    return Mask(new)


def random_transformer_units(mask: Mask, layout: list[UnitGroup], granularity: str,
                             generator: torch.Generator) -> Mask:
    """The same number of alive units per block as `mask`, chosen at random."""
    new = {n: torch.ones_like(t) for n, t in mask.items()}
    for g in (g for g in layout if g.kind in kinds(granularity)):
        kept = int(alive(g, mask).sum())
        drop = torch.ones(g.units, dtype=torch.bool)
        drop[torch.randperm(g.units, generator=generator)[:kept]] = False
        new.update(remove(Mask(new), g, drop))
    return Mask(new)
