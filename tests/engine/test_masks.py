"""Mask value type and pruning: the invariants that make IMP results real (DESIGN §2).

Pure functions on random weights: new mask ⊆ old, density (1-p)^k, every pruned |w| <= every
kept |w| in scope, inputs never mutated, biases never touched.
"""
from __future__ import annotations

import pytest
import torch

from ticketsmith.engine.masks import (Mask, MaskError, apply_mask_, drop_lowest, drop_lowest_global,
                                      fraction_after, prune_magnitude, prune_n_m, prune_to_density,
                                      random_mask_like)
from ticketsmith.engine.models import build_model, prunable_weights

SHAPES = {"fc1.weight": (40, 64), "fc2.weight": (24, 40), "conv.weight": (8, 4, 3, 3)}


def weights(seed: int, scale: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * (scale or {}).get(n, 1.0) for n, s in SHAPES.items()}


def clone(d):
    return {n: t.clone() for n, t in d.items()}


def newly_pruned_vs_kept(w: dict, old: Mask, new: Mask, names) -> tuple[float, float]:
    """(largest |w| pruned by this step, smallest |w| kept) over the layers `names`."""
    pruned = torch.cat([w[n].abs()[old[n] & ~new[n]] for n in names])
    kept = torch.cat([w[n].abs()[new[n]] for n in names])
    return float(pruned.max()), float(kept.min())


@pytest.mark.parametrize("seed,p", [(0, 0.2), (1, 0.5), (2, 0.35)])
def test_layerwise_levels_follow_the_schedule(seed, p):
    mask = Mask.ones_like(weights(0))
    fractions = {"fc1.weight": p, "fc2.weight": p, "conv.weight": p / 2}
    expected = {n: t.numel() for n, t in mask.items()}  # the integer recurrence
    for k in range(1, 7):
        w = weights(seed * 100 + k)  # weights change between levels, as training changes them
        new = prune_magnitude(w, mask, fractions, "layerwise")
        assert new.issubset(mask)
        for n, f in fractions.items():
            expected[n] -= round(f * expected[n])
            kept = int(new[n].sum())
            assert kept == expected[n]
            # (1-p)^k of the layer, within rounding of one weight per level
            assert abs(kept - new[n].numel() * (1 - f) ** k) <= k
            hi, lo = newly_pruned_vs_kept(w, mask, new, [n])
            assert hi <= lo, f"{n}: pruned |w| {hi} > kept |w| {lo} at level {k}"
        mask = new


def test_global_pruning_ranks_all_layers_together():
    # fc2's weights are 10x larger: globally it keeps far more than the other layers.
    w = weights(3, scale={"fc2.weight": 10.0})
    mask = Mask.ones_like(w)
    fractions = {"fc1.weight": 0.4, "fc2.weight": 0.4, "conv.weight": 0.4}
    total = mask.size()
    for k in range(1, 5):
        new = prune_magnitude(w, mask, fractions, "global")
        assert new.issubset(mask)
        assert abs(new.kept() - total * 0.6 ** k) <= k
        hi, lo = newly_pruned_vs_kept(w, mask, new, list(SHAPES))
        assert hi <= lo
        mask = new
    density = mask.layer_density()
    # 13% of all weights remain, nearly all of them in fc2 (25% of the weights): not layer-wise.
    assert density["fc2.weight"] > 0.45 and density["fc1.weight"] < 0.05


def test_global_pruning_exempts_layers_at_rate_zero_and_rejects_mixed_rates():
    w = weights(4)
    mask = Mask.ones_like(w)
    new = prune_magnitude(w, mask, {"fc1.weight": 0.5, "fc2.weight": 0.5, "conv.weight": 0.0},
                          "global")
    assert bool(new["conv.weight"].all())
    assert new.kept() == mask.size() - round(0.5 * (40 * 64 + 24 * 40))
    with pytest.raises(MaskError, match="one fraction"):
        prune_magnitude(w, mask, {"fc1.weight": 0.5, "fc2.weight": 0.2}, "global")


def test_pruning_never_mutates_its_inputs():
    w = weights(5)
    old = prune_magnitude(w, Mask.ones_like(w), {n: 0.3 for n in w})
    w_before, m_before = clone(w), clone(old.tensors)
    fractions = {n: 0.5 for n in w}
    outs = [prune_magnitude(w, old, fractions, "layerwise"),
            prune_magnitude(w, old, fractions, "global"),
            prune_to_density(w, {n: 0.3 for n in w}),
            prune_n_m(w, old),
            random_mask_like(old, torch.Generator().manual_seed(0))]
    for n in w:
        assert torch.equal(w[n], w_before[n])
        assert torch.equal(old[n], m_before[n])
    for out in outs:  # results do not share storage with the old mask
        for n in w:
            assert out[n].data_ptr() != old[n].data_ptr()


def test_masking_a_model_leaves_biases_and_norm_layers_alone():
    torch.manual_seed(0)
    model = build_model("resnet20", (3, 8, 8), 10)
    prunable = prunable_weights(model)
    assert all(n.endswith(".weight") for n in prunable)
    assert not any("bn" in n for n in prunable)  # BatchNorm weights are not prunable
    assert "out.weight" in prunable and "conv.weight" in prunable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = prune_to_density(prunable, {n: 0.25 for n in prunable})
    apply_mask_(prunable, mask)
    for name, p in model.named_parameters():
        if name in prunable:
            assert torch.equal(p[~mask[name]], torch.zeros_like(p[~mask[name]]))
            assert torch.equal(p[mask[name]], before[name][mask[name]])
        else:  # biases, BatchNorm scale and shift
            assert torch.equal(p, before[name]), name


