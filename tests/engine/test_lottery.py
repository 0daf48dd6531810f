"""IMP end to end on configs/tiny.yaml (generated data, seconds): density schedules, variants,
rewinding, determinism and resume, and the `ticketsmith prune` CLI."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ticketsmith.engine import checkpoint as ckpt
from ticketsmith.engine import tasks
from ticketsmith.base.config import Config, ConfigError, load_config
from ticketsmith.engine.data import load_dataset
from ticketsmith.engine.lottery import derive_seed, run_experiment
from ticketsmith.engine.masks import Mask, prune_to_density, random_mask_like
from ticketsmith.engine.models import ModelError, build_model
from ticketsmith.engine.events import NullTracker
from ticketsmith.engine.store import RunStore
from ticketsmith.engine.train import train

REPO = Path(__file__).resolve().parents[2]
ALL_VARIANTS = "experiment.variants=[ticket, random_reinit, random_prune]"
# tiny.yaml: MLP 64 -> 32 -> 4; 50% of the remaining weights per level, output layer 25%.
SIZES = {"hidden.0.weight": 32 * 64, "out.weight": 4 * 32}
RATES = {"hidden.0.weight": 0.5, "out.weight": 0.25}


def tiny(out: Path, *overrides: str) -> Config:
    return load_config(REPO / "configs" / "tiny.yaml", [f"experiment.output_dir={out}", *overrides])


def run(cfg: Config, tracker=None, lines: list[str] | None = None):
    echo = lines.append if lines is not None else (lambda line: None)
    return run_experiment(cfg, tracker=tracker, progress=False, echo=echo)


def load(result, level: int, variant: str, replicate: int = 0) -> ckpt.Checkpoint:
    return ckpt.load_checkpoint(RunStore(result.run_root).checkpoint_path(replicate, level, variant))


def comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in records]


def expected_kept(levels: int, rates: dict[str, float]) -> list[dict[str, int]]:
    """Kept weights per layer after each level: (1-p)^k, rounded to whole weights each level."""
    kept, out = dict(SIZES), []
    for _ in range(levels):
        kept = {n: k - round(rates[n] * k) for n, k in kept.items()}
        out.append(dict(kept))
    return out


def check_variants(result, level: int, ticket: Mask) -> None:
    """Every variant trained under its mask; random_reinit shares the ticket's mask and
    random_prune has a different mask with the same per-layer counts."""
    reinit, rprune = load(result, level, "random_reinit").mask, load(result, level, "random_prune").mask
    for n in ticket:
        assert torch.equal(reinit[n], ticket[n])
        assert int(rprune[n].sum()) == int(ticket[n].sum())
        assert not torch.equal(rprune[n], ticket[n])
    for variant in ("ticket", "random_reinit", "random_prune"):
        c = load(result, level, variant)
        for n in c.mask:
            assert torch.count_nonzero(c.state[n][~c.mask[n]]) == 0, (level, variant, n)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted tiny run (default variants), to compare reruns and resumes against."""
    return run(tiny(tmp_path_factory.mktemp("reference")))


def test_iterative_imp_follows_the_schedule_with_every_variant(tmp_path):
    lines: list[str] = []
    result = run(tiny(tmp_path, ALL_VARIANTS), lines=lines)
    variants = ["ticket", "random_reinit", "random_prune"]
    expected_runs = [(0, 0, "dense")] + [(0, k, v) for k in (1, 2, 3) for v in variants]
    assert result.trained == expected_runs
    assert [(r["replicate"], r["level"], r["variant"]) for r in result.records] == expected_runs
    assert all(r["test_accuracy"] > 0.5 for r in result.records)  # chance is 0.25
    prev = Mask.ones_like(load(result, 0, "dense").mask)
    for level, kept in enumerate(expected_kept(3, RATES), start=1):
        ticket = load(result, level, "ticket").mask
        assert {n: int(t.sum()) for n, t in ticket.items()} == kept
        assert ticket.issubset(prev)
        check_variants(result, level, ticket)
        record = next(r for r in result.records if (r["level"], r["variant"]) == (level, "ticket"))
        assert record["density"] == pytest.approx(sum(kept.values()) / sum(SIZES.values()))
        assert f"level {level}  density {record['density']:7.2%}" in lines[level + 1]
        prev = ticket
    assert "level 0  density 100.00%  dense" in lines[1]


def test_one_shot_prunes_the_dense_weights_straight_to_each_density(tmp_path):
    result = run(tiny(tmp_path, ALL_VARIANTS, "prune.schedule=oneshot"))
    dense = load(result, 0, "dense").state
    dense_w = {n: dense[n] for n in SIZES}
    for level in (1, 2, 3):
        ticket = load(result, level, "ticket").mask
        want = prune_to_density(dense_w, {n: (1 - r) ** level for n, r in RATES.items()})
        assert all(torch.equal(ticket[n], want[n]) for n in SIZES)
        for n, size in SIZES.items():
            assert abs(int(ticket[n].sum()) - size * (1 - RATES[n]) ** level) <= 1
        check_variants(result, level, ticket)


