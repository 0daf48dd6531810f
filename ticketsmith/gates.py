"""Quality gates: pure checks of a ticket's metrics against the dense baseline.

Each gate returns the value, the threshold and the decision; a level's verdict is PASS when
every evaluated gate passes. Means are over replicates (accuracy in points, 0–100; language
models are judged on bits per byte, where lower is better).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from statistics import mean
from typing import TYPE_CHECKING, Any, Iterable

from ticketsmith.base.config import Config, GateConfig
from ticketsmith.base.errors import GateError  # noqa: F401 (re-exported)

if TYPE_CHECKING:  # an annotation only: the engine imports torch
    from ticketsmith.engine.lottery import ExperimentResult

PASS, FAIL, NOT_APPLICABLE = "PASS", "FAIL", "n/a"  # see `label`


@dataclass(frozen=True)
class GateResult:
    name: str
    value: float | None        # None: not evaluated (e.g. no random control at this level)
    threshold: float | None
    passed: bool | None        # None when not evaluated; it then does not block promotion
    detail: str


@dataclass(frozen=True)
class LevelVerdict:
    level: int
    sparsity: float
    ticket_accuracy: float     # mean test accuracy, points (language models: next-token)
    replicates: int
    gates: list[GateResult] = field(default_factory=list)
    ticket_bpb: float | None = None  # language models: mean test bits per byte

    @property
    def quality(self) -> str:
        """The ticket's quality as a person reads it."""
        if self.ticket_bpb is not None:
            return f"{self.ticket_bpb:.3f} bits per byte"
        return f"{self.ticket_accuracy:.2f}% accuracy"

    @property
    def passed(self) -> bool:
        return all(g.passed is not False for g in self.gates)


