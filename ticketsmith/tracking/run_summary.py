"""What the MLflow UI shows first: the parent run's per-level comparison and the descriptions.

MLflow's run page draws one default chart per metric key and groups charts into sections by
the key's prefix before '/'. So the parent run of a replicate logs, with step = level,

    accuracy/dense, accuracy/ticket, accuracy/random_reinit, accuracy/random_prune
    accuracy/ticket_minus_random_reinit      (test accuracy, fraction; gap as a fraction too)
    bpb/dense, bpb/ticket, bpb/random_reinit, bpb/random_reinit_minus_ticket
                                             (language models: test bits per byte, lower is
                                              better; the gap is positive when the ticket wins)
    weights/sparsity, weights/density        (over prunable weights)
    speedup/batch_<n>                        (the ticket's best checked serving plan)
    tokens_per_s/decode_batch_<n>, tokens_per_s/prefill_batch_<n>
    speedup/decode_batch_<n>, speedup/prefill_batch_<n>
    usd_per_m_tokens/decode_batch_<n>, usd_per_m_tokens/dense_decode_batch_<n>
                                             (language models with experiment.benchmark: what
                                              the level serves, against dense timed beside it;
                                              dollars per million generated tokens)

MLflow 3.17's default charts hold one metric key each, so the chart with ticket, random re-init
and dense together is the report's figure, shown in the parent run's description (Overview tab)
once the executive report is logged. The experiment carries MLflow's training experiment kind.
MLflow 3.17's UI itself picks GenAI or training mode per browser (sidebar toggle, remembered)
or from `?workflowType=machine_learning` in the link, which `ui_link` adds.
"""
from __future__ import annotations

from typing import Any

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"   # one of the values MLflow's UI reads
NOTE_TAG = "mlflow.note.content"             # the description shown on runs and experiments
GAP_KEY = "accuracy/ticket_minus_random_reinit"


def accuracy_key(variant: str, prefix: str = "accuracy") -> str:
    return f"{prefix}/{variant}"


def quality_key(record: dict[str, Any]) -> str:
    """The record's quality metric: test bits per byte for a language model, else accuracy."""
    return "test_bpb" if "test_bpb" in record else "test_accuracy"


def level_metrics(record: dict[str, Any], dense_accuracy: float | None,
                  peers: dict[str, float]) -> dict[str, float]:
    """Parent-run metrics (step = record's level) that one finished child adds.

    dense_accuracy: the replicate's dense test accuracy, repeated at every level as the
    baseline line; peers: test accuracy of the other variants finished at the same level.
    """
    key = quality_key(record)
    # bits per byte: lower is better, so the gap is random minus ticket (positive: ticket wins)
    prefix, sign, gap = (("bpb", -1.0, "bpb/random_reinit_minus_ticket") if key == "test_bpb"
                         else ("accuracy", 1.0, GAP_KEY))
    variant, acc = record["variant"], record.get(key)
    out: dict[str, float] = {}
    if isinstance(acc, (int, float)):
        out[accuracy_key(variant, prefix)] = float(acc)
    if variant in ("dense", "ticket"):
        out["weights/sparsity"] = float(record["sparsity"])
        out["weights/density"] = float(record["density"])
    if variant == "ticket" and dense_accuracy is not None:
        out[accuracy_key("dense", prefix)] = float(dense_accuracy)
    if variant == "random_reinit" and "ticket" in peers and acc is not None:
        out[gap] = sign * (float(peers["ticket"]) - float(acc))
    elif variant == "ticket" and "random_reinit" in peers and acc is not None:
        out[gap] = sign * (float(acc) - float(peers["random_reinit"]))
    return out


def best_speedups(results: list[dict[str, Any]],
                  serving: dict[str, Any] | None = None) -> dict[str, float]:
    """`speedup/batch_<n>`: the speedup of what ships (the serving plan's, when there is
    one), else the best checked (correct) format's that is not a dense baseline."""
    from ticketsmith.serving.formats import BASELINES

    if serving and any(serving.get("speedup", {}).values()):
        return {f"speedup/batch_{b}": float(s) for b, s in serving["speedup"].items() if s}
    best: dict[str, float] = {}
    for row in results:
        if row.get("correct") and row.get("speedup") and row["format"] not in BASELINES:
            key = f"speedup/batch_{row['batch_size']}"
            best[key] = max(best.get(key, 0.0), float(row["speedup"]))
    return best


def lm_level_series(result: dict[str, Any]) -> dict[str, float]:
    """A language-model level's point of the parent's tokens/s, speedup and cost series: the
    format it serves per batch size (`serving.lm_levels.served`), dense beside it."""
    from ticketsmith.serving.lm_levels import dense_row, served

    out: dict[str, float] = {}
    for bs in sorted({r["batch_size"] for r in result["results"]}):
        row, dense = served(result, bs), dense_row(result, bs)
        if row is None or dense is None:
            continue
        out.update({f"tokens_per_s/decode_batch_{bs}": row["decode_tokens_per_s"],
                    f"tokens_per_s/prefill_batch_{bs}": row["prefill_tokens_per_s"],
                    f"speedup/decode_batch_{bs}": row["decode_speedup"]["median"],
                    f"speedup/prefill_batch_{bs}": row["prefill_speedup"]["median"],
                    f"usd_per_m_tokens/decode_batch_{bs}": row["usd_per_million_tokens"],
                    f"usd_per_m_tokens/dense_decode_batch_{bs}": dense["usd_per_million_tokens"]})
    return out


def experiment_description(cfg: Any) -> str:
    """Markdown description of the MLflow experiment: the protocol and where to look."""
    p = cfg.prune
    rewind = (f"iteration {p.rewind_iteration} (late rewinding)" if p.rewind_iteration
              else "the original initialisation")
    variants = ", ".join(v.replace("_", " ") for v in cfg.experiment.variants)
    task = ("language model; quality in bits per byte, lower is better"
            if getattr(cfg, "task", "") == "language_model" else "image classifier")
    return (f"**Lottery ticket experiment** — {cfg.model.name} on {cfg.data.name} ({task}). "
            f"{p.schedule.capitalize()} magnitude pruning ({p.scope}) removes {p.fraction:.0%} of "
            f"the remaining weights per level; survivors rewind to {rewind}. Variants: {variants}, "
            f"against the dense network (level 0).\n\n"
            "Each top-level run is one replicate: its **Model metrics** tab shows ticket against "
            "random re-init over the pruning levels (step = level), and its artifacts hold the "
            "executive report (`report/executive_summary.html`). Nested runs are one "
            "(level, variant) each; filter them on `params.variant`.")


def replicate_description(name: str, exp_hash: str, replicate: int) -> str:
    """Parent-run description until the executive report replaces it with the answer."""
    return (f"Replicate {replicate} of {name} ({exp_hash}). Model metrics: test accuracy of the "
            "ticket against random re-init and dense over the pruning levels (step = level).")


def ui_link(tracking_uri: str, experiment_id: str) -> str:
    """Where to look: the experiment's runs in the MLflow UI, opened in training mode."""
    page = f"#/experiments/{experiment_id}?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    return f"`mlflow ui --backend-store-uri {tracking_uri}`, then http://127.0.0.1:5000/{page}"


def figure_markdown(run_id: str, path: str, caption: str) -> str:
    """A run artifact image in a description; the UI resolves `get-artifact` on its server."""
    return f"![{caption}](get-artifact?path={path}&run_uuid={run_id})"
