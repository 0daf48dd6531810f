"""Quality gates: pure functions of records → verdicts, and the `gate` release check."""
from __future__ import annotations

import pytest

from ticketsmith.base.config import GateConfig
from ticketsmith.gates import GateError, champion_level, evaluate_gates, format_table, release_check


def rec(level, variant, acc, loss=0.1, replicate=0, sparsity=None):
    return {"level": level, "variant": variant, "test_accuracy": acc, "test_loss": loss,
            "replicate": replicate, "sparsity": sparsity if sparsity is not None else 1 - 0.5 ** level}


def records(*tickets, randoms=None, dense=(0.98, 0.96)):
    out = [rec(0, "dense", a, replicate=i) for i, a in enumerate(dense)]
    for level, accs in enumerate(tickets, start=1):
        out += [rec(level, "ticket", a, replicate=i) for i, a in enumerate(accs)]
    for level, accs in (randoms or {}).items():
        out += [rec(level, "random_reinit", a, replicate=i) for i, a in enumerate(accs)]
    return out


def gate(verdict, name):
    return next(g for g in verdict.gates if g.name == name)


def test_accuracy_drop_uses_means_over_replicates():
    # dense mean 97.0; level 1 ticket mean 96.0 → drop 1.0 point: PASS at 2.0
    v = evaluate_gates(records((0.97, 0.95)), GateConfig())[0]
    assert gate(v, "accuracy_drop").value == pytest.approx(1.0)
    assert gate(v, "accuracy_drop").passed


def test_edge_value_exactly_at_threshold_passes_and_just_above_fails():
    at = evaluate_gates(records((0.95, 0.95)), GateConfig(max_accuracy_drop=2.0))[0]
    assert gate(at, "accuracy_drop").value == pytest.approx(2.0)
    assert gate(at, "accuracy_drop").passed
    above = evaluate_gates(records((0.9499, 0.9499)), GateConfig(max_accuracy_drop=2.0))[0]
    assert not gate(above, "accuracy_drop").passed
    assert not above.passed


def test_beats_random_and_missing_control():
    rs = records((0.97, 0.97), (0.96, 0.96), randoms={1: (0.975, 0.975), 2: (0.90, 0.90)})
    v1, v2 = evaluate_gates(rs, GateConfig())
    assert gate(v1, "beats_random").passed is False and not v1.passed
    assert gate(v2, "beats_random").value == pytest.approx(6.0)
    assert v2.passed
    # no random control: not evaluated, does not block
    v = evaluate_gates(records((0.97, 0.97)), GateConfig())[0]
    assert gate(v, "beats_random").passed is None and v.passed
    # switched off: not present
    v = evaluate_gates(records((0.97, 0.97)), GateConfig(require_beats_random=False))[0]
    assert all(g.name != "beats_random" for g in v.gates)


def test_loss_delta_bound():
    rs = records((0.97, 0.97))
    rs[2]["test_loss"] = rs[3]["test_loss"] = 0.3  # dense loss 0.1 → delta 0.2
    assert gate(evaluate_gates(rs, GateConfig())[0], "loss_delta").passed is None
    assert gate(evaluate_gates(rs, GateConfig(max_loss_delta=0.25))[0], "loss_delta").passed
    assert not evaluate_gates(rs, GateConfig(max_loss_delta=0.1))[0].passed


def test_missing_dense_baseline_is_a_clear_error():
    with pytest.raises(GateError, match="no dense baseline"):
        evaluate_gates([rec(1, "ticket", 0.9)], GateConfig())


def test_champion_is_sparsest_passing_and_release_check():
    rs = records((0.97, 0.97), (0.965, 0.965), (0.90, 0.90))  # level 3 fails the drop gate
    verdicts = evaluate_gates(rs, GateConfig())
    assert champion_level(verdicts).level == 2
    ok, why = release_check(verdicts, GateConfig(release_min_sparsity=0.7))
    assert ok, why
    ok, why = release_check(verdicts, GateConfig(release_min_sparsity=0.8))
    assert not ok and "below the required" in why
    assert not release_check(evaluate_gates(records((0.5, 0.5)), GateConfig()), GateConfig())[0]
    table = format_table(verdicts)
    assert "FAIL" in table.splitlines()[3] and "PASS" in table.splitlines()[2]


def lm_record(level: int, variant: str, bpb: float, replicate: int = 0) -> dict:
    return {"level": level, "variant": variant, "replicate": replicate, "sparsity": 0.4 * level,
            "test_accuracy": 0.5, "test_loss": bpb, "test_bpb": bpb, "val_bpb": bpb + 0.01}


def test_language_models_are_gated_on_bits_per_byte_lower_is_better():
    from ticketsmith.base.config import GateConfig
    from ticketsmith.gates import evaluate_gates

    records = [lm_record(0, "dense", 2.00),
               lm_record(1, "ticket", 2.04), lm_record(1, "random_reinit", 2.10),
               lm_record(2, "ticket", 2.08), lm_record(2, "random_reinit", 2.20),
               lm_record(3, "ticket", 2.03), lm_record(3, "random_reinit", 2.01)]
    v = {x.level: x for x in evaluate_gates(records, GateConfig(max_bpb_increase=0.05))}
    assert [g.name for g in v[1].gates] == ["val_bpb_increase", "test_bpb_increase", "beats_random"]
    assert v[1].passed and v[1].ticket_bpb == pytest.approx(2.04)
    assert v[1].gates[2].value == pytest.approx(0.06)  # random − ticket: the ticket wins
    assert not v[2].passed and [g.passed for g in v[2].gates] == [False, False, True]
    assert not v[3].passed and [g.passed for g in v[3].gates] == [True, True, False]
    assert "bits per byte" in v[1].quality