def _mean(records: Iterable[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records]
    return mean(values) if values else None



def described(records: Iterable[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    """The records `cfg` describes: its levels, replicates and variants (and the dense runs).

    Levels, replicates and variants are not hashed, so one experiment's store may hold more
    than its config asks for now. `prune`, `ticketsmith gate` and the report all gate this
    selection, so the three give the same verdicts."""
    wanted = {"dense", *cfg.experiment.variants}
    return [r for r in records if r["level"] <= cfg.prune.levels
            and r["replicate"] < cfg.experiment.replicates and r["variant"] in wanted]

def is_language_model(records: Iterable[dict[str, Any]]) -> bool:
    """Records of a language model carry bits per byte."""
    return any("test_bpb" in r for r in records)


def evaluate_gates(records: list[dict[str, Any]], cfg: GateConfig) -> list[LevelVerdict]:
    """One verdict per pruned level (>0) that has ticket records."""
    dense = [r for r in records if r["level"] == 0 and r["variant"] == "dense"]
    if not dense:
        raise GateError("no dense baseline (level 0) among the records; run level 0 first")
    if is_language_model(records):
        return _language_model_gates(records, dense, cfg)
    dense_acc = 100 * _mean(dense, "test_accuracy")
    dense_loss = _mean(dense, "test_loss")
    verdicts = []
    for level in sorted({r["level"] for r in records if r["level"] > 0}):
        tickets = [r for r in records if r["level"] == level and r["variant"] == "ticket"]
        if not tickets:
            continue
        randoms = [r for r in records if r["level"] == level and r["variant"] == "random_reinit"]
        acc = 100 * _mean(tickets, "test_accuracy")
        drop = dense_acc - acc
        gates = [GateResult("accuracy_drop", drop, cfg.max_accuracy_drop,
                            drop <= cfg.max_accuracy_drop,
                            f"dense {dense_acc:.2f} - ticket {acc:.2f} = {drop:.2f} points")]
        loss_delta = _mean(tickets, "test_loss") - dense_loss
        if cfg.max_loss_delta is not None:
            gates.append(GateResult("loss_delta", loss_delta, cfg.max_loss_delta,
                                    loss_delta <= cfg.max_loss_delta,
                                    f"ticket loss - dense loss = {loss_delta:+.4f}"))
        else:
            gates.append(GateResult("loss_delta", loss_delta, None, None,
                                    f"{loss_delta:+.4f} (no bound configured)"))
        if cfg.require_beats_random:
            if randoms:
                margin = acc - 100 * _mean(randoms, "test_accuracy")
                gates.append(GateResult("beats_random", margin, 0.0, margin > 0,
                                        f"ticket - random re-init = {margin:+.2f} points"))
            else:
                gates.append(GateResult("beats_random", None, 0.0, None,
                                        "no random_reinit control at this level"))
        verdicts.append(LevelVerdict(level, tickets[0]["sparsity"], acc, len(tickets), gates))
    return verdicts


def _language_model_gates(records: list[dict[str, Any]], dense: list[dict[str, Any]],
                          cfg: GateConfig) -> list[LevelVerdict]:
    """Validation and test bits per byte within `max_bpb_increase` of dense, and (lower is
    better) the ticket below random re-init of the same mask."""
    base = {k: _mean(dense, f"{k}_bpb") for k in ("val", "test")}
    verdicts = []
    for level in sorted({r["level"] for r in records if r["level"] > 0}):
        tickets = [r for r in records if r["level"] == level and r["variant"] == "ticket"]
        if not tickets:
            continue
        gates = []
        for split in ("val", "test"):
            bpb = _mean(tickets, f"{split}_bpb")
            rise = bpb - base[split]
            gates.append(GateResult(f"{split}_bpb_increase", rise, cfg.max_bpb_increase,
                                    rise <= cfg.max_bpb_increase,
                                    f"{split}: ticket {bpb:.3f} - dense {base[split]:.3f} = "
                                    f"{rise:+.3f} bits per byte"))
        randoms = [r for r in records if r["level"] == level and r["variant"] == "random_reinit"]
        ticket_bpb = _mean(tickets, "test_bpb")
        if cfg.require_beats_random and randoms:
            margin = _mean(randoms, "test_bpb") - ticket_bpb
            gates.append(GateResult("beats_random", margin, 0.0, margin > 0,
                                    f"random re-init - ticket = {margin:+.3f} bits per byte "
                                    "(lower is better)"))
        elif cfg.require_beats_random:
            gates.append(GateResult("beats_random", None, 0.0, None,
                                    "no random_reinit control at this level"))
        verdicts.append(LevelVerdict(level, tickets[0]["sparsity"],
                                     100 * _mean(tickets, "test_accuracy"), len(tickets), gates,
                                     ticket_bpb=ticket_bpb))
    return verdicts


def champion_level(verdicts: list[LevelVerdict]) -> LevelVerdict | None:
    """The sparsest level whose ticket passes every gate."""
    passing = [v for v in verdicts if v.passed]
    return max(passing, key=lambda v: v.sparsity) if passing else None


def release_check(verdicts: list[LevelVerdict], cfg: GateConfig) -> tuple[bool, str]:
    """CI-style release check: a champion exists and reaches `release_min_sparsity`."""
    best = champion_level(verdicts)
    if best is None:
        return False, "no ticket passes every gate"
    if best.sparsity < cfg.release_min_sparsity:
        return False, (f"sparsest passing ticket is {best.sparsity:.1%}, below the required "
                       f"{cfg.release_min_sparsity:.1%}")
    return True, f"level {best.level} passes at {best.sparsity:.1%} sparsity"


def label(passed: bool | None) -> str:
    """PASS, FAIL or n/a: how every table, tag, description and report writes a decision."""
    return {True: PASS, False: FAIL, None: NOT_APPLICABLE}[passed]


def format_table(verdicts: list[LevelVerdict]) -> str:
    """Plain-text gate table: one line per level with every gate's number and decision."""
    lm = any(v.ticket_bpb is not None for v in verdicts)
    lines = [f"{'level':>5} {'sparsity':>9} {'ticket bpb' if lm else 'ticket acc':>10}  verdict  gates"]
    for v in verdicts:
        gates = "; ".join(
            f"{g.name} {g.value:+.3f}" + (f" (≤ {g.threshold})" if g.name != "beats_random"
                                          and g.threshold is not None else "")
            + f" {label(g.passed)}" if g.value is not None
            else f"{g.name} {label(g.passed)}: {g.detail}"
            for g in v.gates)
        quality = (f"{v.ticket_bpb:>10.3f}" if v.ticket_bpb is not None
                   else f"{v.ticket_accuracy:>9.2f}%")
        lines.append(f"{v.level:>5} {v.sparsity:>9.2%} {quality}  "
                     f"{label(v.passed):<7}  {gates}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Promotion:
    """What the registry made of the verdicts (`tracking.registry.promote`)."""
    model_name: str
    versions: dict[int, str]          # level → model version
    champion: str | None              # version holding `champion` now
    previous: str | None              # version holding `previous-champion` now
    rejected: list[str]


@dataclass
class PipelineResult:
    """What a tracked `prune` came to: the experiment, its verdicts, the registry's promotion
    (None when nothing is registered) and the release check. Here, with the verdicts, so that
    the training process of `ticketsmith.sidecar` builds one without importing MLflow."""
    experiment: ExperimentResult
    verdicts: list[LevelVerdict]
    promotion: Promotion | None
    release_ok: bool
    release_reason: str
