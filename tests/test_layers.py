"""The one-way layers of docs/architecture.md are checked, not hoped for: `lint-imports` runs
the contracts in pyproject.toml ([tool.importlinter])."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    out = subprocess.run([exe, "--no-cache"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_help_and_a_config_error_import_neither_torch_nor_mlflow(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: -1}\n")
    code = ("import sys\nfrom ticketsmith.cli import main\n"
            "for argv in (['prune', '--config', sys.argv[1]], ['sweep', '--help'], ['--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'mlflow', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert "error: " in out.stderr and "train.lr" in out.stderr, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_gate_reads_the_store_without_torch(tmp_path):
    code = ("import sys\nfrom ticketsmith.cli import main\n"
            "print(main(['gate', '--experiment', 'nothing-here']))\n"
            "print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    assert out.stdout.split() == ["2", "['mlflow']"], out.stdout + out.stderr[-2000:]
    assert "nothing-here" in out.stderr


def test_old_import_paths_of_registered_models_still_resolve():
    """Models registered before the engine moved carry code that imports
    `ticketsmith.checkpoint.model_from_checkpoint` (and name `ticketsmith.pyfunc_model`)."""
    from ticketsmith.checkpoint import model_from_checkpoint
    from ticketsmith.engine import checkpoint
    from ticketsmith.pyfunc_model import TicketModel
    from ticketsmith.tracking import pyfunc_model

    assert model_from_checkpoint is checkpoint.model_from_checkpoint
    assert TicketModel is pyfunc_model.TicketModel
