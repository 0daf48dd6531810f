"""Serving over HTTP: the registered champion against the dense model, side by side.

Starts two real `mlflow models serve --env-manager local` processes on free localhost ports
with one thread count: the champion (`models:/NAME@champion`, which serves its checked serving
plan) and the experiment's dense level-0 network (its checkpoint, found through the champion's
source run, logged as a masked-dense pyfunc in a scratch run of the `ticketsmith-scratch`
experiment, reused on the next call). One client drives both with real MNIST test images as
uint8 JSON (`{"inputs": (N, 28, 28)}`), dense and champion interleaved round by round in
alternating order, so machine noise hits both. Per model and batch size it prints p50/p99
latency and throughput over HTTP, and splits a request into the model (the same payload
through `mlflow.pyfunc.load_model(...).predict` in this process) and the rest (HTTP, JSON and
MLflow's scoring server). Then the in-process pyfunc speedup, champion vs dense, median and
range over rounds, and the environment.

    python benchmarks/serving_http.py [--tracking-uri sqlite:///mlflow.db] [--model-name NAME]
        [--threads N] [--rounds 15] [--requests 10] [--batch-sizes 1,256] [--concurrency 1]
        [--record] [--output FILE.json]

Threads: each server gets OMP/MKL/OPENBLAS_NUM_THREADS (torch under the dense model, the BLAS
under the plan's numpy route); this process sets torch's and the BLAS's. The champion's ONNX
Runtime route runs at the thread count its plan was measured with (tag `serving.threads`),
printed beside. --record writes the figures as `serving.http.*` and `serving.pyfunc.*` tags on
the champion's model version. Ratios only; tests never assert on them.
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ticketsmith.base.processes import start_group, stop_group
from ticketsmith.serving.plan.layout import HEADLINE_BATCH_SIZES
from ticketsmith.tracking.serving_tags import (FORMAT, HTTP, PYFUNC, THREADS, figure_key,
                                               path_key, speedup_key)

REPO = Path(__file__).resolve().parents[1]
CHAMPION = "champion"
SCRATCH = "ticketsmith-scratch"
MODELS = ("dense", "champion")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
START_TIMEOUT_S = 300.0  # one server start (imports, model download); a hang is a finding
# issue 12: champion pyfunc.predict vs the dense model's, at each headline batch size
TARGETS = dict(zip(HEADLINE_BATCH_SIZES, (1.5, 4.0)))


class Refused(Exception):
    """Bad input (no such store, model or champion): one line, exit 2."""


# --- what is served ------------------------------------------------------------------------------

def test_images(data_root: str | Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n MNIST test images as a user has them: uint8 (n, 28, 28), and their labels."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    from ticketsmith.engine.data import ensure_mnist

    raw, _ = ensure_mnist(data_root)
    images = read_image_file(str(raw / "t10k-images-idx3-ubyte"))[:n].numpy()
    return images, read_label_file(str(raw / "t10k-labels-idx1-ubyte"))[:n].numpy()


def find_champion(client, name: str | None = None):
    """The champion's model version of `name`; default the newest registered TicketSmith model
    (a version with gate tags) that has one."""
    from mlflow.exceptions import MlflowException

    names = [name] if name else [m.name for m in client.search_registered_models(
        order_by=["last_updated_timestamp DESC"])]
    for n in names:
        try:
            mv = client.get_model_version_by_alias(n, CHAMPION)
        except MlflowException:
            continue
        if "quality_gate" in mv.tags:
            return mv
    raise Refused(f"--model-name: {name or 'no registered TicketSmith model'} has no "
                  f"@{CHAMPION} in {client.tracking_uri}")


def dense_run(client, mv) -> str:
    """The run id of the dense level-0 network of the champion's experiment and replicate."""
    from ticketsmith.tracking.tracker import TAG

    run = client.get_run(mv.run_id)
    tags = run.data.tags
    flt = (f"tags.`{TAG}hash` = '{tags[TAG + 'hash']}' and tags.`{TAG}replicate` = "
           f"'{tags[TAG + 'replicate']}' and tags.`{TAG}level` = '0' and "
           f"tags.`{TAG}variant` = 'dense' and attributes.status = 'FINISHED'")
    found = client.search_runs([run.info.experiment_id], flt, max_results=1)
    if not found:
        raise Refused(f"{mv.name} v{mv.version}: no finished dense level-0 run beside its source "
                      f"run {mv.run_id}")
    return found[0].info.run_id


