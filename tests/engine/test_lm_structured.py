"""Structured tickets of transformers: whole attention heads and MLP hidden units are removed
from the mask, and compaction into a smaller GPT gives the masked model's logits."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ticketsmith.base.config import ConfigError, load_config
from ticketsmith.engine.checkpoint import load_checkpoint
from ticketsmith.engine.lottery import check_model, run_experiment
from ticketsmith.engine.masks import Mask
from ticketsmith.engine.models import build_model, prunable_weights
from ticketsmith.engine.store import RunStore
from ticketsmith.engine.transformer_units import (alive, prune_transformer_units,
                                                  random_transformer_units, transformer_layout)
from ticketsmith.serving.compaction import compact_gpt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_lm import tiny_lm  # noqa: E402


def masked_gpt(granularity: str, rate: float, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("gpt", (12,), 40, options={"layers": 2, "heads": 4, "width": 16}).eval()
    weights = prunable_weights(model)
    layout = transformer_layout(model)
    mask = prune_transformer_units(weights, Mask.ones_like(weights), layout, granularity, rate)
    with torch.no_grad():
        for name, w in weights.items():
            w.mul_(mask[name])
    return model, mask, layout


@pytest.mark.parametrize("granularity, before, after", [("head", 8, 4), ("neuron", 128, 64)])
def test_compaction_removes_the_units_and_keeps_the_logits(granularity, before, after):
    model, mask, layout = masked_gpt(granularity, 0.5)
    groups = [g for g in layout if g.kind == granularity]
    assert sum(int(alive(g, mask).sum()) for g in groups) == after
    small, summary = compact_gpt(model)
    heads = sum(b.attn.heads for b in small.blocks)
    units = sum(b.mlp.fc.out_features for b in small.blocks)
    assert (heads if granularity == "head" else units) == after, summary
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    x = torch.randint(0, 40, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-5)


def test_head_neuron_removes_heads_and_units_each_at_the_rate():
    model, mask, layout = masked_gpt("head_neuron", 0.5)
    for g in layout:  # 4 heads and 64 MLP units per block, each kind halved on its own
        assert int(alive(g, mask).sum()) == g.units // 2, g.block
    small, summary = compact_gpt(model)
    assert [b.attn.heads for b in small.blocks] == [2, 2], summary
    assert [b.mlp.fc.out_features for b in small.blocks] == [32, 32], summary
    x = torch.randint(0, 40, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-5)
    rand = random_transformer_units(mask, layout, "head_neuron",
                                    torch.Generator().manual_seed(0))
    assert [int(alive(g, rand).sum()) for g in layout] == \
        [int(alive(g, mask).sum()) for g in layout]


def test_pruning_heads_is_pure_nested_and_keeps_a_head_per_block():
    model, mask, layout = masked_gpt("head", 0.5)
    weights = prunable_weights(model)
    again = prune_transformer_units(weights, mask, layout, "head", 0.9)
    assert again.issubset(mask)
    for g in (g for g in layout if g.kind == "head"):
        assert int(alive(g, again).sum()) == 1
    rand = random_transformer_units(mask, layout, "head", torch.Generator().manual_seed(0))
    assert rand.kept() == mask.kept()


def test_a_head_level_runs_through_the_lottery(tmp_path):
    cfg = tiny_lm(tmp_path, "prune.granularity=head", "prune.levels=1", "train.iterations=10",
                  "model.options={layers: 2, heads: 4, width: 32}",
                  "experiment.variants=[ticket, random_reinit, random_prune]")
    result = run_experiment(cfg, progress=False, echo=lambda s: None)
    store = RunStore(result.run_root)
    ticket = load_checkpoint(store.checkpoint_path(0, 1, "ticket"))
    model = build_model("gpt", (32,), 256, options=cfg.model.options)
    for g in (g for g in transformer_layout(model) if g.kind == "head"):
        assert int(alive(g, ticket.mask).sum()) == 2  # half of 4 heads per block (fraction 0.5)
    rand = load_checkpoint(store.checkpoint_path(0, 1, "random_prune"))
    assert rand.mask.kept() == ticket.mask.kept()


@pytest.mark.parametrize("granularity", ["head", "head_neuron"])
def test_head_granularity_needs_a_transformer(tmp_path, granularity):
    cfg = load_config(None, ["data.name=synthetic", "data.val_size=100", "model.name=mlp",
                             "train.iterations=5", f"prune.granularity={granularity}",
                             f"experiment.output_dir={tmp_path}"])
    from ticketsmith.engine.lottery import experiment_data

    with pytest.raises(ConfigError,
                       match=f"prune.granularity: '{granularity}' needs a transformer"):
        check_model(cfg, experiment_data(cfg, "cpu"))
