"""Structured pruning: remove whole units (Linear rows = neurons, Conv filters = channels).

Pure functions from (weights, old mask, per-layer rates) to a new `Mask`, like
`masks.prune_magnitude`; nothing here mutates its inputs or knows about training. The mask stays
a mask over weights, so training, rewinding, tracking, gates and the registry are unchanged.

The prunable weights must form a straight chain in module order (MLP, LeNet5, Conv-2/4/6: what
`compaction.compact` serves): the units of layer k are the inputs of layer k+1. A Conv layer
feeding a Linear one through a flatten gives each channel a block of h*w input columns.
Unit k of a layer is `weight[k]`; removing it zeroes its incoming weights (the row or filter)
and its outgoing ones (its columns, or column block, in the next layer). The last layer (the
output layer) never loses a unit, and the first layer's inputs are never removed.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ticketsmith.base.config import ConfigError
from ticketsmith.engine.masks import (Mask, MaskError, _prune_count, check_fractions, drop_lowest,
                                      drop_lowest_global)

GRANULARITIES = ("weight", "neuron", "channel")
NORMS = ("l1", "l2")


def check_chain(weights: Mapping[str, torch.Tensor]) -> None:
    """Raise MaskError unless each layer's input size is a whole multiple of the previous
    layer's unit count (equal between Linear layers and between Conv layers)."""
    items = list(weights.items())
    for (prev, w), (name, nxt) in zip(items, items[1:]):
        units, inputs = w.shape[0], nxt.shape[1]
        same_kind = (w.dim() > 2) == (nxt.dim() > 2)
        if inputs % units or (same_kind and inputs != units):
            raise MaskError(f"structured pruning needs a straight chain of layers: {name} reads "
                            f"{inputs} inputs, which do not follow {prev}'s {units} units")


def check_structured(model: nn.Module, weights: Mapping[str, torch.Tensor], granularity: str) -> None:
    """ConfigError (one line, naming prune.granularity) unless `granularity` can prune `model`:
    a straight chain of Linear/Conv layers ending in the output layer, no normalisation layer
    (it would give a removed unit a nonzero output), and a layer with units to remove."""
    where = f"prune.granularity: {granularity!r}"
    norms = [n for n, m in model.named_modules()
             if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))]
    if norms:
        raise ConfigError(f"{where} needs a model without normalisation layers "
                          f"({type(model).__name__} has {norms[0]}); use granularity 'weight'")
    try:
        check_chain(weights)
        layers = pruned_layers(weights, granularity)
    except MaskError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not layers:
        raise ConfigError(f"{where}: {type(model).__name__} has no hidden "
                          f"{'Linear ' if granularity == 'neuron' else ''}layer to remove units from")


def pruned_layers(weights: Mapping[str, torch.Tensor], granularity: str) -> list[str]:
    """Layers that lose units: not the last (output) layer; 'neuron' takes Linear layers only,
    'channel' Conv layers and the hidden Linear layers after them."""
    if granularity not in GRANULARITIES[1:]:
        raise MaskError(f"structured granularity must be 'neuron' or 'channel', got {granularity!r}")
    names = list(weights)[:-1]
    return [n for n in names if granularity == "channel" or weights[n].dim() == 2]


def alive_units(keep: torch.Tensor) -> torch.Tensor:
    """Bool per unit: True while it keeps at least one incoming weight."""
    return keep.reshape(len(keep), -1).any(1)


def unit_scores(weight: torch.Tensor, keep: torch.Tensor, norm: str = "l1") -> torch.Tensor:
    """Per unit, the L1 or L2 norm of its kept incoming weights, divided by the fan-in
    (L1: mean |w|; L2: root mean square), so layers of different fan-in compare globally.
    Removed units score +inf, so they are never chosen again."""
    if norm not in NORMS:
        raise MaskError(f"unit norm must be 'l1' or 'l2', got {norm!r}")
    w = torch.where(keep, weight.detach().float(), torch.zeros((), device=weight.device))
    flat = w.reshape(len(w), -1)
    fan_in = flat.shape[1]
    score = flat.abs().sum(1) / fan_in if norm == "l1" else (flat.pow(2).sum(1) / fan_in).sqrt()
    return torch.where(alive_units(keep), score, torch.full_like(score, float("inf"))).cpu()


def remove_units(mask: Mask, drop: Mapping[str, torch.Tensor]) -> Mask:
    """`mask` with the units marked True in `drop[name]` removed: their rows (filters) and their
    outgoing columns (or flatten blocks) in the next layer. Pure."""
    names = list(mask)
    new = {n: mask[n].clone() for n in names}
    for k, name in enumerate(names):
        gone = drop.get(name)
        if gone is None or not gone.any():
            continue
        gone = gone.to(new[name].device)
        new[name][gone] = False
        if k + 1 < len(names):
            nxt = new[names[k + 1]]
            block = nxt.reshape(nxt.shape[0], len(gone), -1)  # (out, unit, kernel or pixels)
            block[:, gone] = False
            new[names[k + 1]] = block.reshape(nxt.shape)
    return Mask(new)


def prune_units(weights: Mapping[str, torch.Tensor], mask: Mask, rates: Mapping[str, float], *,
                granularity: str, norm: str = "l1", scope: str = "layerwise",
                shared_rate: float | None = None) -> Mask:
    """Remove the lowest-scoring `rates[name]` of each layer's remaining units.

    layerwise: each pruned layer loses its own rate of its alive units. global: the layers at
    `shared_rate` (default: the largest rate) compete, losing that share of all their alive
    units together; a layer with another rate of its own is pruned alone at it. Of equal
    scores the lower unit (layers in order) goes first. The output layer keeps every unit.
    """
    mask.check_fits(weights)
    check_chain(weights)
    if scope not in ("layerwise", "global"):
        raise MaskError(f"pruning scope must be 'layerwise' or 'global', got {scope!r}")
    layers = [n for n in pruned_layers(weights, granularity) if rates.get(n, 0.0) > 0]
    check_fractions({n: rates[n] for n in layers})
    scores = {n: unit_scores(weights[n], mask[n], norm) for n in layers}
    alive = {n: alive_units(mask[n]).cpu() for n in layers}
    if scope == "global":
        shared_rate = max((rates[n] for n in layers), default=0.0) if shared_rate is None else shared_rate
        shared = [n for n in layers if rates[n] == shared_rate]
    else:
        shared = []
    drop = {n: drop_lowest(scores[n], alive[n], _prune_count(int(alive[n].sum()), rates[n]))
            for n in layers if n not in shared}
    if shared:
        drop.update(drop_lowest_global({n: scores[n] for n in shared}, alive, shared_rate))
    return remove_units(mask, drop)


def random_units_like(mask: Mask, generator: torch.Generator, granularity: str) -> Mask:
    """A structured mask with the same number of alive units per layer as `mask`, the units
    chosen at random (the random-prune control). Weight counts per layer match too."""
    full = Mask({n: torch.ones_like(t) for n, t in mask.items()})
    drop = {}
    for name in pruned_layers(mask, granularity):
        units, kept = len(mask[name]), int(alive_units(mask[name]).sum())
        chosen = torch.randperm(units, generator=generator)[:kept]
        gone = torch.ones(units, dtype=torch.bool)
        gone[chosen] = False
        drop[name] = gone
    return remove_units(full, drop)
