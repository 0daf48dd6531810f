"""Bring your own transformer: a tiny Hugging Face GPT-2 built from a config (no download) runs
a level through `model.factory`; its Conv1D projections (weights stored (in, out)) are pruned,
weight by weight and as whole heads, on the right axes; a structured ticket compacts into a
smaller GPT-2 with the masked model's logits."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ticketsmith.engine.checkpoint import load_checkpoint, model_from_checkpoint
from ticketsmith.engine.lottery import run_experiment
from ticketsmith.engine.masks import Mask
from ticketsmith.engine.models import prunable_weights
from ticketsmith.engine.store import RunStore
from ticketsmith.engine.transformer_units import alive, prune_transformer_units, transformer_layout
from ticketsmith.serving.compaction import compact_hf_gpt2

pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples" / "lm"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_gpt2 import gpt2  # noqa: E402
from test_lm import tiny_lm  # noqa: E402

HF = ["model.factory=hf_gpt2:gpt2", "model.options={layers: 2, heads: 2, width: 32}",
      "prune.levels=1", "train.iterations=12", "train.eval_every=6"]


def test_a_tiny_gpt2_runs_a_level_through_model_factory(tmp_path):
    cfg = tiny_lm(tmp_path, *HF)
    result = run_experiment(cfg, progress=False, echo=lambda s: None)
    assert [(r["level"], r["variant"]) for r in result.records] == [
        (0, "dense"), (1, "ticket"), (1, "random_reinit")]
    ticket = load_checkpoint(RunStore(result.run_root).checkpoint_path(0, 1, "ticket"))
    assert sorted(ticket.mask) == sorted(f"transformer.h.{i}.{m}.weight" for i in (0, 1) for m in
                                         ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert ticket.mask.density() == pytest.approx(0.5)
    model, mask, _ = model_from_checkpoint(RunStore(result.run_root).checkpoint_path(0, 1, "ticket"),
                                           allow_factory="hf_gpt2:gpt2")
    w = prunable_weights(model)["transformer.h.0.mlp.c_fc.weight"]
    assert w.shape == (32, 128) and not w[~ticket.mask["transformer.h.0.mlp.c_fc.weight"]].any()
    assert all(r["test_bpb"] > 0 for r in result.records)


def test_a_pruned_gpt2_head_is_its_conv1d_columns_and_contributes_nothing():
    torch.manual_seed(0)
    model = gpt2((16,), 50, layers=1, heads=4, width=16).eval()
    weights = prunable_weights(model)
    layout = transformer_layout(model)
    mask = prune_transformer_units(weights, Mask.ones_like(weights), layout, "head", 0.25)
    head = next(g for g in layout if g.kind == "head")
    gone = int((~alive(head, mask)).nonzero())
    qkv = mask["transformer.h.0.attn.c_attn.weight"]          # (in 16, out 3 x 16)
    removed = torch.zeros(48, dtype=torch.bool)
    for part in range(3):  # the head's q, k and v output columns
        removed[part * 16 + gone * 4:part * 16 + gone * 4 + 4] = True
    assert not qkv[:, removed].any() and qkv[:, ~removed].all()
    assert not mask["transformer.h.0.attn.c_proj.weight"][gone * 4:gone * 4 + 4].any()
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        for name, w in weights.items():
            w.mul_(mask[name])
        before = model(x).logits
        # the removed head's q, k, v weights no longer matter: its output columns are zero
        weights["transformer.h.0.attn.c_attn.weight"][:, gone * 4:gone * 4 + 4] = 5.0
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=1e-6)


def masked_gpt2(seed: int = 0):
    """A tiny GPT-2 with half its heads and half its MLP hidden units removed by the mask."""
    torch.manual_seed(seed)
    model = gpt2((16,), 50, layers=2, heads=4, width=16).eval()
    weights = prunable_weights(model)
    layout = transformer_layout(model)
    mask = prune_transformer_units(weights, Mask.ones_like(weights), layout, "head", 0.5)
    mask = prune_transformer_units(weights, mask, layout, "neuron", 0.5)
    with torch.no_grad():
        for name, w in weights.items():
            w.mul_(mask[name])
            # biases stay unmasked, as in training: a removed unit must not leak them
            module = dict(model.named_modules())[name.rsplit(".", 1)[0]]
            module.bias.normal_()
    return model


def test_a_compacted_gpt2_has_fewer_heads_and_units_and_the_masked_logits():
    model = masked_gpt2()
    small, summary = compact_hf_gpt2(model)
    assert summary == "heads 8 -> 4, MLP hidden units 128 -> 64"
    assert [b.attn.num_heads for b in small.transformer.h] == [2, 2]
    assert small.transformer.h[0].attn.c_attn.weight.shape == (16, 3 * 2 * 4)  # (in, q|k|v)
    assert small.transformer.h[0].mlp.c_fc.weight.shape == (16, 32)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    x = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(small(x).logits, model(x).logits, rtol=0, atol=1e-5)


def test_a_head_level_of_gpt2_through_model_factory_compacts_exactly(tmp_path):
    cfg = tiny_lm(tmp_path, *HF, "prune.granularity=head", "experiment.variants=[ticket]",
                  "train.iterations=6", "train.eval_every=3",
                  "model.options={layers: 2, heads: 4, width: 32}")
    result = run_experiment(cfg, progress=False, echo=lambda s: None)
    path = RunStore(result.run_root).checkpoint_path(0, 1, "ticket")
    model, mask, _ = model_from_checkpoint(path, allow_factory="hf_gpt2:gpt2")
    small, summary = compact_hf_gpt2(model)
    assert summary.startswith("heads 8 -> 4,"), summary  # fraction 0.5 of 4 heads per block
    x = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(small(x).logits, model(x).logits, rtol=0, atol=1e-5)


def test_gpt2s_tied_head_shares_the_pruned_token_embedding():
    torch.manual_seed(0)
    model = gpt2((16,), 50, layers=1, heads=2, width=16)
    assert "transformer.wte.weight" not in prunable_weights(model)  # dense by default
    weights = prunable_weights(model, also=["embeddings"])
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= set(weights)
    assert not any(n.startswith("lm_head") for n in weights)  # one tensor, listed once
    mask = Mask({n: torch.rand(w.shape) > 0.5 if "wte" in n else torch.ones_like(w, dtype=torch.bool)
                 for n, w in weights.items()})
    with torch.no_grad():
        for name, w in weights.items():
            w.mul_(mask[name])
    assert torch.equal(model.lm_head.weight == 0, ~mask["transformer.wte.weight"])
