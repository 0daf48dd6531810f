"""The serving benchmark's side of MLflow: checkpoints named by MLflow URIs, and benchmark
results logged to a run. `ticketsmith.serving` works on local files only.

    BENCHMARK_ARTIFACT  where a run holds its benchmark JSON (written by `ticketsmith
                        benchmark --log-mlflow` and the prune pipeline, read by the report)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ticketsmith.base.errors import CheckpointError
from ticketsmith.base.secrets import redact
from ticketsmith.engine.store import BENCHMARK_FILE

BENCHMARK_DIR = "benchmark"
BENCHMARK_ARTIFACT = f"{BENCHMARK_DIR}/{BENCHMARK_FILE}"


def resolve_checkpoint(uri: str | Path) -> Path:
    """A local path as is; `runs:/`, `models:/` or any other MLflow URI downloaded first.

    A downloaded directory (e.g. a logged pyfunc model) must hold exactly one
    `checkpoint.safetensors`, found recursively.
    """
    text = str(uri)
    if "://" not in text and not text.startswith(("runs:/", "models:/")):
        return Path(text)
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text))
    except (MlflowException, OSError) as exc:
        raise CheckpointError(f"{redact(text)}: cannot download "
                              f"({redact(str(exc).splitlines()[0])})") from None
    if local.is_file():
        return local
    found = sorted(local.rglob("checkpoint.safetensors"))
    if len(found) != 1:
        raise CheckpointError(f"{text}: expected one checkpoint.safetensors in the artifacts, "
                              f"found {len(found)}")
    return found[0]


def metric_key(text: str) -> str:
    """`text` with characters MLflow refuses in metric names replaced by '_'."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in text)


def log_benchmark(result: dict[str, Any], artifact_file: str = BENCHMARK_ARTIFACT) -> None:
    """Log speedups, latencies, accuracies (a language model: tokens/s, speedups, $ per
    million tokens, as `lm_child_metrics`) and the JSON to the active MLflow run."""
    import mlflow

    if result.get("kind") == "language_model":
        mlflow.log_metrics(lm_child_metrics(result))
        mlflow.log_dict(result, artifact_file)
        return
    metrics = {}
    for r in result["results"]:
        key = metric_key(f"{r['format']}_bs{r['batch_size']}")
        if r["correct"]:
            metrics.update({f"speedup_{key}": r["speedup"],
                            f"ideal_speedup_{key}": r["ideal_speedup"],
                            f"latency_p50_ms_{key}": r["latency_ms"]["p50"],
                            f"throughput_{key}": r["throughput"]})
        if r["accuracy"] is not None:
            metrics[f"accuracy_{metric_key(r['format'])}"] = r["accuracy"]
    metrics.update({f"plan_speedup_bs{b}": s for b, s in result["plan"]["speedup"].items()
                    if s is not None})
    mlflow.log_metrics(metrics)
    mlflow.log_dict(result, artifact_file)


def lm_child_metrics(result: dict[str, Any]) -> dict[str, float]:
    """A level's language-model benchmark as child-run metrics, per exact format and batch:
    tokens/s (prefill, decode), speedups vs dense, time to first token and p99 per-token
    latency (ms), dollars per million generated tokens. The `speedup_` keys are what the
    report looks for before it reads `BENCHMARK_ARTIFACT`."""
    out: dict[str, float] = {}
    for r in result["results"]:
        key = metric_key(f"{r['format']}_bs{r['batch_size']}")
        out.update({f"speedup_decode_{key}": r["decode_speedup"]["median"],
                    f"speedup_prefill_{key}": r["prefill_speedup"]["median"],
                    f"decode_tokens_per_s_{key}": r["decode_tokens_per_s"],
                    f"prefill_tokens_per_s_{key}": r["prefill_tokens_per_s"],
                    f"ttft_ms_{key}": r["ttft_ms"],
                    f"token_latency_p99_ms_{key}": r["token_latency_ms"]["p99"],
                    f"usd_per_m_tokens_{key}": r["usd_per_million_tokens"]})
    return out
