"""The registry's alias lifecycle, driven through the CLI against a real SQLite store.

One story, run once (module fixture), each step's registry state kept for the tests below:

1. `prune` levels 0-2 of the tiny experiment: level 1 fails beats_random, level 2 passes.
2. `prune` again with 3 levels (same hash: levels are not hashed): the sparser level 3 passes
   and takes `champion`; the old champion becomes `previous-champion`.
3. `gate` with a stricter accuracy threshold, read-only: the registry does not move.
4. the same with `--update-registry`: level 3 is rejected and loses `champion`; level 2
   (the next sparsest passing) is promoted.
5. `gate --update-registry` so strict that nothing passes: no champion, said so, exit 1.
6. `gate --update-registry` with the logged thresholds: level 3 is champion again.
7. the tiny config with another model under the same experiment name (another hash), and
8. the same hash under another experiment name: each registers apart, and the first
   experiment's aliases do not move.
9. `prune` the first experiment again with 2 levels: the champion (level 3, from the longer
   run) is not among the versions this run gates, and it is sparser than any of them: it
   keeps `champion`.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from ticketsmith.cli import main
from ticketsmith.base.config import load_config
from ticketsmith.tracking.registry import CHAMPION, PREVIOUS, model_name_for

# Four prunes with registration: tens of seconds of CPU.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


def state(client: MlflowClient, name: str) -> dict:
    """level → {version, quality_gate, aliases, gate tags} of one registered model."""
    levels = {}
    for mv in client.search_model_versions(f"name = '{name}'"):
        mv = client.get_model_version(name, mv.version)  # search omits aliases on some stores
        levels[int(mv.tags["level"])] = {"version": mv.version, "gate": mv.tags["quality_gate"],
                                         "aliases": sorted(mv.aliases), "tags": dict(mv.tags)}
    return levels


def gate_value(tag: str) -> float:
    """'PASS 0.2500' → 0.25"""
    return float(tag.split()[1])


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out_dir = f"experiment.output_dir={tmp / 'runs'}"
    base = ["--config", TINY, "--set", out_dir, "-q", "--no-report"]
    steps: dict[str, dict] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(tmp)
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        h = load_config(TINY, [out_dir]).hash()
        name = model_name_for("tiny", h)

        def step(key: str, *argv: str) -> None:
            code, text = cli(*argv)
            steps[key] = {"code": code, "out": text, "state": state(client, name)}

        step("levels2", "prune", *base, "--set", "prune.levels=2")
        step("levels3", "prune", *base, "--set", "prune.levels=3")
        tags = steps["levels3"]["state"]
        drop2, drop3 = (gate_value(tags[lv]["tags"]["gate.accuracy_drop"]) for lv in (2, 3))
        assert drop3 > drop2, "the story needs level 3 to lose more accuracy than level 2"
        strict = f"gate.max_accuracy_drop={(drop2 + drop3) / 2}"
        step("strict_read_only", "gate", "-e", "tiny", "--set", strict)
        step("strict", "gate", "-e", "tiny", "--update-registry", "--set", strict)
        step("none", "gate", "-e", "tiny", "--update-registry",
             "--set", "gate.max_accuracy_drop=0", "--set", "gate.max_loss_delta=0")
        step("restored", "gate", "-e", "tiny", "--update-registry")
        other_model = ["--set", "model.options.hidden=[16]", "--set", "prune.levels=2"]
        h2 = load_config(TINY, [out_dir, "model.options.hidden=[16]"]).hash()
        step("reused_name", "prune", *base, *other_model)
        step("other_name", "prune", *base, "--set", "experiment.name=other",
             "--set", "prune.levels=3")
        step("shorter", "prune", *base, "--set", "prune.levels=2")
        yield client, h, h2, steps
    mlflow.set_tracking_uri(None)


def aliases(levels: dict) -> dict[str, int]:
    """alias → level holding it."""
    return {a: lv for lv, v in levels.items() for a in v["aliases"]}


def test_a_sparser_passing_ticket_takes_champion_and_the_old_one_is_kept_for_rollback(story):
    _, _, _, steps = story
    first, second = steps["levels2"], steps["levels3"]
    assert first["code"] == second["code"] == 0
    assert aliases(first["state"]) == {CHAMPION: 2}
    assert aliases(second["state"]) == {CHAMPION: 3, PREVIOUS: 2}
    assert first["state"][2]["version"] == second["state"][2]["version"]  # not re-registered
    assert f"v{second['state'][3]['version']} (level 3" in second["out"]
    assert f"is now @{CHAMPION}; v{second['state'][2]['version']} is @{PREVIOUS}" in second["out"]


def test_a_rejected_version_holds_no_alias_and_says_so(story):
    _, _, _, steps = story
    for key in ("levels2", "levels3", "strict", "none", "restored"):
        level1 = steps[key]["state"][1]
        assert level1["gate"] == "rejected" and level1["aliases"] == [], key
        assert level1["tags"]["gate.beats_random"].startswith("FAIL")


def test_gate_only_reads_the_registry_unless_asked(story):
    _, _, _, steps = story
    read_only = steps["strict_read_only"]
    assert read_only["state"] == steps["levels3"]["state"]
    assert "registry" not in read_only["out"]
    assert "release check: PASS (level 2 passes" in read_only["out"]


def test_regate_rejecting_the_champion_promotes_the_next_sparsest_passing(story):
    _, _, _, steps = story
    strict = steps["strict"]
    assert strict["code"] == 0
    assert strict["state"][3]["gate"] == "rejected" and strict["state"][3]["aliases"] == []
    assert strict["state"][3]["tags"]["gate.accuracy_drop"].startswith("FAIL")
    # level 2 was previous-champion; it is champion now, and nothing rejected is a rollback
    assert aliases(strict["state"]) == {CHAMPION: 2}
    v3, v2 = strict["state"][3]["version"], strict["state"][2]["version"]
    assert f"v{v3} no longer passes every gate" in strict["out"]
    assert f"v{v2} (level 2" in strict["out"] and f"is now @{CHAMPION}" in strict["out"]


def test_regate_rejecting_everything_leaves_no_champion_and_says_so(story):
    _, _, _, steps = story
    none = steps["none"]
    assert none["code"] == 1
    assert aliases(none["state"]) == {}
    assert all(v["gate"] == "rejected" for v in none["state"].values())
    assert f"no version of {model_name_for('tiny', story[1])} is @{CHAMPION}" in none["out"]
    assert "release check: FAIL (no ticket passes every gate)" in none["out"]


def test_regate_with_the_logged_thresholds_restores_the_champion(story):
    _, _, _, steps = story
    restored = steps["restored"]
    assert restored["code"] == 0
    assert aliases(restored["state"]) == {CHAMPION: 3}
    assert restored["state"][3]["gate"] == restored["state"][2]["gate"] == "passed"


def test_another_config_under_a_reused_name_never_touches_the_champion(story):
    client, h, h2, steps = story
    assert h2 != h
    assert steps["reused_name"]["code"] == 0
    # the first experiment's registered model is exactly as the last gate left it
    assert steps["reused_name"]["state"] == steps["restored"]["state"]
    # the new config's tickets are versions of a model of their own
    mine = client.search_model_versions(f"name = '{model_name_for('tiny', h2)}'")
    assert sorted(int(mv.tags["level"]) for mv in mine) == [1, 2]
    runs = {mv.run_id for mv in mine}
    tagged = {r.info.run_id: r.data.tags["ticketsmith.hash"] for r in client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id])}
    assert {tagged[r] for r in runs} == {h2}


def test_two_experiment_names_keep_their_aliases_apart(story):
    client, h, _, steps = story
    other = steps["other_name"]
    assert other["code"] == 0
    assert other["state"] == steps["restored"]["state"]  # tiny's model did not move
    theirs = state(client, model_name_for("other", h))
    assert aliases(theirs) == {CHAMPION: 3}
    ours = {v["version"] for v in steps["restored"]["state"].values()}
    assert {mv.run_id for mv in client.search_model_versions(
        f"name = '{model_name_for('other', h)}'")}.isdisjoint(
        {client.get_model_version(model_name_for("tiny", h), v).run_id for v in ours})


def test_a_sparser_champion_from_a_longer_run_keeps_its_alias_when_a_shorter_run_is_gated(
        story):
    _, _, _, steps = story
    before, shorter = steps["other_name"]["state"], steps["shorter"]
    assert shorter["code"] == 0
    assert aliases(before) == {CHAMPION: 3}
    # level 2 passes in this run and would be its champion; level 3 outranks it
    assert shorter["state"][2]["gate"] == "passed"
    assert float(shorter["state"][3]["tags"]["sparsity"]) > \
        float(shorter["state"][2]["tags"]["sparsity"])
    assert aliases(shorter["state"]) == {CHAMPION: 3}
    assert f"is now @{CHAMPION}" not in shorter["out"]
