"""The serving-sized language-model configs load, validate and, on the model they build, prune
to what they promise: no training, masks from the initial weights (unit counts and densities
do not depend on the weights' values)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ticketsmith.base.config import load_config
from ticketsmith.engine.generate import Cache
from ticketsmith.engine.lottery import check_granularity, layer_fractions, level_mask
from ticketsmith.engine.masks import Mask
from ticketsmith.engine.models import build_model, output_layer, prunable_weights
from ticketsmith.engine.transformer_units import transformer_layout
from ticketsmith.serving.compaction import compact_gpt
from ticketsmith.serving.lm_benchmark import bytes_per_decoded_token, macs_per_prefilled_token

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PROMPT, NEW = 128, 128  # the benchmark's default request
# CPU seconds per iteration of the serving-sized GPT (batch 4 x 256 bytes, one thread), its
# evaluations and samples included: a 600-iteration training took about 230 s. Start-up, gates,
# registry (the champion's serving plan) and report come on top: about 2 min in all (the
# 3-level experiments measured 28.9 and 29.4 min of CPU, docs/language-models.md).
SECONDS_PER_ITERATION = 0.38
FIXED_S = 120
BUDGET_S = 30 * 60  # the issue: trained in at most about 30 minutes here


def ticket_at_last_level(name: str):
    """(config, dense GPT, the last level's masked GPT, the final mask)."""
    cfg = load_config(CONFIGS / name)
    torch.manual_seed(cfg.experiment.seed)
    dense = build_model(cfg.model.name, (cfg.train.context,), 256, options=cfg.model.options)
    weights = {n: w.detach() for n, w in prunable_weights(dense).items()}
    check_granularity(cfg, dense, weights)
    rates = layer_fractions(cfg, weights, output_layer(dense, True))
    layout = transformer_layout(dense)
    mask = Mask.ones_like(weights)
    for level in range(1, cfg.prune.levels + 1):
        mask = level_mask(cfg, level, weights, mask, weights, rates, layout)
    ticket = build_model(cfg.model.name, (cfg.train.context,), 256, options=cfg.model.options)
    ticket.load_state_dict(dense.state_dict())
    with torch.no_grad():
        for n, w in prunable_weights(ticket).items():
            w.mul_(mask[n])
    return cfg, dense.eval(), ticket.eval(), mask


@pytest.mark.parametrize("name", ["lm_serving.yaml", "lm_serving_structured.yaml"])
def test_serving_configs_are_serving_sized(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.task == "language_model" and cfg.data.name == "sotu"
    assert cfg.data.tokenizer == "byte" and cfg.train.threads == 1
    assert cfg.model.options["width"] >= 384  # weights dominate a decoded token
    assert cfg.train.context >= PROMPT + NEW  # the benchmark's request fits
    assert cfg.prune.levels <= 3  # few, large levels: the CPU budget


@pytest.mark.parametrize("name", ["lm_serving.yaml", "lm_serving_structured.yaml"])
def test_serving_configs_train_the_random_control_within_the_cpu_budget(name):
    """Every level trains the ticket and its random re-init control (the gate's beats_random
    has a value), and dense + every level's variants fit the 30-minute CPU budget."""
    cfg = load_config(CONFIGS / name)
    assert set(cfg.experiment.variants) == {"ticket", "random_reinit"}
    trainings = 1 + cfg.prune.levels * len(cfg.experiment.variants)
    assert trainings * cfg.train.iterations * SECONDS_PER_ITERATION + FIXED_S <= BUDGET_S
    assert cfg.train.iterations >= 600  # 300 left dense at 3.36 bits per byte


def test_the_unstructured_config_reaches_90_percent_sparsity():
    cfg, _, _, mask = ticket_at_last_level("lm_serving.yaml")
    assert cfg.prune.granularity == "weight"
    assert mask.sparsity() >= 0.90


def test_the_structured_config_compacts_past_the_speedup_targets():
    """Whole heads and MLP units removed, so the compacted ticket's bounds exceed the targets:
    decode at batch 1 over 2x (weights + KV bytes per token), prefill over 1.5x (multiply-adds)."""
    cfg, dense, ticket, _ = ticket_at_last_level("lm_serving_structured.yaml")
    small, _ = compact_gpt(ticket)
    assert all(b.attn.heads < a.attn.heads for a, b in zip(dense.blocks, small.blocks))
    assert all(b.mlp.fc.out_features < a.mlp.fc.out_features
               for a, b in zip(dense.blocks, small.blocks))
    kv = {m: Cache(m, 1, PROMPT + NEW, "cpu", torch.float32).nbytes() for m in (dense, small)}
    decode = bytes_per_decoded_token(dense, kv[dense], 1) / bytes_per_decoded_token(
        small, kv[small], 1)
    prefill = macs_per_prefilled_token(dense, PROMPT) / macs_per_prefilled_token(small, PROMPT)
    assert decode > 2.0 and prefill > 1.5, (decode, prefill)