def test_global_scope_ranks_all_layers_together(tmp_path):
    # without an output rate of its own, the output layer competes with the others too
    result = run(tiny(tmp_path, ALL_VARIANTS, "prune.scope=global", "prune.output_fraction=null"))
    total = sum(SIZES.values())
    prev_mask, prev_state = Mask.ones_like(load(result, 0, "dense").mask), load(result, 0, "dense").state
    kept = total
    for level in (1, 2, 3):
        c = load(result, level, "ticket")
        kept -= round(0.5 * kept)  # one rate for all layers, output included
        assert c.mask.kept() == kept
        assert c.mask.issubset(prev_mask)
        pruned = torch.cat([prev_state[n].abs()[prev_mask[n] & ~c.mask[n]] for n in SIZES])
        survivors = torch.cat([prev_state[n].abs()[c.mask[n]] for n in SIZES])
        assert pruned.max() <= survivors.min()
        check_variants(result, level, c.mask)
        prev_mask, prev_state = c.mask, c.state
    assert len(set(prev_mask.layer_density().values())) == 2  # layers end at different densities


def spy_on_starts(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Record the weights each trained run starts from (after its mask is applied)."""
    starts = []

    def spy(*args, save_state_at=None, **kwargs):
        res = train(*args, save_state_at=0 if save_state_at is None else save_state_at, **kwargs)
        starts.append(res.saved_state)
        return res

    image = tasks.TASKS["image_classification"]
    monkeypatch.setitem(tasks.TASKS, "image_classification", dataclasses.replace(image, train=spy))
    return starts


def test_variants_start_from_init_times_mask_and_a_seeded_reinit(tmp_path, monkeypatch):
    starts = spy_on_starts(monkeypatch)
    cfg = tiny(tmp_path, ALL_VARIANTS, "prune.levels=2")
    result = run(cfg)
    store = RunStore(result.run_root)
    init = ckpt.load_checkpoint(store.init_path(0)).state
    data = load_dataset("synthetic", val_size=cfg.data.val_size, options=cfg.data.options)
    start = dict(zip(result.trained, starts))
    for level in (1, 2):
        mask = load(result, level, "ticket").mask
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.experiment.seed, 0, level, "random_reinit"))
            reinit = build_model("mlp", data.input_shape, data.num_classes,
                                 options=cfg.model.options).state_dict()
        gen = torch.Generator().manual_seed(derive_seed(cfg.experiment.seed, 0, level, "random_prune"))
        rmask = random_mask_like(mask, gen)
        expected = {"ticket": (init, mask), "random_reinit": (reinit, mask),
                    "random_prune": (init, rmask)}
        for variant, (weights, m) in expected.items():
            got = start[(0, level, variant)]
            stored = load(result, level, variant).mask
            assert all(torch.equal(stored[n], m[n]) for n in m), (level, variant)
            for k, v in weights.items():
                want = v * m[k] if k in m else v
                assert torch.equal(got[k], want), (level, variant, k)
        # the re-initialisation is new weights, not the original init
        assert not torch.equal(reinit["hidden.0.weight"], init["hidden.0.weight"])


def test_late_rewinding_starts_tickets_from_the_dense_run_at_that_iteration(tmp_path, monkeypatch):
    starts = spy_on_starts(monkeypatch)
    cfg = tiny(tmp_path, "prune.rewind_iteration=10", "prune.levels=1", "experiment.variants=[ticket]")
    result = run(cfg)
    store = RunStore(result.run_root)
    init = ckpt.load_checkpoint(store.init_path(0)).state
    rewind = ckpt.load_checkpoint(store.rewind_path(0)).state
    # Recompute: 10 dense steps from the stored init, with the experiment's data order.
    data = load_dataset("synthetic", val_size=cfg.data.val_size, options=cfg.data.options)
    model = build_model("mlp", data.input_shape, data.num_classes, options=cfg.model.options)
    model.load_state_dict(init)
    train(model, data, cfg.train.model_copy(update={"iterations": 10}),
          seed=derive_seed(cfg.experiment.seed, 0, "data-order"), progress=False)
    assert all(torch.equal(rewind[k], v) for k, v in model.state_dict().items())
    mask = load(result, 1, "ticket").mask
    got = dict(zip(result.trained, starts))[(0, 1, "ticket")]
    for k, v in rewind.items():
        assert torch.equal(got[k], v * mask[k] if k in mask else v)
    assert not torch.equal(got["hidden.0.weight"], init["hidden.0.weight"] * mask["hidden.0.weight"])


def test_same_config_and_seed_give_identical_masks_and_metrics(tmp_path, reference):
    again = run(tiny(tmp_path))
    assert again.exp_hash == reference.exp_hash and again.run_root != reference.run_root
    assert comparable(again.records) == comparable(reference.records)
    for _, level, variant in reference.trained:
        a, b = load(reference, level, variant), load(again, level, variant)
        assert all(torch.equal(a.mask[n], b.mask[n]) for n in a.mask)
        assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)


class InterruptAt(NullTracker):
    """Raises KeyboardInterrupt (as Ctrl-C or a kill would) at a chosen point."""

    def __init__(self, level: int, variant: str, evals_before: int | None):
        self.target, self.evals_before, self.current = (level, variant), evals_before, None
        self.evals = 0

    def run_started(self, replicate: int, level: int, variant: str) -> None:
        self.current = (level, variant)
        if self.current == self.target and self.evals_before is None:
            raise KeyboardInterrupt  # before the level starts: the previous level is complete

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.current == self.target:
            self.evals += 1
            if self.evals > self.evals_before:
                raise KeyboardInterrupt  # mid-level: some iterations of this run are done


@pytest.mark.parametrize("variant,evals_before", [("ticket", None), ("ticket", 2),
                                                  ("random_reinit", 3)],
                         ids=["after-level-1", "mid-level-2-ticket", "mid-level-2-random-reinit"])
def test_interrupted_experiment_resumes_exactly_what_is_unfinished(tmp_path, reference, variant,
                                                                   evals_before):
    cfg = tiny(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tracker=InterruptAt(2, variant, evals_before))
    store = RunStore(tmp_path / cfg.hash())
    assert store.is_done(0, 1, "random_reinit") and not store.is_done(0, 2, variant)
    resumed = run(cfg)
    unfinished = reference.trained[reference.trained.index((0, 2, variant)):]
    assert resumed.trained == unfinished
    assert comparable(resumed.records) == comparable(reference.records)
    assert run(cfg).trained == []  # a finished experiment trains nothing


def test_bad_layer_names_and_rewind_points_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"prune\.layer_fractions\.out\.weigth"):
        run(tiny(tmp_path, "prune.layer_fractions={out.weigth: 0.1}"))
    with pytest.raises(ConfigError, match=r"prune\.rewind_iteration: 500 is after the end"):
        run(tiny(tmp_path, "prune.rewind_iteration=500"))
    with pytest.raises(ModelError, match=r"model\.exclude: no module named \['hiden'\]"):
        run(tiny(tmp_path, "model.exclude=[hiden]"))


def test_excluded_layers_stay_dense(tmp_path):
    result = run(tiny(tmp_path, "model.exclude=[out]", "prune.levels=1",
                      "experiment.variants=[ticket]"))
    c = load(result, 1, "ticket")
    assert set(c.mask) == {"hidden.0.weight"}
    assert torch.count_nonzero(c.state["out.weight"]) == SIZES["out.weight"]
    assert c.mask.density() == 0.5


def test_prune_cli_prints_the_per_level_summary(tmp_path):
    script = Path(sys.executable).with_name("ticketsmith")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "ticketsmith"]
    out = subprocess.run(
        [*cmd, "prune", "--config", str(REPO / "configs/tiny.yaml"), "--no-tracking", "-q",
         "--set", f"experiment.output_dir={tmp_path}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    levels = re.findall(r"r0 level (\d+)\s+density\s+([\d.]+)%\s+ticket ([\d.]+)%\s+"
                        r"random_reinit ([\d.]+)%", out.stdout)
    assert [int(lv) for lv, *_ in levels] == [1, 2, 3], out.stdout
    kept = expected_kept(3, RATES)
    for (level, density, *_), k in zip(levels, kept):
        assert float(density) == pytest.approx(100 * sum(k.values()) / sum(SIZES.values()), abs=0.01)
    assert re.search(r"r0 level 0\s+density 100.00%\s+dense [\d.]+%", out.stdout)
    assert "done: 7 runs (7 trained now)" in out.stdout


def test_an_experiment_takes_its_start_up_objects_out_of_full_collections_once(tmp_path):
    """run_experiment freezes what is alive once its imports and data are in place, and a
    second experiment in the same process freezes nothing more (garbage of later work stays
    collectable). A fresh process: this one may have frozen already."""
    import textwrap

    repo = Path(__file__).resolve().parents[2]
    code = textwrap.dedent(f"""
        import gc
        from ticketsmith.base.config import load_config
        from ticketsmith.engine.lottery import run_experiment
        cfg = load_config({str(repo / "configs" / "tiny.yaml")!r},
                          overrides=["prune.levels=1", "experiment.output_dir={tmp_path / 'runs'}"])
        before = gc.get_freeze_count()
        run_experiment(cfg, progress=False, echo=lambda s: None)
        first = gc.get_freeze_count()
        run_experiment(cfg, progress=False, echo=lambda s: None)
        print(before, first, gc.get_freeze_count())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    before, first, second = map(int, out.stdout.split()[-3:])
    assert before == 0 and first > 10_000 and second == first


def test_the_cli_knows_every_variant_the_driver_builds_and_no_other():
    """`--variants` is checked against `selection.VARIANT_NAMES` (no torch to import), the
    driver builds from `lottery.VARIANTS`, and the config allows `experiment.variants`: one
    list of names."""
    import typing

    from ticketsmith.base.config import ExperimentConfig
    from ticketsmith.engine.lottery import VARIANTS
    from ticketsmith.engine.selection import VARIANT_NAMES

    assert tuple(VARIANTS) == VARIANT_NAMES
    allowed = typing.get_args(typing.get_args(ExperimentConfig.model_fields["variants"].annotation)[0])
    assert set(allowed) == set(VARIANT_NAMES)
