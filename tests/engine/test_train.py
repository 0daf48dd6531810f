"""The training loop, trained for real: masks hold under Adam, runs are reproducible,
weights are saved at the rewind iteration, and the `train` CLI reports a test accuracy."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ticketsmith.base.config import TrainConfig
from ticketsmith.engine.data import load_dataset
from ticketsmith.engine.masks import Mask, apply_mask_, prune_to_density
from ticketsmith.engine.models import build_model, prunable_weights
from ticketsmith.engine.train import evaluate, train

REPO = Path(__file__).resolve().parents[2]
CFG = TrainConfig(optimizer="adam", lr=0.01, batch_size=64, iterations=60, eval_every=20,
                  device="cpu")


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", val_size=200, split_seed=0,
                        options={"n_train": 800, "n_test": 400, "image_size": 8, "num_classes": 4})


def fresh_model(data, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", data.input_shape, data.num_classes, options={"hidden": [32]})


def test_pruned_weights_stay_exactly_zero_under_adam(data):
    model = fresh_model(data)
    weights = prunable_weights(model)
    mask = prune_to_density(weights, {n: 0.3 for n in weights})
    start = {n: w.detach().clone() for n, w in weights.items()}
    res = train(model, data, CFG, seed=1, masked=weights, mask=mask, progress=False)
    assert res.test_accuracy > 0.8  # it really trained (4 classes: chance is 0.25)
    for n, w in weights.items():
        assert torch.count_nonzero(w[~mask[n]]) == 0, f"{n}: pruned weights regrew"
        assert not torch.equal(w[mask[n]], start[n][mask[n]]), f"{n}: kept weights frozen"
    assert Mask({n: w != 0 for n, w in weights.items()}).density() == pytest.approx(mask.density())


def test_without_reapplying_the_mask_adam_regrows_pruned_weights(data):
    """The counterfactual that gives the test above its meaning: zeroing once is not enough."""
    model = fresh_model(data)
    weights = prunable_weights(model)
    mask = prune_to_density(weights, {n: 0.3 for n in weights})
    apply_mask_(weights, mask)  # pruned at the start, then trained without the mask
    train(model, data, CFG, seed=1, progress=False)
    for n, w in weights.items():
        regrown = torch.count_nonzero(w[~mask[n]]).item()
        assert regrown > 0.9 * (~mask[n]).sum().item(), f"{n}: only {regrown} pruned weights moved"


def test_same_seed_same_run_and_the_seed_fixes_the_data_order(data):
    runs = []
    for seed in (3, 3, 4):
        model = fresh_model(data)
        res = train(model, data, CFG, seed=seed, progress=False)
        runs.append((res, {k: v.clone() for k, v in model.state_dict().items()}))
    (a, wa), (b, wb), (c, wc) = runs
    assert a.curve == b.curve and a.test_accuracy == b.test_accuracy
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)  # another data order


def test_state_saved_at_an_iteration_equals_a_run_stopped_there(data):
    """What late rewinding relies on: saved_state at k = the weights after k steps."""
    model = fresh_model(data)
    long = train(model, data, CFG, seed=5, save_state_at=13, progress=False)
    model = fresh_model(data)
    short_cfg = CFG.model_copy(update={"iterations": 13})
    train(model, data, short_cfg, seed=5, progress=False)
    assert all(torch.equal(long.saved_state[k], v) for k, v in model.state_dict().items())
    model = fresh_model(data)
    at_zero = train(model, data, CFG, seed=5, save_state_at=0, progress=False)
    init = fresh_model(data).state_dict()
    assert all(torch.equal(at_zero.saved_state[k], v) for k, v in init.items())


def test_curve_and_early_stopping_iteration(data):
    model = fresh_model(data)
    cfg = CFG.model_copy(update={"iterations": 50})  # 50 is not a multiple of eval_every
    seen = []
    res = train(model, data, cfg, seed=0, on_eval=lambda step, row: seen.append(step),
                progress=False)
    assert [r["iteration"] for r in res.curve] == seen == [20, 40, 50]
    best = min(res.curve, key=lambda r: r["val_loss"])
    assert res.early_stop_iteration == best["iteration"]
    assert res.best_val_accuracy == max(r["val_accuracy"] for r in res.curve)
    loss, acc = evaluate(model, data.test_x, data.test_y, batch_size=7)  # batching is exact
    assert (loss, acc) == pytest.approx((res.test_loss, res.test_accuracy))


def test_epochs_count_whole_passes_over_the_training_split(data):
    cfg = CFG.model_copy(update={"iterations": None, "epochs": 1.5, "batch_size": 100})
    res = train(fresh_model(data), data, cfg, seed=0, progress=False)
    assert res.iterations == 9  # 600 train examples / 100 = 6 steps per epoch


def test_train_cli_prints_a_test_accuracy(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "ticketsmith.train", "--config", str(REPO / "configs/tiny.yaml"), "-q"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    m = re.search(r"test accuracy (\d+\.\d+)%", out.stdout)
    assert m, out.stdout
    assert float(m.group(1)) > 80.0


@pytest.mark.slow
def test_lenet_300_100_learns_real_mnist():
    root = os.environ.get("TICKETSMITH_DATA_ROOT") or REPO / "data"
    mnist = load_dataset("mnist", root=root, val_size=5000, split_seed=0)
    torch.manual_seed(0)
    model = build_model("lenet_300_100", mnist.input_shape, mnist.num_classes)
    cfg = TrainConfig(optimizer="adam", lr=1.2e-3, batch_size=60, iterations=300, eval_every=100,
                      device="cpu")
    res = train(model, mnist, cfg, seed=0, progress=False)
    assert res.test_accuracy > 0.90, res
