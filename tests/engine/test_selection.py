"""Training part of an experiment (--levels / --variants) without changing its hash."""
from __future__ import annotations

import pytest

from ticketsmith.cli.experiment import parse_selection
from ticketsmith.base.config import ConfigError, load_config
from ticketsmith.engine.lottery import LotteryError, Selection, run_experiment

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def tiny(tmp_path):
    return load_config(REPO / "configs" / "tiny.yaml", [f"experiment.output_dir={tmp_path / 'runs'}",
                                             "train.iterations=40"])


def run(cfg, selection=Selection()):
    return run_experiment(cfg, progress=False, echo=lambda s: None, selection=selection)


def test_level_ranges_and_variants_split_the_work(tmp_path, repo_root, monkeypatch):
    cfg = tiny(tmp_path)
    first = run(cfg, parse_selection("0:1", None))
    assert sorted(first.trained) == [(0, 0, "dense"), (0, 1, "random_reinit"), (0, 1, "ticket")]
    # only the random control of level 2: level 2's ticket is not needed (nothing after it runs)
    second = run(cfg, parse_selection("2:2", "random_reinit"))
    assert second.trained == [(0, 2, "random_reinit")]
    # level 3 needs level 2's ticket, which is outside this selection and not finished
    with pytest.raises(LotteryError, match="level 2 ticket of replicate 0 is not finished"):
        run(cfg, parse_selection("3:3", None))
    rest = run(cfg)
    assert sorted(rest.trained) == [(0, 2, "ticket"), (0, 3, "random_reinit"), (0, 3, "ticket")]
    assert cfg.hash() == tiny(tmp_path).hash()


def test_a_range_that_skips_unfinished_levels_is_refused(tmp_path, repo_root, monkeypatch):
    with pytest.raises(LotteryError, match="level 0 dense"):
        run(tiny(tmp_path), parse_selection("2:3", None))


@pytest.mark.parametrize("levels,variants,message", [
    ("a:b", None, "--levels 'a:b'"), ("3:1", None, "expected 0 <= A <= B"),
    (None, "ticket,lottery", "--variants: unknown ['lottery']"),
])
def test_bad_selection_is_one_clear_line(levels, variants, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_selection(levels, variants)


def test_global_scope_with_an_output_rate_of_its_own(tmp_path):
    """Hidden layers compete for one global budget; the output layer keeps its own rate."""
    from ticketsmith.engine import checkpoint as ckpt
    from ticketsmith.engine.store import RunStore

    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"experiment.output_dir={tmp_path}", "prune.scope=global", "prune.levels=2",
        "model.options.hidden=[32, 16]", "train.iterations=40", "experiment.variants=[ticket]"])
    result = run(cfg)
    store = RunStore(result.run_root)
    for level in (1, 2):
        mask = ckpt.load_checkpoint(store.checkpoint_path(0, level, "ticket")).mask
        hidden = ["hidden.0.weight", "hidden.1.weight"]
        kept = sum(int(mask[n].sum()) for n in hidden)
        total = sum(mask[n].numel() for n in hidden)
        assert abs(kept - total * 0.5 ** level) <= level  # one shared budget, (1-p)^k
        per_layer = [float(mask[n].float().mean()) for n in hidden]
        assert per_layer[0] != per_layer[1]  # ...spent unevenly: that is what global means
        assert abs(int(mask["out.weight"].sum()) - 16 * 4 * 0.75 ** level) <= level


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_config_error():
    from ticketsmith.engine.train import resolve_device

    with pytest.raises(ConfigError, match="train.device: 'cuda' requested"):
        resolve_device("cuda")


def test_train_command_reproduces_level_0(tmp_path):
    """`ticketsmith train` trains exactly what prune's dense level 0 trains."""
    from ticketsmith.engine.lottery import train_dense

    cfg = tiny(tmp_path)
    res, _, _ = train_dense(cfg, progress=False)
    dense = run(cfg, parse_selection("0:0", None)).records[0]
    assert dense["variant"] == "dense"
    assert res.test_accuracy == dense["test_accuracy"] and res.test_loss == dense["test_loss"]
