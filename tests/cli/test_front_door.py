"""What a new user sees: a tracked prune prints progress, the per-level lines, the answer and
where to look next — no MLflow hints in raw ANSI colour, no MLflow INFO lines — and an
unknown flag lists every command."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_tracked_prune_prints_only_what_the_user_needs(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("MLFLOW_LOGGING_LEVEL", None)
    out = subprocess.run([sys.executable, "-m", "ticketsmith", "prune", "--config",
                          str(REPO / "configs/tiny.yaml"), "-q", "--no-report",
                          "--set", "prune.levels=1", "--set", "train.iterations=40"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.strip() == "", out.stderr[-3000:]
    assert "\x1b[" not in out.stdout
    for expected in ("level 1", "release check:", "MLflow UI:", "mlflow ui --backend-store-uri"):
        assert expected in out.stdout, out.stdout


def test_an_unknown_flag_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "ticketsmith", "prune", "--no-such-flag"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "{train,prune,gate,benchmark,export,generate,report,sweep,data}" in out.stderr, \
        out.stderr
