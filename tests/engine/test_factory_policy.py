"""One factory policy for every loader that rebuilds a model from a checkpoint: a factory named
only in the checkpoint's metadata is never imported unless the config names it or a flag
allows it. The factory here leaves a marker file when its module is imported, so each test
sees whether the import happened."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ticketsmith.engine.checkpoint import (CheckpointError, factory_allowed, load_checkpoint,
                                           model_from_checkpoint, save_checkpoint)
from ticketsmith.cli import main
from ticketsmith.engine.models import build_model

FACTORY = "planted_factory:build"


@pytest.fixture()
def planted(tmp_path, monkeypatch):
    """A module whose import writes `imported.marker`; returns the marker path."""
    marker = tmp_path / "imported.marker"
    pkg = tmp_path / "planted"
    pkg.mkdir()
    (pkg / "planted_factory.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("imported")
        from ticketsmith.engine.models import build_model

        def build(input_shape, num_classes, **options):
            return build_model("mlp", input_shape, num_classes, options={{"hidden": [8]}})
    """))
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.delitem(sys.modules, "planted_factory", raising=False)
    return marker


def factory_checkpoint(path: Path, factory: str | None = FACTORY) -> Path:
    """A checkpoint with a valid checksum whose metadata names `factory`: what anyone with
    write access to a run folder or an artifact store can make."""
    model = build_model("mlp", (1, 8, 8), 4, options={"hidden": [8]})
    meta = {"model": "mlp", "factory": factory, "options": {}, "exclude": [],
            "input_shape": [1, 8, 8], "num_classes": 4, "dataset": "synthetic"}
    return save_checkpoint(path, model.state_dict(), None, meta)


def test_the_policy():
    assert factory_allowed(None, None) and factory_allowed("", False)
    assert not factory_allowed(FACTORY, None) and not factory_allowed(FACTORY, False)
    assert factory_allowed(FACTORY, True) and factory_allowed(FACTORY, FACTORY)
    assert not factory_allowed(FACTORY, "other_module:build")


def test_model_from_checkpoint_imports_only_an_allowed_factory(tmp_path, planted):
    path = factory_checkpoint(tmp_path / "ck.safetensors")
    for allow in (None, False, "other_module:build"):
        with pytest.raises(CheckpointError, match="named only in the checkpoint") as info:
            model_from_checkpoint(path, allow_factory=allow)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not planted.exists()
    model, _, meta = model_from_checkpoint(path, allow_factory=FACTORY)
    assert planted.exists() and meta["factory"] == FACTORY
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 4)


def test_benchmark_cli_refuses_it_without_the_flag(tmp_path, planted, capsys):
    path = factory_checkpoint(tmp_path / "ck.safetensors")
    args = ["benchmark", "--checkpoint", str(path), "--no-data", "--quick", "--trials", "2",
            "--batch-sizes", "1", "--formats", "compacted", "--output", str(tmp_path / "b.json")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "--allow-factory" in err[0]
    assert not planted.exists()
    assert main(args + ["--allow-factory"]) == 0
    assert planted.exists()


def test_registered_pyfunc_imports_only_the_factory_its_config_named(tmp_path, planted,
                                                                     sqlite_uri):
    import mlflow
    from mlflow import MlflowClient

    from ticketsmith.tracking.registry import register_ticket

    client = MlflowClient(sqlite_uri)
    exp = client.create_experiment("factory-policy", artifact_location=str(tmp_path / "art"))
    path = factory_checkpoint(tmp_path / "checkpoint.safetensors")
    x = torch.zeros(2, 1, 8, 8).numpy()
    # Registered without the config naming the factory (a tampered or foreign checkpoint):
    # registration refuses (its serving plan is built from the rebuilt model), no version is
    # created, and the factory module is never imported.
    run = client.create_run(exp)
    with pytest.raises(Exception, match="named only in the checkpoint"):
        register_ticket(client, "refused", run.info.run_id, path)
    assert client.search_model_versions("name = 'refused'") == []
    assert not planted.exists()
    # Registered by an experiment whose config names it: loads and predicts.
    run = client.create_run(exp)
    version = register_ticket(client, "allowed", run.info.run_id, path, allow_factory=FACTORY)
    assert mlflow.pyfunc.load_model(f"models:/allowed/{version}").predict(x).shape == (2, 4)
    assert planted.exists()


def test_backfilled_run_with_a_planted_factory_is_refused(tmp_path, planted, sqlite_uri,
                                                        repo_root, tiny_overrides):
    """A level finished locally, then uploaded by a tracked rerun (the path that rebuilds the
    model for its sample figure): a factory the config does not name is refused."""
    from ticketsmith.base.config import load_config
    from ticketsmith.engine.lottery import run_experiment
    from ticketsmith.pipeline import run_prune

    cfg = load_config(repo_root / "configs" / "tiny.yaml",
                      tiny_overrides + ["prune.levels=1", "experiment.variants=[ticket]"])
    result = run_experiment(cfg, progress=False, echo=lambda s: None)
    ck_path = result.run_root / "replicate_0" / "level_1" / "ticket" / "checkpoint.safetensors"
    ck = load_checkpoint(ck_path)
    save_checkpoint(ck_path, ck.state, ck.mask, {**ck.meta, "factory": FACTORY})
    with pytest.raises(CheckpointError, match="named only in the checkpoint"):
        run_prune(cfg, progress=False, echo=lambda s: None)
    assert not planted.exists()
