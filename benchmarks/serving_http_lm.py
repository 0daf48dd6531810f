"""Generated tokens per second over HTTP: the language-model champion against the dense model.

The sibling of serving_http.py for language-model tickets. Starts two real `mlflow models
serve --env-manager local` processes with one thread count: the champion
(`models:/NAME@champion`: its pyfunc decodes with the KV cache and serves a structured ticket
compacted) and the experiment's dense level-0 network (its checkpoint, found through the
champion's source run, logged as a language-model pyfunc in a scratch run of the
`ticketsmith-scratch` experiment, reused on the next call). One client sends each the same
request, `{"inputs": [PROMPT] * batch, "params": {"max_new_tokens": 128}}` (greedy, no stop
string, so every row decodes exactly 128 tokens), dense and champion interleaved round by
round in alternating order, so machine noise hits both. Then the same requests through
`mlflow.pyfunc.load_model(...).predict` in this process, interleaved the same way.

Per model and batch size it prints the request latency p50/p99 over HTTP, generated tokens/s
(batch x new tokens / request seconds) over HTTP and in-process, and the share of a request
that is the model; then the champion's speedup (dense median / champion median per round:
median and range over rounds) over HTTP beside the in-process one, the check that the
champion's HTTP answer is its in-process text, and the environment. --record writes the
figures as `serving.http.*` and `serving.pyfunc.*` tags on the champion's model version (keys
from `ticketsmith.tracking.serving_tags`, as serving_http.py does for images).

    python benchmarks/serving_http_lm.py [--tracking-uri sqlite:///mlflow.db] [--model-name NAME]
        [--threads 1] [--batch-sizes 1,8] [--new-tokens 128] [--rounds 5] [--requests 2]
        [--prompt TEXT] [--record] [--output FILE.json]

Ratios only; tests never assert on them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_http as http_bench  # noqa: E402  (the servers, client and champion lookup)

from ticketsmith.tracking.serving_tags import (HTTP, PYFUNC, figure_key,  # noqa: E402
                                               path_key, speedup_key)

MODELS = http_bench.MODELS
SCRATCH_NOTE = "dense baseline for benchmarks/serving_http_lm.py"
PROMPT = "The State of the Union is "


def dense_lm_model_uri(client, tracking_uri: str, run_id: str, allow_factory: str | None,
                       tokenizer: Path | None) -> str:
    """The dense run's checkpoint as a language-model pyfunc serving the masked model as
    trained, logged once in a scratch run (its own experiment) and reused after."""
    import mlflow

    from ticketsmith.tracking.benchmarks import resolve_checkpoint
    from ticketsmith.tracking.registry import log_language_model
    from ticketsmith.tracking.tracker import TAG

    exp = client.get_experiment_by_name(http_bench.SCRATCH)
    exp_id = exp.experiment_id if exp else client.create_experiment(http_bench.SCRATCH)
    flt = (f"tags.`{TAG}scratch_of` = '{run_id}' and tags.`{TAG}scratch` = '{SCRATCH_NOTE}' "
           "and attributes.status = 'FINISHED'")
    for run in client.search_runs([exp_id], flt, max_results=1):
        return run.data.tags[TAG + "model_uri"]
    checkpoint = resolve_checkpoint(f"runs:/{run_id}/run/checkpoint.safetensors")
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(experiment_id=exp_id, run_name=f"dense-lm-baseline-{run_id[:8]}",
                          tags={TAG + "scratch": SCRATCH_NOTE, TAG + "scratch_of": run_id}):
        info = log_language_model(checkpoint, allow_factory=allow_factory, fmt="masked_dense",
                                  tokenizer=tokenizer)
        mlflow.set_tag(TAG + "model_uri", info.model_uri)
    return info.model_uri


def check_decodes(name: str, model) -> None:
    """Refuse a version registered before the language-model signature: MLflow drops the
    params of a model whose signature declares none, so it would decode its default 64 tokens
    while tokens/s counted --new-tokens, and its pyfunc (the code copied in at registration)
    generates one prompt at a time without the KV cache: its speed is that code's, not the
    ticket's (measured: 0.22x dense at batch 1, 0.05x at batch 8)."""
    schema = model.metadata.get_params_schema()
    if schema is None or "max_new_tokens" not in {p.name for p in schema.params}:
        raise http_bench.Refused(
            f"--model-name: {name}'s signature declares no max_new_tokens: it was registered "
            "before the KV-cache pyfunc and measures that code, not the ticket; register it "
            "again")


