"""A 2:4 ticket can be trained and gated on CPU; only its fast serving format needs CUDA."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ticketsmith.engine import checkpoint as ckpt
from ticketsmith.base.config import GateConfig, load_config
from ticketsmith.gates import evaluate_gates
from ticketsmith.engine.lottery import run_experiment
from ticketsmith.serving.formats import is_2_4
from ticketsmith.engine.store import RunStore

REPO = Path(__file__).resolve().parents[2]


def test_2_4_pattern_gives_2_4_tickets_that_are_gated(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"experiment.output_dir={tmp_path}", "prune.pattern='2:4'", "prune.levels=2",
        "train.iterations=60"])
    result = run_experiment(cfg, progress=False, echo=lambda s: None)
    store = RunStore(result.run_root)
    for level in (1, 2):
        ck = ckpt.load_checkpoint(store.checkpoint_path(0, level, "ticket"))
        w = ck.state["hidden.0.weight"]
        groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
        assert int(groups.max()) <= 2, "at most 2 nonzeros in every group of 4 inputs"
        assert is_2_4(w)
        assert ck.mask["hidden.0.weight"].float().mean() <= 0.5
        # the mask held through training: pruned weights are exactly zero
        assert torch.all(w[~ck.mask["hidden.0.weight"]] == 0)
    verdicts = evaluate_gates(result.records, GateConfig())
    assert [v.level for v in verdicts] == [1, 2]
    rec = {(r["level"], r["variant"]): r for r in result.records}
    dense = 100 * rec[(0, "dense")]["test_accuracy"]
    for v in verdicts:  # gated on the 2:4 ticket's own numbers, against the dense baseline
        ticket, random = rec[(v.level, "ticket")], rec[(v.level, "random_reinit")]
        assert v.sparsity == ticket["sparsity"] and v.ticket_accuracy == 100 * ticket["test_accuracy"]
        gates = {g.name: g for g in v.gates}
        drop = gates["accuracy_drop"]
        assert drop.value == pytest.approx(dense - 100 * ticket["test_accuracy"])
        assert drop.passed == (drop.value <= GateConfig().max_accuracy_drop)
        margin = gates["beats_random"]
        assert margin.value == pytest.approx(100 * (ticket["test_accuracy"] - random["test_accuracy"]))
        assert margin.passed == (margin.value > 0)
        assert v.passed == all(g.passed is not False for g in v.gates)
