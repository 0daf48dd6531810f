"""Bring your own model and data: the worked example of docs/bring-your-own.md, run for real
through the documented command, and automatic discovery of prunable layers."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ticketsmith.engine import checkpoint as ckpt
from ticketsmith.base.config import load_config
from ticketsmith.engine.models import ModelError, build_model, output_layer, prunable_weights
from ticketsmith.engine.store import RunStore

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "byo"


def test_documented_byo_command_prunes_all_but_the_excluded_layer(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(EXAMPLE), os.environ.get("PYTHONPATH")])),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    out = subprocess.run(
        [sys.executable, "-m", "ticketsmith.prune", "--config", str(EXAMPLE / "byo.yaml"),
         "--set", f"experiment.output_dir={tmp_path / 'runs'}", "-q"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"r0 level 3\s+density\s+[\d.]+%\s+ticket [\d.]+%\s+random_reinit [\d.]+%",
                     out.stdout), out.stdout

    cfg = load_config(EXAMPLE / "byo.yaml", [f"experiment.output_dir={tmp_path / 'runs'}"])
    store = RunStore(tmp_path / "runs" / cfg.hash())
    init = ckpt.load_checkpoint(store.init_path(0)).state
    last = ckpt.load_checkpoint(store.checkpoint_path(0, 3, "ticket"))
    assert last.meta["factory"] == "my_project:build_model"
    assert last.meta["input_shape"] == [2] and last.meta["num_classes"] == 3
    # Found automatically: every Linear weight except the excluded `embed`; LayerNorm never.
    assert set(last.mask) == {"block.0.weight", "block.2.weight", "head.weight"}
    embed = last.state["embed.weight"]
    assert torch.count_nonzero(embed) == embed.numel()            # stayed dense ...
    assert not torch.equal(embed, init["embed.weight"])           # ... and was trained
    density = last.mask.layer_density()
    assert density["block.0.weight"] == pytest.approx(0.5 ** 3, abs=1 / 4096)
    assert density["head.weight"] == pytest.approx(0.75 ** 3, abs=3 / 192)  # output: half rate
    for name, keep in last.mask.items():
        assert torch.count_nonzero(last.state[name][~keep]) == 0
    accuracy = [r["test_accuracy"] for r in store.records()]
    assert len(accuracy) == 7 and min(accuracy) > 0.8  # 3 classes: chance is 1/3


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4))
                                     for _ in range(2)])
        self.embedding = nn.Embedding(10, 4)
        self.classifier = nn.Linear(4, 2)


def test_prunable_layers_are_found_and_excluded_by_name():
    model = Custom()
    assert list(prunable_weights(model)) == ["stem.weight", "blocks.0.0.weight", "blocks.1.0.weight",
                                             "classifier.weight"]
    assert list(prunable_weights(model, ["blocks"])) == ["stem.weight", "classifier.weight"]
    assert list(prunable_weights(model, ["blocks.1", "stem"])) == ["blocks.0.0.weight",
                                                                  "classifier.weight"]
    assert output_layer(model) == "classifier.weight"
    with pytest.raises(ModelError, match=r"model\.exclude: no module named \['block'\]"):
        prunable_weights(model, ["block"])  # a prefix must end at a module boundary
    with pytest.raises(ModelError, match="no prunable"):
        prunable_weights(model, ["stem", "blocks", "classifier"])


def test_factory_errors_name_the_config_key():
    with pytest.raises(ModelError, match=r"model\.factory: 'my_project\.build_model': expected 'package\.module:function'"):
        build_model("x", (2,), 3, factory="my_project.build_model")
    with pytest.raises(ModelError, match=r"model\.factory: 'no_such_module_xyz:build': cannot import module 'no_such_module_xyz'"):
        build_model("x", (2,), 3, factory="no_such_module_xyz:build")
    with pytest.raises(ModelError, match="has no attribute 'nope'"):
        build_model("x", (2,), 3, factory="torch.nn:nope")
    with pytest.raises(ModelError, match="expected a torch.nn.Module"):
        build_model("x", (2,), 3, factory="builtins:dict")