def measure_batch(clients, models, body: bytes, prompts: list[str], new_tokens: int,
                  rounds: int, requests: int) -> dict[str, Any]:
    """HTTP rounds, then in-process rounds, each interleaved; tokens/s per model."""
    params = {"max_new_tokens": new_tokens}
    predict = {m: (lambda m=m: models[m].predict(prompts, params=params)) for m in MODELS}
    for m in MODELS:  # warm-up: first requests, lazy imports, allocator
        http_bench.burst(clients[m], body, 1)
        predict[m]()
    per_round = {path: {m: [] for m in MODELS} for path in ("http", "pyfunc")}
    latencies = {m: [] for m in MODELS}
    for r in range(rounds):
        for m in (MODELS if r % 2 == 0 else MODELS[::-1]):
            lat, _ = http_bench.burst(clients[m], body, requests)
            latencies[m] += lat
            per_round["http"][m].append(statistics.median(lat))
    answer = json.loads(clients["champion"][0].post(body)[1])["predictions"]
    for r in range(rounds):
        for m in (MODELS if r % 2 == 0 else MODELS[::-1]):
            per_round["pyfunc"][m].append(statistics.median(
                http_bench.timed_call(predict[m], requests)))
    if len(answer) != len(prompts):  # the tokens/s below count one row per prompt
        raise RuntimeError(f"the champion answered {len(answer)} rows to {len(prompts)} prompts")
    tokens = len(prompts) * new_tokens  # generated per request: no stop string, greedy
    out: dict[str, Any] = {"check": {"http_equals_pyfunc": answer == predict["champion"](),
                                     "rows": len(answer)}}
    for m in MODELS:
        http_s = statistics.median(per_round["http"][m])
        local_s = statistics.median(per_round["pyfunc"][m])
        p50, p99 = (float(np.percentile(latencies[m], q)) * 1e3 for q in (50, 99))
        out[m] = {"p50_ms": p50, "p99_ms": p99,
                  "http_tokens_per_s": tokens / http_s, "pyfunc_tokens_per_s": tokens / local_s,
                  "model_share": local_s / http_s}
    out["http_speedup"] = http_bench.ratio_summary(per_round["http"]["dense"],
                                                   per_round["http"]["champion"])
    out["pyfunc_speedup"] = http_bench.ratio_summary(per_round["pyfunc"]["dense"],
                                                     per_round["pyfunc"]["champion"])
    return out


def table(res: dict[str, Any]) -> str:
    s, env = res["settings"], res["environment"]
    lines = [f"{res['model']} v{res['version']} @champion ({res['champion']}) against the dense "
             f"level-0 network, served side by side by `mlflow models serve`; {s['threads']} "
             f"threads, {s['rounds']} rounds x {s['requests']} requests per model and batch "
             f"size, {s['new_tokens']} new tokens per row (greedy), prompt {s['prompt']!r}",
             f"{'batch':>5}  {'model':<9}{'p50 ms':>10}{'p99 ms':>10}{'HTTP tok/s':>12}"
             f"{'pyfunc tok/s':>14}{'model share':>13}"]
    for b, r in res["batches"].items():
        for m in MODELS:
            x = r[m]
            lines.append(f"{b:>5}  {m:<9}{x['p50_ms']:>10.1f}{x['p99_ms']:>10.1f}"
                         f"{x['http_tokens_per_s']:>12.1f}{x['pyfunc_tokens_per_s']:>14.1f}"
                         f"{x['model_share']:>13.0%}")
    lines += [f"speedup champion/dense in generated tokens/s, median (range) over "
              f"{s['rounds']} rounds:", f"{'batch':>5}  {'over HTTP':<24}pyfunc.predict in-process"]
    for b, r in res["batches"].items():
        h, p = (http_bench.ratio_text(r["http_speedup"]),
                http_bench.ratio_text(r["pyfunc_speedup"]))
        lines.append(f"{b:>5}  {h:<24}{p}")
    checks = "; ".join(f"batch {b}: " + ("same text" if r["check"]["http_equals_pyfunc"]
                                         else "TEXT DIFFERS") + f" ({r['check']['rows']} rows)"
                       for b, r in res["batches"].items())
    lines += [f"checked, the champion's HTTP answer against its in-process predict: {checks}",
              f"environment: {env['cpu']}, {env['cores']} cores, load average "
              f"{env['load_average']}, " + ", ".join(f"{k} {v}" for k, v in
                                                    env["versions"].items())
              + f", python {env['python']}"]
    return "\n".join(lines)


def tags_of(res: dict[str, Any]) -> dict[str, str]:
    """One tag per figure for the champion's version: per batch size the speedup in generated
    tokens/s over HTTP and through pyfunc.predict, the champion's HTTP latency (ms), tokens/s
    and model share, and dense's tokens/s beside them; how it was measured in one tag."""
    s, env = res["settings"], res["environment"]
    tags = {path_key("measured", HTTP): (
        f"{s['threads']} threads, {s['rounds']} rounds x {s['requests']} requests, "
        f"{s['new_tokens']} new tokens per row (greedy), {res['date']}, {env['cpu']} "
        f"({env['cores']} cores), load average {env['load_average']}")}
    for b, r in res["batches"].items():
        c, d = r["champion"], r["dense"]
        tags.update({speedup_key(b, HTTP): f"{r['http_speedup']['median']:.2f}",
                     speedup_key(b, PYFUNC): f"{r['pyfunc_speedup']['median']:.2f}",
                     figure_key("p50_ms", b, HTTP): f"{c['p50_ms']:.1f}",
                     figure_key("p99_ms", b, HTTP): f"{c['p99_ms']:.1f}",
                     figure_key("tokens_per_s", b, HTTP): f"{c['http_tokens_per_s']:.0f}",
                     figure_key("dense_tokens_per_s", b, HTTP): f"{d['http_tokens_per_s']:.0f}",
                     figure_key("tokens_per_s", b, PYFUNC): f"{c['pyfunc_tokens_per_s']:.0f}",
                     figure_key("dense_tokens_per_s", b, PYFUNC):
                         f"{d['pyfunc_tokens_per_s']:.0f}",
                     figure_key("model_share", b, HTTP): f"{c['model_share']:.2f}"})
    return tags


