"""`ticketsmith benchmark`: the serving scorecard of one ticket against its dense baseline.
Parses arguments and calls `ticketsmith.serving.benchmark`."""
from __future__ import annotations

import argparse
import os

from ticketsmith.base.errors import ConfigError
from ticketsmith.engine.store import BENCHMARK_FILE
from ticketsmith.serving.plan.layout import HEADLINE_BATCH_SIZES

HEADLINE = ",".join(map(str, HEADLINE_BATCH_SIZES))


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint.safetensors path, runs:/<run id>/<path>, "
                        "models:/<name>@<alias> or any MLflow artifact URI")
    p.add_argument("--batch-sizes", default=HEADLINE,
                   help=f"comma-separated (default {HEADLINE}; 1,8 for a language model)")
    p.add_argument("--formats", default=None,
                   help="comma-separated serving formats (default: all that run on the device)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for every runtime, dense and formats alike (default: all cores, "
                        "as in the prune pipeline)")
    p.add_argument("--trials", type=int, default=None, help="interleaved timing rounds")
    p.add_argument("--quick", action="store_true", help="few, short rounds (seconds per model)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--output", default=BENCHMARK_FILE, help="where to write the JSON")
    p.add_argument("--plan-dir", default=None,
                   help="also write the checked serving plan (a folder) there; for a language "
                        "model, its routes per phase and batch size are printed in one line")
    p.add_argument("--data-root", default="data", help="data folder for test accuracies")
    p.add_argument("--no-data", action="store_true", help="skip accuracies (no data loaded)")
    p.add_argument("--max-accuracy-drop", type=float, default=1.0,
                   help="points a quantized format may lose against the masked model")
    p.add_argument("--allow-factory", action="store_true",
                   help="import the model factory named in the checkpoint's metadata")
    p.add_argument("--log-mlflow", action="store_true",
                   help="log to MLflow (a new run unless one is active)")
    lm = p.add_argument_group("language models (tokens per second)")
    lm.add_argument("--prompt-tokens", type=int, default=128,
                    help="prefill prompt length (default 128; at most half the context)")
    lm.add_argument("--new-tokens", type=int, default=128,
                    help="decoded tokens per request (default 128; cut to fit the context)")
    lm.add_argument("--dense-checkpoint", default=None,
                    help="the experiment's dense (level 0) checkpoint, path or URI: timed as "
                         "the baseline instead of the ticket's masked weights")
    lm.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: what a user waits; cpu: the thread's CPU time, which a loaded "
                         "machine's preemptions do not inflate (CPU only)")
    lm.add_argument("--node", choices=["cpu", "gpu"], default="cpu",
                    help="the instance whose list price turns tokens/s into dollars "
                         "(cpu: AWS c7i.large, gpu: AWS g5.xlarge; docs/serving.md)")
    lm.add_argument("--usd-per-hour", type=float, default=None,
                    help="instance price per hour instead of the --node default")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--batch-sizes: expected integers like {HEADLINE}, got {text!r}"
                          ) from None


def _log_mlflow(result: dict, checkpoint: str, requested: bool) -> None:
    import mlflow

    from ticketsmith.base.secrets import redact
    from ticketsmith.tracking.benchmarks import log_benchmark

    if mlflow.active_run() is not None:
        log_benchmark(result)
    elif requested or os.environ.get("MLFLOW_RUN_ID"):
        # Under `mlflow run -e benchmark`, start_run resumes the run MLflow created for us.
        with mlflow.start_run(run_name="benchmark",
                              tags={"ticketsmith.checkpoint": redact(checkpoint)}):
            log_benchmark(result)


def _positive(flag: str, value: float | None, low: float) -> None:
    if value is not None and value < low:
        raise ConfigError(f"{flag}: expected >= {low}, got {value}")