def dense_model_uri(client, tracking_uri: str, run_id: str, allow_factory: str | None) -> str:
    """The dense run's checkpoint as a masked-dense pyfunc, logged once in a scratch run (an
    experiment of its own, so no experiment's runs or report see it) and reused after."""
    import mlflow

    from ticketsmith.tracking.benchmarks import resolve_checkpoint
    from ticketsmith.tracking.registry import log_ticket_model
    from ticketsmith.tracking.tracker import TAG

    exp = client.get_experiment_by_name(SCRATCH)
    exp_id = exp.experiment_id if exp else client.create_experiment(SCRATCH, tags={
        "mlflow.note.content": "Scratch models logged by benchmarks (e.g. the dense baseline "
                               "of benchmarks/serving_http.py); not experiment results."})
    flt = f"tags.`{TAG}scratch_of` = '{run_id}' and attributes.status = 'FINISHED'"
    for run in client.search_runs([exp_id], flt, max_results=1):
        return run.data.tags[TAG + "model_uri"]
    checkpoint = resolve_checkpoint(f"runs:/{run_id}/run/checkpoint.safetensors")
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(experiment_id=exp_id, run_name=f"dense-baseline-{run_id[:8]}",
                          tags={TAG + "scratch": "dense baseline for benchmarks/serving_http.py",
                                TAG + "scratch_of": run_id}):
        info = log_ticket_model(checkpoint, None, allow_factory=allow_factory, fmt="masked_dense")
        mlflow.set_tag(TAG + "model_uri", info.model_uri)
    return info.model_uri


# --- servers -------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model_uri: str, port: int, tracking_uri: str, threads: int | None,
          log_path: Path) -> subprocess.Popen:
    """`mlflow models serve --env-manager local` in a session of its own (it runs uvicorn as a
    child: `stop_server` ends both). This interpreter's bin comes first on PATH, where MLflow
    looks for uvicorn."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           **({k: str(threads) for k in THREAD_VARS} if threads else {})}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "ab") as log:
        return start_group(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_ready(port: int, proc: subprocess.Popen, log_path: Path,
               timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll /ping until it answers 200; fail early, with the log's last line, if it died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (log_path.read_text(errors="replace").strip().splitlines() or [""])[-1]
            raise RuntimeError(f"mlflow models serve exited with {proc.returncode}: {tail}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/ping")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        try:  # the poll interval: wait on the process, not on the clock
            proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
    raise RuntimeError(f"port {port}: /ping did not answer within {timeout_s:.0f}s ({log_path})")


def stop_server(proc: subprocess.Popen) -> None:
    """End the server and its uvicorn child (its process group): SIGTERM, then SIGKILL for
    whatever is left after 20 s."""
    stop_group(proc)


class Client:
    """One keep-alive connection to a server's /invocations."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def post(self, body: bytes) -> tuple[float, bytes]:
        """(seconds from send to the last byte of the answer, the answer). A connection the
        server closed while idle (uvicorn's keep-alive timeout, 5 s) is opened again."""
        try:
            return self._post(body)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            self.conn.close()
            return self._post(body)

    def _post(self, body: bytes) -> tuple[float, bytes]:
        t = time.perf_counter()
        self.conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        data = resp.read()
        seconds = time.perf_counter() - t
        if resp.status != 200:
            raise RuntimeError(f"/invocations answered {resp.status}: {data[:300]!r}")
        return seconds, data


# --- measuring -----------------------------------------------------------------------------------