def run(args: argparse.Namespace) -> dict[str, Any]:
    import mlflow
    import torch
    from mlflow import MlflowClient

    from ticketsmith.base.environment import cpu_model

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    mlflow.set_tracking_uri(args.tracking_uri)
    client = MlflowClient(args.tracking_uri)
    mv = http_bench.find_champion(client, args.model_name)
    if mv.tags.get("task") != "language_model":
        raise http_bench.Refused(f"--model-name: {mv.name} is not a language model "
                                 "(benchmarks/serving_http.py serves image models)")
    uris = {"champion": f"models:/{mv.name}@champion"}
    torch.set_num_threads(args.threads)
    config = {"threads": args.threads}
    models = {"champion": mlflow.pyfunc.load_model(uris["champion"], model_config=config)}
    champ_cfg = models["champion"].model_config or {}
    tokenizer = champion_tokenizer(uris["champion"])
    uris["dense"] = dense_lm_model_uri(client, args.tracking_uri,
                                       http_bench.dense_run(client, mv),
                                       champ_cfg.get("allow_factory"), tokenizer)
    models["dense"] = mlflow.pyfunc.load_model(uris["dense"], model_config=config)
    for m in MODELS:
        check_decodes(uris[m], models[m])
    with tempfile.TemporaryDirectory(prefix="serving_http_lm-") as logs:
        ports = {m: http_bench.free_port() for m in MODELS}
        procs = {m: http_bench.serve(uris[m], ports[m], args.tracking_uri, args.threads,
                                     Path(logs) / m) for m in MODELS}
        try:
            for m in MODELS:
                http_bench.wait_ready(ports[m], procs[m], Path(logs) / m)
            clients = {m: [http_bench.Client(ports[m])] for m in MODELS}
            batches = {}
            for b in sizes:
                prompts = [args.prompt] * b
                body = json.dumps({"inputs": prompts,
                                   "params": {"max_new_tokens": args.new_tokens}}).encode()
                batches[str(b)] = measure_batch(clients, models, body, prompts,
                                                args.new_tokens, args.rounds, args.requests)
        finally:
            for proc in procs.values():
                http_bench.stop_server(proc)
    return {"model": mv.name, "version": mv.version, "champion": mv.tags.get("serving.format"),
            "dense_model": uris["dense"], "date": datetime.date.today().isoformat(),
            "batches": batches,
            "settings": {"threads": args.threads, "rounds": args.rounds,
                         "requests": args.requests, "new_tokens": args.new_tokens,
                         "prompt": args.prompt},
            "environment": {"cpu": cpu_model(), "cores": os.cpu_count(),
                            "load_average": " ".join(f"{v:.2f}" for v in os.getloadavg()),
                            "versions": http_bench.versions(), "python": sys.version.split()[0]}}


def champion_tokenizer(model_uri: str) -> Path | None:
    """The champion's tokenizer folder (an artifact of its model), for the dense baseline."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    found = [p for p in local.rglob("tokenizer") if p.is_dir()]
    return found[0] if found else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI")
                   or "sqlite:///mlflow.db", help="the experiment's store")
    p.add_argument("--model-name", help="registered model (default: the newest with a champion)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per server and "
                   "in-process (default 1: a shared machine)")
    p.add_argument("--batch-sizes", default="1,8", help="prompts per request")
    p.add_argument("--new-tokens", type=int, default=128, help="generated tokens per prompt")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per batch size")
    p.add_argument("--requests", type=int, default=2, help="requests per model and round")
    p.add_argument("--prompt", default=PROMPT, help="the text every row continues")
    p.add_argument("--record", action="store_true", help="write the figures as tags on the "
                   "champion's model version")
    p.add_argument("--output", help="write the figures as JSON here")
    args = p.parse_args(argv)
    if min(args.rounds, args.requests, args.threads, args.new_tokens) < 1 or not args.prompt:
        print("serving_http_lm: --rounds, --requests, --threads and --new-tokens must be >= 1 "
              "and --prompt not empty", file=sys.stderr)
        return 2
    try:
        res = run(args)
    except http_bench.Refused as exc:
        print(f"serving_http_lm: {exc}", file=sys.stderr)
        return 2
    print(table(res))
    if args.record:
        http_bench.record(args.tracking_uri, res, tags_of(res))
    if args.output:
        Path(args.output).write_text(json.dumps(res, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