def _cmd_lm(args: argparse.Namespace, local) -> int:
    """A language-model checkpoint: tokens per second and dollars per million tokens."""
    from ticketsmith.serving.benchmark import write_benchmark
    from ticketsmith.serving.lm_benchmark import benchmark_lm_checkpoint, format_lm_scorecard

    for flag, value, low in (("--prompt-tokens", args.prompt_tokens, 1),
                             ("--new-tokens", args.new_tokens, 2),
                             ("--usd-per-hour", args.usd_per_hour, 0),
                             ("--trials", args.trials, 1)):
        _positive(flag, value, low)
    sizes = _ints(args.batch_sizes) if args.batch_sizes != HEADLINE else [1, 8]
    _positive("--batch-sizes", min(sizes, default=0), 1)
    from ticketsmith.base.secrets import redact
    from ticketsmith.tracking.benchmarks import resolve_checkpoint

    dense = resolve_checkpoint(args.dense_checkpoint) if args.dense_checkpoint else None
    result = benchmark_lm_checkpoint(
        local, threads=args.threads, allow_factory=args.allow_factory, dense_path=dense,
        device=args.device, batch_sizes=sizes, prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens, trials=args.trials or (2 if args.quick else 5),
        prefill_reps=1 if args.quick else 3,
        formats=args.formats.split(",") if args.formats else None,
        usd_per_hour=args.usd_per_hour, node=args.node,
        clock=args.clock)
    result["model"]["checkpoint"] = redact(args.checkpoint)
    if dense is not None:
        result["model"]["dense_checkpoint"] = redact(args.dense_checkpoint)
    print(format_lm_scorecard(result))
    if args.plan_dir:
        result["serving_plan"] = _lm_plan(args, local, sizes)
        print(f"serving plan {args.plan_dir}: {result['serving_plan']['line']}")
    print(f"wrote {write_benchmark(result, args.output)}")
    _log_mlflow(result, args.checkpoint, args.log_mlflow)
    return 0


def _lm_plan(args: argparse.Namespace, local, sizes: list[int]) -> dict:
    """The checked language-model plan in --plan-dir (built unless fresh for this
    checkpoint), measured at the benchmark's batch sizes and prompt length."""
    from ticketsmith.serving.lm_plan import LmPlanSettings, ensure_lm_plan, load_lm_plan
    from ticketsmith.serving.lm_plan.runtime import shipped_line

    quick = {"kernel_trials": 1, "kernel_block_s": 0.0005} if args.quick else {}
    settings = LmPlanSettings(batch_sizes=tuple(sizes), prompt_tokens=args.prompt_tokens,
                              new_tokens=min(args.new_tokens, 32),
                              trials=args.trials or (1 if args.quick else 3), **quick)
    folder = ensure_lm_plan(args.plan_dir, local, True if args.allow_factory else None,
                            threads=args.threads, settings=settings)
    runner = load_lm_plan(folder, threads=args.threads)
    return {"folder": str(folder), "line": shipped_line(runner), **runner.describe()}


def cmd_benchmark(args: argparse.Namespace) -> int:
    """Benchmark a ticket's serving formats against its dense baseline and print the scorecard."""
    from ticketsmith.serving.benchmark import benchmark_checkpoint, format_scorecard, write_benchmark
    from ticketsmith.serving.lm_load import is_checkpoint_of_lm
    from ticketsmith.tracking.benchmarks import resolve_checkpoint

    from ticketsmith.engine.train import resolve_device

    _ints(args.batch_sizes)  # a bad flag or device is reported before any download
    resolve_device(args.device)
    local = resolve_checkpoint(args.checkpoint)  # a URI is downloaded once, here
    if is_checkpoint_of_lm(local):
        return _cmd_lm(args, local)

    result = benchmark_checkpoint(
        local, source=args.checkpoint, batch_sizes=_ints(args.batch_sizes),
        formats=args.formats.split(",") if args.formats else None, threads=args.threads,
        trials=args.trials, quick=args.quick, device=args.device,
        data_root=None if args.no_data else args.data_root,
        allow_factory=args.allow_factory, max_accuracy_drop=args.max_accuracy_drop,
        plan_dir=args.plan_dir)
    print(format_scorecard(result))
    path = write_benchmark(result, args.output)
    print(f"wrote {path}")
    _log_mlflow(result, args.checkpoint, args.log_mlflow)
    return 0