def burst(clients: list[Client], body: bytes, n: int) -> tuple[list[float], float]:
    """n requests spread over the clients, in parallel: (latencies s, wall-clock s)."""
    share = [n // len(clients) + (i < n % len(clients)) for i in range(len(clients))]

    def run(i: int) -> list[float]:
        return [clients[i].post(body)[0] for _ in range(share[i])]

    t = time.perf_counter()
    if len(clients) == 1:
        lat = run(0)
    else:
        with ThreadPoolExecutor(len(clients)) as pool:
            lat = [s for part in pool.map(run, range(len(clients))) for s in part]
    return lat, time.perf_counter() - t


def timed_call(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def timed(model, x: np.ndarray, n: int) -> list[float]:
    return timed_call(lambda: model.predict(x), n)


def ratio_summary(dense: list[float], champion: list[float]) -> dict[str, float]:
    """Champion speedup per round (dense median / champion median): median and range."""
    r = [d / c for d, c in zip(dense, champion)]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def ratio_text(x: dict[str, float]) -> str:
    """A `ratio_summary` as the tables print it: "1.23x (1.10-1.40)"."""
    return f"{x['median']:.2f}x ({x['min']:.2f}-{x['max']:.2f})"


def check(clients: dict[str, list[Client]], models: dict[str, Any], body: bytes,
          x: np.ndarray) -> dict[str, float]:
    """The champion's HTTP answer against its in-process predict on the same payload; the
    argmax agreement as a count too, so that 255 of 256 never reads as 100%."""
    got = np.asarray(json.loads(clients["champion"][0].post(body)[1])["predictions"])
    ref = models["champion"].predict(x)
    agreed = int((got.argmax(1) == ref.argmax(1)).sum())
    return {"max_abs_diff": float(np.abs(got - ref).max()), "agreed": agreed,
            "samples": len(ref), "argmax_agreement": agreed / len(ref)}


def stack_split(model, body: bytes, n: int) -> dict[str, float]:
    """Where the server's time goes, without the transport: MLflow's own `invocations()` on
    the body in this process, and each of its steps timed alone (ms, medians of n): decoding
    the JSON, the deep copy MLflow's input parsing makes of the decoded lists
    (`proto_json_utils._cast_schema_type`), the array, the model, the answer's JSON."""
    import copy
    import io

    from mlflow.pyfunc import scoring_server

    data = json.loads(body)["inputs"]
    x = np.array(data)
    y = model.predict(x)
    steps = {"invocations": lambda: scoring_server.invocations(body, "application/json",
                                                               model, None),
             "json_decode": lambda: json.loads(body), "deepcopy": lambda: copy.deepcopy(data),
             "array": lambda: np.array(data), "predict": lambda: model.predict(x),
             "answer_json": lambda: scoring_server.predictions_to_json(y, io.StringIO())}
    return {k: statistics.median(timed_call(f, n)) * 1e3 for k, f in steps.items()}


def measure_batch(clients, models, body: bytes, x: np.ndarray, rounds: int,
                  requests: int) -> dict[str, Any]:
    """HTTP rounds, then in-process rounds (apart: a process's spinning OpenMP threads after
    in-process calls would otherwise slow the server's next request), each interleaved."""
    for m in MODELS:  # warm-up: first requests, lazy imports, allocator
        burst(clients[m], body, 2)
        timed(models[m], x, 2)
    http = {m: {"lat": [], "wall": 0.0, "rounds": []} for m in MODELS}
    local = {m: {"lat": [], "rounds": []} for m in MODELS}
    for r in range(rounds):
        for m in (MODELS if r % 2 == 0 else MODELS[::-1]):
            lat, wall = burst(clients[m], body, requests)
            http[m]["lat"] += lat
            http[m]["wall"] += wall
            http[m]["rounds"].append(statistics.median(lat))
    out: dict[str, Any] = {"check": check(clients, models, body, x)}
    for r in range(rounds):
        for m in (MODELS if r % 2 == 0 else MODELS[::-1]):
            lat = timed(models[m], x, requests)
            local[m]["lat"] += lat
            local[m]["rounds"].append(statistics.median(lat))
    for m in MODELS:
        p50, p99 = (float(np.percentile(http[m]["lat"], q)) * 1e3 for q in (50, 99))
        model_ms = statistics.median(local[m]["lat"]) * 1e3
        out[m] = {"p50_ms": p50, "p99_ms": p99,
                  "images_per_s": len(x) * len(http[m]["lat"]) / http[m]["wall"],
                  "model_ms": model_ms, "stack_ms": p50 - model_ms, "model_share": model_ms / p50}
    out["stack"] = stack_split(models["champion"], body, max(3, requests))
    out["http_speedup"] = ratio_summary(http["dense"]["rounds"], http["champion"]["rounds"])
    out["pyfunc_speedup"] = ratio_summary(local["dense"]["rounds"], local["champion"]["rounds"])
    return out


# --- reporting -----------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("mlflow", "torch", "numpy", "scipy", "onnxruntime", "uvicorn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def table(res: dict[str, Any]) -> str:
    s = res["settings"]
    lines = [f"{res['model']} v{res['version']} @{CHAMPION} ({res['champion']}) against the "
             f"dense level-0 network, served side by side by `mlflow models serve`; {s['threads']} "
             f"threads, concurrency {s['concurrency']}, {s['rounds']} rounds x {s['requests']} "
             "requests per model and batch size, uint8 MNIST test images as JSON",
             f"{'batch':>5}  {'model':<9}{'p50 ms':>9}{'p99 ms':>9}{'images/s':>10}"
             f"{'model ms':>10}{'HTTP+JSON ms':>14}{'model share':>13}"]
    for b, r in res["batches"].items():
        for m in MODELS:
            x = r[m]
            lines.append(f"{b:>5}  {m:<9}{x['p50_ms']:>9.2f}{x['p99_ms']:>9.2f}"
                         f"{x['images_per_s']:>10.0f}{x['model_ms']:>10.2f}"
                         f"{x['stack_ms']:>14.2f}{x['model_share']:>13.0%}")
    lines += [f"speedup champion/dense, median (range) over {s['rounds']} rounds:",
              f"{'batch':>5}  {'over HTTP':<24}{'pyfunc.predict in-process':<28}target"]
    for b, r in res["batches"].items():
        h, p = ratio_text(r["http_speedup"]), ratio_text(r["pyfunc_speedup"])
        target = f">= {TARGETS[int(b)]}x" if int(b) in TARGETS else ""
        lines.append(f"{b:>5}  {h:<24}{p:<28}{target}")
    checks = "; ".join(f"batch {b}: max |diff| {r['check']['max_abs_diff']:.2g}, argmax "
                       f"agreement {r['check']['agreed']}/{r['check']['samples']}"
                       for b, r in res["batches"].items())
    lines.append("the champion's request inside MLflow's scoring server, in this process "
                 "(ms; the steps timed alone):")
    for b, r in res["batches"].items():
        st = r["stack"]
        lines.append(f"{b:>5}  invocations() {st['invocations']:.2f} = JSON decode "
                     f"{st['json_decode']:.2f} + deep copy of the decoded lists "
                     f"{st['deepcopy']:.2f} + np.array {st['array']:.2f} + predict "
                     f"{st['predict']:.2f} + answer to JSON {st['answer_json']:.2f} + rest")
    env = res["environment"]
    lines += [f"checked, the champion's HTTP answers against its in-process predict: {checks}",
              f"environment: {env['cpu']}, {env['cores']} cores, {s['threads']} threads (champion "
              f"plan: {res['plan_threads']}), load average {env['load_average']}, "
              + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
              + f", python {env['python']}"]
    return "\n".join(lines)


def tags_of(res: dict[str, Any]) -> dict[str, str]:
    """One tag per figure for the champion's version (the report reads them)."""
    s, env = res["settings"], res["environment"]
    tags = {path_key("measured", HTTP): (
        f"{s['threads']} threads, concurrency {s['concurrency']}, {s['rounds']} rounds x "
        f"{s['requests']} requests, {res['date']}, {env['cpu']} ({env['cores']} cores), "
        f"load average {env['load_average']}")}
    for b, r in res["batches"].items():
        c = r["champion"]
        tags.update({speedup_key(b, HTTP): f"{r['http_speedup']['median']:.2f}",
                     figure_key("p50_ms", b, HTTP): f"{c['p50_ms']:.2f}",
                     figure_key("p99_ms", b, HTTP): f"{c['p99_ms']:.2f}",
                     figure_key("images_per_s", b, HTTP): f"{c['images_per_s']:.0f}",
                     figure_key("model_share", b, HTTP): f"{c['model_share']:.2f}",
                     figure_key("dense_p50_ms", b, HTTP): f"{r['dense']['p50_ms']:.2f}",
                     speedup_key(b, PYFUNC): f"{r['pyfunc_speedup']['median']:.2f}"})
    return tags


def record(tracking_uri: str, res: dict[str, Any], tags: dict[str, str]) -> None:
    """Write the figures as tags on the champion's model version (`--record`)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    for k, v in tags.items():
        client.set_model_version_tag(res["model"], res["version"], k, v)
    print(f"recorded: {len(tags)} serving.http/pyfunc tags on {res['model']} v{res['version']}")


# --- the run -------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict[str, Any]:
    import mlflow
    import torch
    from mlflow import MlflowClient
    from threadpoolctl import threadpool_limits

    from ticketsmith.base.environment import cpu_model
    from ticketsmith.serving.plan.layout import default_threads

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    threads = args.threads or default_threads()
    mlflow.set_tracking_uri(args.tracking_uri)
    client = MlflowClient(args.tracking_uri)
    mv = find_champion(client, args.model_name)
    uris = {"champion": f"models:/{mv.name}@{CHAMPION}"}
    torch.set_num_threads(threads)
    with threadpool_limits(limits=threads, user_api="blas"), \
            tempfile.TemporaryDirectory(prefix="serving_http-") as logs:
        models = {"champion": mlflow.pyfunc.load_model(uris["champion"])}
        allow = (models["champion"].model_config or {}).get("allow_factory")
        uris["dense"] = dense_model_uri(client, args.tracking_uri, dense_run(client, mv), allow)
        models["dense"] = mlflow.pyfunc.load_model(uris["dense"])
        images, _ = test_images(args.data_root, max(sizes))
        ports = {m: free_port() for m in MODELS}
        procs = {m: serve(uris[m], ports[m], args.tracking_uri, threads, Path(logs) / m)
                 for m in MODELS}
        try:
            for m in MODELS:
                wait_ready(ports[m], procs[m], Path(logs) / m)
            clients = {m: [Client(ports[m]) for _ in range(args.concurrency)] for m in MODELS}
            batches = {}
            for b in sizes:
                body = json.dumps({"inputs": images[:b].tolist()}).encode()
                x = np.asarray(json.loads(body)["inputs"])  # what the server parses: int64
                batches[str(b)] = measure_batch(clients, models, body, x, args.rounds,
                                                args.requests)
        finally:
            for proc in procs.values():
                stop_server(proc)
    return {"model": mv.name, "version": mv.version, "champion": mv.tags.get(FORMAT),
            "plan_threads": mv.tags.get(THREADS), "dense_model": uris["dense"],
            "date": datetime.date.today().isoformat(), "batches": batches,
            "settings": {"threads": threads, "concurrency": args.concurrency,
                         "rounds": args.rounds, "requests": args.requests},
            "environment": {"cpu": cpu_model(), "cores": os.cpu_count(),
                            "load_average": " ".join(f"{v:.2f}" for v in os.getloadavg()),
                            "versions": versions(), "python": sys.version.split()[0]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI")
                   or "sqlite:///mlflow.db", help="the experiment's store")
    p.add_argument("--model-name", help="registered model (default: the newest with a champion)")
    p.add_argument("--data-root", default=str(REPO / "data"), help="MNIST folder")
    p.add_argument("--threads", type=int, help="threads per server and in-process "
                   "(default: all cores)")
    p.add_argument("--batch-sizes", default=",".join(map(str, HEADLINE_BATCH_SIZES)),
                   help="comma-separated (default: the headline batch sizes, %(default)s)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per batch size")
    p.add_argument("--requests", type=int, default=10, help="requests per model and round")
    p.add_argument("--concurrency", type=int, default=1, help="parallel keep-alive connections")
    p.add_argument("--record", action="store_true", help="write the figures as tags on the "
                   "champion's model version")
    p.add_argument("--output", help="write the figures as JSON here")
    args = p.parse_args(argv)
    if min(args.rounds, args.requests, args.concurrency) < 1:
        print("serving_http: --rounds, --requests and --concurrency must be >= 1", file=sys.stderr)
        return 2
    try:
        res = run(args)
    except Refused as exc:
        print(f"serving_http: {exc}", file=sys.stderr)
        return 2
    print(table(res))
    if args.record:
        record(args.tracking_uri, res, tags_of(res))
    if args.output:
        Path(args.output).write_text(json.dumps(res, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
