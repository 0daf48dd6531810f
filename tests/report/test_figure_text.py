"""The report's log axes are labelled in plain numbers: no mathtext, whose parser is built on
first use (a tenth of such a figure's CPU time)."""
from __future__ import annotations

import math

import matplotlib.mathtext as mathtext
import pytest

from ticketsmith.report.figures import speedup_vs_sparsity, training_curves


@pytest.fixture
def parsed(monkeypatch):
    """Every string matplotlib hands to its mathtext parser while the test runs."""
    seen: list[str] = []
    real = mathtext.MathTextParser.parse

    def parse(self, s, *args, **kwargs):
        seen.append(s)
        return real(self, s, *args, **kwargs)

    monkeypatch.setattr(mathtext.MathTextParser, "parse", parse)
    return seen


def test_training_curves_log_axis_needs_no_mathtext(tmp_path, parsed):
    rows = [{"iteration": i, "train_loss": 2.3 * math.exp(-i / 400) + 0.02,
             "val_loss": 0.5, "val_accuracy": 0.9} for i in range(0, 1000, 100)]
    path = training_curves([("dense", "dense", rows), ("level 1", "ticket", rows)],
                           tmp_path / "curves.png")
    assert path.stat().st_size > 0
    assert parsed == []


def test_speedup_log_axis_needs_no_mathtext(tmp_path, parsed):
    bench = {lv: {"model": {"density": d}, "results": [
        {"format": f, "batch_size": bs, "correct": True, "speedup": s / d ** 0.5}
        for f, s in (("dense", 1.0), ("csr", 0.6), ("compacted", 1.1)) for bs in (1, 256)]}
        for lv, d in ((1, 0.8), (2, 0.2), (3, 0.03))}
    path = speedup_vs_sparsity(bench, tmp_path / "speedup.png")
    assert path is not None and path.stat().st_size > 0
    assert parsed == []
