"""benchmarks/structured.py checks its targets: a miss is exit code 1, not a line that says
"NOT met" under exit 0. Run on a tiny structured ticket (neurons removed, synthetic data);
nothing here asserts on speed: the targets are ones no ticket can miss or meet."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_benchmark

REPO = Path(__file__).resolve().parents[2]
structured = load_benchmark("structured")
pytestmark = pytest.mark.slow  # two tiny benchmarks at all cores: tens of seconds


def test_a_missed_target_is_exit_1_and_met_targets_exit_0(tmp_path, capsys):
    argv = ["--config", str(REPO / "configs" / "tiny.yaml"), "--output-dir", str(tmp_path),
            "--set", "prune.granularity=neuron", "--set", "prune.levels=1",
            "--set", "train.iterations=40", "--set", "experiment.variants=[ticket]",
            "--set", "gate.max_accuracy_drop=100", "--low", "0", "--high", "1",
            "--repeats", "1", "--trials", "2"]
    assert structured.main([*argv, "--targets", "1=1e6,8=1e6"]) == 1  # cannot be met
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.split()[:1] == ["1"]]  # level 1, every runtime
    assert len(rows) == 6 and all(line.endswith("NOT met") for line in rows), out
    assert out[-1].endswith("targets: >= 1000000.0x at batch 1, >= 1000000.0x at batch 8: "
                            "NOT met")
    assert structured.main([*argv, "--targets", "1=0,8=0"]) == 0  # any measured speedup
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.split()[:1] == ["1"]]
    assert len(rows) == 6 and not any(line.endswith("NOT met") for line in rows), out
    assert out[-1].endswith(": met")