def test_mask_rejects_values_other_than_zero_and_one():
    with pytest.raises(MaskError, match="0 or 1"):
        Mask({"w": torch.tensor([0.0, 0.5, 1.0])})
    with pytest.raises(MaskError, match="0 or 1"):
        Mask({"w": torch.tensor([0, 2])})
    with pytest.raises(MaskError, match="0 or 1"):
        Mask({"w": torch.tensor([float("nan"), 1.0])})
    m = Mask({"w": torch.tensor([0.0, 1.0, 1.0])})
    assert m["w"].dtype == torch.bool and m.kept() == 2 and m.density() == pytest.approx(2 / 3)


def test_mask_rejects_shapes_and_keys_that_do_not_fit():
    w = weights(6)
    good = Mask.ones_like(w)
    good.check_fits(w)
    wrong_shape = Mask({**good.tensors, "fc1.weight": torch.ones(64, 40, dtype=torch.bool)})
    with pytest.raises(MaskError, match="shape"):
        wrong_shape.check_fits(w)
    missing = Mask({n: t for n, t in good.items() if n != "conv.weight"})
    with pytest.raises(MaskError, match="missing \\['conv.weight'\\]"):
        missing.check_fits(w)
    extra = Mask({**good.tensors, "fc3.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(MaskError, match="unexpected \\['fc3.weight'\\]"):
        extra.check_fits(w)
    with pytest.raises(MaskError):
        prune_magnitude(w, missing, {n: 0.2 for n in w})
    with pytest.raises(MaskError, match="scope"):
        prune_magnitude(w, good, {n: 0.2 for n in w}, "per-neuron")
    with pytest.raises(MaskError, match="fraction"):
        prune_magnitude(w, good, {"fc1.weight": 1.0})


def test_random_mask_keeps_per_layer_counts_and_is_seeded():
    w = weights(7)
    mask = prune_magnitude(w, Mask.ones_like(w), {n: 0.7 for n in w})
    a = random_mask_like(mask, torch.Generator().manual_seed(11))
    b = random_mask_like(mask, torch.Generator().manual_seed(11))
    c = random_mask_like(mask, torch.Generator().manual_seed(12))
    for n in mask:
        assert int(a[n].sum()) == int(mask[n].sum())
        assert torch.equal(a[n], b[n])
        assert not torch.equal(a[n], c[n])
        assert not torch.equal(a[n], mask[n])


def test_two_four_pattern_keeps_at_most_two_of_every_four():
    w = weights(8)
    old = prune_magnitude(w, Mask.ones_like(w), {n: 0.3 for n in w})
    for start in (Mask.ones_like(w), old):
        nm = prune_n_m(w, start, 2, 4)
        assert nm.issubset(start)
        for n, t in w.items():
            groups = nm[n].reshape(t.shape[0], -1, 4)
            assert int(groups.sum(-1).max()) <= 2
            if start is not old:  # from dense: exactly the two largest |w| of each group
                assert bool((groups.sum(-1) == 2).all())
                mags = t.abs().reshape(t.shape[0], -1, 4)
                kept_min = mags.masked_fill(~groups, float("inf")).min(-1).values
                dropped_max = mags.masked_fill(groups, -1.0).max(-1).values
                assert bool((dropped_max <= kept_min).all())


def test_one_shot_prune_hits_the_target_density():
    w = weights(9)
    targets = {"fc1.weight": 0.1, "fc2.weight": 0.37, "conv.weight": 0.5}
    mask = prune_to_density(w, targets)
    for n, d in targets.items():
        assert abs(int(mask[n].sum()) - d * w[n].numel()) <= 1
        hi, lo = newly_pruned_vs_kept(w, Mask.ones_like(w), mask, [n])
        assert hi <= lo
    g = prune_to_density(w, {n: 0.2 for n in w}, scope="global")
    assert abs(g.kept() - 0.2 * g.size()) <= 1


def test_mask_state_round_trip():
    w = weights(10)
    mask = prune_magnitude(w, Mask.ones_like(w), {n: 0.5 for n in w})
    back = Mask.from_state(mask.state())
    assert set(back) == set(mask) and all(torch.equal(back[n], mask[n]) for n in mask)


def test_units_are_dropped_lowest_first_ties_to_the_lower_and_every_group_keeps_one():
    """The one unit choice that structured layers and transformer heads share."""
    inf = float("inf")
    scores = {"a": torch.tensor([0.1, 0.5, inf, 0.5]), "b": torch.tensor([0.2, 0.05])}
    alive = {n: s != inf for n, s in scores.items()}
    assert drop_lowest(scores["a"], alive["a"], 2).tolist() == [True, True, False, False]
    assert drop_lowest(scores["a"], alive["a"], 9).tolist() == [True, True, False, False]
    # 5 alive units at rate 0.8 → 4 to drop, but "b" keeps its best unit and "a" its last
    drop = drop_lowest_global(scores, alive, 0.8)
    assert drop["b"].tolist() == [False, True]
    assert drop["a"].tolist() == [True, True, False, False]  # the tie at 0.5: index 1 first
    assert fraction_after(0.2, 3) == pytest.approx(1 - 0.8 ** 3)
