"""Structured tickets: whole neurons / channels removed, with their outgoing weights; the
schedule per level; the random-prune control; exact compaction into a smaller dense net."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ticketsmith.serving.compaction import as_chain, compact
from ticketsmith.base.config import ConfigError, load_config
from ticketsmith.engine.lottery import check_model, experiment_data, layer_fractions, level_mask
from ticketsmith.engine.masks import Mask, MaskError
from ticketsmith.engine.models import build_model, output_layer, prunable_weights
from ticketsmith.engine.structured import (alive_units, check_chain, prune_units, random_units_like,
                                           unit_scores)

REPO = Path(__file__).resolve().parents[2]
MODELS = {"mlp": ((1, 8, 8), {"hidden": [32, 16]}), "mnist_cnn": ((1, 28, 28), {}),
          "conv2": ((3, 16, 16), {})}


def model_and_weights(name: str, seed: int = 0):
    shape, options = MODELS[name]
    torch.manual_seed(seed)
    model = build_model(name, shape, 4, options=options)
    return model, {n: w.detach() for n, w in prunable_weights(model).items()}


def assert_structural(mask: Mask) -> None:
    """Every removed unit has all incoming and all outgoing weights removed; the output layer
    keeps every unit; first-layer inputs are never removed."""
    names = list(mask)
    for k, name in enumerate(names):
        keep = mask[name]
        rows = keep.reshape(len(keep), -1)
        alive = rows.any(1)
        assert torch.all(rows[alive]) or k > 0, name   # first layer: alive units keep all inputs
        if k + 1 < len(names):
            nxt = mask[names[k + 1]]
            block = nxt.reshape(len(nxt), len(keep), -1)
            assert not block[:, ~alive].any(), f"{names[k + 1]} still reads removed units of {name}"
            # what survives is exactly (alive rows) x (alive inputs)
            live_rows = alive_units(nxt)
            assert torch.equal(block[live_rows], alive.view(1, -1, 1).expand_as(block[live_rows]))
    assert torch.all(mask[names[-1]].reshape(len(mask[names[-1]]), -1).any(1)), "output unit removed"


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("scope", ["layerwise", "global"])
def test_removed_units_lose_incoming_and_outgoing_weights(name, scope):
    model, weights = model_and_weights(name)
    granularity = "neuron" if name == "mlp" else "channel"
    rates = {n: 0.3 for n in weights}
    mask = Mask.ones_like(weights)
    for _ in range(3):
        new = prune_units(weights, mask, rates, granularity=granularity, scope=scope)
        assert new.issubset(mask) and new.density() < mask.density()
        assert_structural(new)
        mask = new
    assert torch.equal(alive_units(mask[output_layer(model)]),
                       torch.ones(len(mask[output_layer(model)]), dtype=torch.bool))


def test_lowest_norm_units_go_first_and_l1_and_l2_can_differ():
    w = {"a.weight": torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.1, 0.1], [2.0, 2.0]]),
         "out.weight": torch.ones(2, 4)}
    mask = Mask.ones_like(w)
    l1 = prune_units(w, mask, {"a.weight": 0.5}, granularity="neuron", norm="l1")
    l2 = prune_units(w, mask, {"a.weight": 0.5}, granularity="neuron", norm="l2")
    assert alive_units(l1["a.weight"]).tolist() == [True, False, False, True]   # L1: 3, 2, .2, 4
    assert alive_units(l2["a.weight"]).tolist() == [True, False, False, True]
    w["a.weight"][0] = torch.tensor([1.9, 0.0])   # L1 1.9 < 2 (unit 1), L2 1.9 > 1.41
    l1 = prune_units(w, mask, {"a.weight": 0.5}, granularity="neuron", norm="l1")
    l2 = prune_units(w, mask, {"a.weight": 0.5}, granularity="neuron", norm="l2")
    assert alive_units(l1["a.weight"]).tolist() == [False, True, False, True]
    assert alive_units(l2["a.weight"]).tolist() == [True, False, False, True]
    assert l1["out.weight"][:, 0].sum() == 0 and l1["out.weight"][:, 1].all()
    assert unit_scores(w["a.weight"], l1["a.weight"])[0] == float("inf")  # removed: never again


def test_neuron_granularity_leaves_conv_layers_whole_and_channel_prunes_them():
    _, weights = model_and_weights("mnist_cnn")
    rates = {n: 0.5 for n in weights}
    neuron = prune_units(weights, Mask.ones_like(weights), rates, granularity="neuron")
    channel = prune_units(weights, Mask.ones_like(weights), rates, granularity="channel")
    assert neuron["conv1.weight"].all() and neuron["conv2.weight"].all()
    assert alive_units(channel["conv1.weight"]).sum() == 3      # 6 filters -> 3
    assert alive_units(channel["conv2.weight"]).sum() == 8      # 16 -> 8
    # conv2 -> fc1 through the flatten: each removed channel loses its 5x5 block of columns
    assert channel["fc1.weight"].sum() == 60 * 8 * 25


def cfg_for(*sets: str):
    return load_config(REPO / "configs/tiny.yaml", ["prune.granularity=neuron", *sets])


@pytest.mark.parametrize("scope", ["layerwise", "global"])
@pytest.mark.parametrize("schedule", ["iterative", "oneshot"])
def test_unit_density_per_level_follows_the_schedule(scope, schedule):
    """Alive units per level: fraction of the remaining units per level, as configured, the
    output layer never pruned; global: the same share of all hidden units together."""
    cfg = cfg_for(f"prune.scope={scope}", f"prune.schedule={schedule}", "prune.fraction=0.2",
                  "model.options={hidden: [100, 50]}", "prune.output_fraction=0.1")
    model = build_model("mlp", (1, 8, 8), 4, options={"hidden": [100, 50]})
    weights = {n: w.detach() for n, w in prunable_weights(model).items()}
    rates = layer_fractions(cfg, weights, output_layer(model))
    mask = Mask.ones_like(weights)
    expected = {"hidden.0.weight": 100, "hidden.1.weight": 50}
    for level in range(1, 6):
        mask = level_mask(cfg, level, weights, mask, weights, rates)
        units = {n: int(alive_units(mask[n]).sum()) for n in expected}
        if scope == "layerwise" and schedule == "iterative":
            expected = {n: u - round(0.2 * u) for n, u in expected.items()}
            assert units == expected
        else:
            total = sum(units.values())
            assert abs(total - 150 * 0.8 ** level) <= 1 + (schedule == "iterative") * level
        assert int(alive_units(mask["out.weight"]).sum()) == 4
        assert_structural(mask)


def test_random_prune_control_keeps_the_unit_and_weight_counts():
    _, weights = model_and_weights("mnist_cnn")
    rates = {n: 0.4 for n in weights}
    mask = prune_units(weights, Mask.ones_like(weights), rates, granularity="channel")
    rand = random_units_like(mask, torch.Generator().manual_seed(3), "channel")
    assert_structural(rand)
    for n in mask:
        assert int(alive_units(rand[n]).sum()) == int(alive_units(mask[n]).sum()), n
        assert int(rand[n].sum()) == int(mask[n].sum()), n
    assert any(not torch.equal(rand[n], mask[n]) for n in mask)
    again = random_units_like(mask, torch.Generator().manual_seed(3), "channel")
    assert all(torch.equal(again[n], rand[n]) for n in mask)


@pytest.mark.parametrize("name", list(MODELS))
def test_structured_ticket_compacts_exactly_into_a_smaller_dense_net(name):
    model, weights = model_and_weights(name, 2)
    granularity = "neuron" if name == "mlp" else "channel"
    mask = prune_units(weights, Mask.ones_like(weights), {n: 0.6 for n in weights},
                       granularity=granularity)
    with torch.no_grad():
        for n, p in prunable_weights(model).items():
            p.mul_(mask[n])
    model.eval()
    small, summary = compact(as_chain(model))
    x = torch.randn(7, *MODELS[name][0])
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
    for n in list(mask)[:-1]:
        if granularity == "channel" or mask[n].dim() == 2:
            before, after = len(mask[n]), int(alive_units(mask[n]).sum())
            assert f"{n.removesuffix('.weight')} {before}->{after}" in summary, summary
    kept = sum(p.numel() for p in small.parameters() if p.dim() > 1)
    assert kept == mask.kept()   # no zero is left in the compacted weights: all removed


def test_models_that_cannot_be_pruned_by_unit_are_one_line_config_errors():
    cfg = load_config(REPO / "configs/cifar10_resnet20.yaml",
                      ["prune.granularity=channel", "data.name=synthetic",
                       "data.options={n_train: 64, n_test: 32, image_size: 8, channels: 3}",
                       "data.val_size=16"])
    with pytest.raises(ConfigError, match=r"^prune.granularity: 'channel' needs a model without "
                                          r"normalisation layers \(ResNet20 has bn\)"):
        check_model(cfg, experiment_data(cfg, "cpu"))
    with pytest.raises(ConfigError, match="granularity 'neuron' cannot take pattern '2:4'"):
        cfg_for("prune.pattern=2:4")
    with pytest.raises(MaskError, match="straight chain"):
        check_chain({"a.weight": torch.ones(4, 3), "b.weight": torch.ones(2, 5)})


def test_unstructured_hashes_are_unchanged_and_granularity_names_a_new_experiment():
    base = load_config(REPO / "configs/tiny.yaml")
    explicit = load_config(REPO / "configs/tiny.yaml",
                           ["prune.granularity=weight", "prune.unit_norm=l1"])
    assert base.hash() == explicit.hash() == "6a0a57f09016"
    assert load_config(REPO / "configs/imp_mnist.yaml").hash() == "14f264a00c70"
    neuron = cfg_for()
    assert neuron.hash() != base.hash() != cfg_for("prune.unit_norm=l2").hash() != neuron.hash()


# Image configs; the language-model ones (heads, MLP units) are checked in test_lm_serving_configs.
STRUCTURED = [p for p in sorted((REPO / "configs").glob("*.yaml"))
              if "granularity:" in p.read_text() and "base:" not in p.read_text()
              and load_config(p).task == "image_classification"]


@pytest.mark.parametrize("path", STRUCTURED, ids=[p.stem for p in STRUCTURED])
def test_every_shipped_structured_config_can_prune_its_model_by_unit(path):
    from ticketsmith.engine.structured import check_structured

    cfg = load_config(path)
    shape = (3, 32, 32) if cfg.data.name == "cifar10" else (1, 28, 28)
    model = build_model(cfg.model.name, shape, 10, options=cfg.model.options)
    weights = prunable_weights(model)
    check_structured(model, weights, cfg.prune.granularity)
    mask = level_mask(cfg, 1, weights, Mask.ones_like(weights), weights,
                      layer_fractions(cfg, weights, output_layer(model)))
    assert_structural(mask)
    assert mask.density() < 1


def test_structured_configs_are_shipped():
    assert {"imp_mnist_structured", "mnist_cnn_channel", "cifar10_conv2_channel",
            "cifar10_conv4_channel", "cifar10_conv6_channel"} <= {p.stem for p in STRUCTURED}


# --- a tiny structured experiment end to end: tracking, benchmark, gates, registry, report ---

@pytest.mark.slow
def test_tiny_structured_experiment_end_to_end(tmp_path, monkeypatch, brief_benchmark):
    import json

    import mlflow
    from mlflow import MlflowClient

    from ticketsmith.pipeline import run_prune
    from ticketsmith.tracking.registry import model_name_for
    from ticketsmith.report.build import build_report

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    common = [f"experiment.output_dir={tmp_path / 'runs'}", "experiment.benchmark=true",
              "prune.levels=2"]
    try:
        weight = load_config(REPO / "configs/tiny.yaml", [*common, "experiment.variants=[ticket]"])
        run_prune(weight, client=client, progress=False, echo=lambda s: None)
        cfg = load_config(REPO / "configs/tiny.yaml", [
            *common, "prune.granularity=neuron",
            "experiment.variants=[ticket, random_reinit, random_prune]"])
        result = run_prune(cfg, client=client, progress=False, echo=lambda s: None)
        md = build_report(client, cfg.hash(), tmp_path / "reports")
    finally:
        mlflow.set_tracking_uri(None)
    from ticketsmith.engine.checkpoint import load_checkpoint
    from ticketsmith.engine.store import RunStore

    store = RunStore(result.experiment.run_root)
    for level, units in ((1, 16), (2, 8)):   # 32 hidden neurons, half of them per level
        masks = {v: load_checkpoint(store.checkpoint_path(0, level, v), "cpu").mask
                 for v in ("ticket", "random_reinit", "random_prune")}
        for v, m in masks.items():
            assert_structural(m)
            assert int(alive_units(m["hidden.0.weight"]).sum()) == units, (v, level)
        assert all(torch.equal(masks["random_reinit"][n], masks["ticket"][n]) for n in masks["ticket"])
    # Gates and registry: every ticket candidate is a version tagged with its gate result.
    name = model_name_for(cfg.experiment.name, cfg.hash())
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 2 and all(v.tags["quality_gate"] in ("passed", "rejected")
                                      for v in versions)
    assert result.verdicts and all(v.level in (1, 2) for v in result.verdicts)
    # The benchmark picks the compacted (smaller dense) network with no special case.
    bench = json.loads((store.run_dir(0, 2, "ticket") / "benchmark.json").read_text())
    compacted = [r for r in bench["results"] if r["format"] == "compacted"]
    assert compacted and all(r["correct"] for r in compacted)
    text = md.read_text()
    assert "ticket vs random re-init, neuron tickets" in text.lower() or \
        "Ticket vs random re-init, neuron tickets" in text
    assert "Liu et al. 2019" in text
    rows = [line for line in text.splitlines() if line.startswith("| ticket |")]
    assert rows and all(line.rstrip(" |").endswith("neuron") for line in rows)
    # Both granularities of the same model and data: the frontier, side by side.
    assert "## Which kind of ticket to ship?" in text
    assert (md.parent / "figures/accuracy_vs_speedup.png").stat().st_size > 10_000
    section = text.split("## Which kind of ticket to ship?", 1)[1].split("\n## ", 1)[0]
    assert "| neuron | this experiment |" in section and f"| weight | tiny ({weight.hash()}) |" in section
