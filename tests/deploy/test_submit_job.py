"""scripts/submit_job.py: manifests, submission, waiting, log streaming and cancellation.

There is no Kubernetes cluster on this machine. The submit/wait/cancel logic is tested against
the official Kubernetes Python client running for real -- argument checking, URL building,
serialisation of the Job we send, deserialisation of what comes back -- down to urllib3, where
an in-memory fake API server answers the handful of endpoints the script uses. So a wrong
method name, a wrong keyword (e.g. propagation_policy), or a body the client cannot serialise
fails here as it would against a cluster; what the fake cannot show is the scheduler, the
kubelet and the garbage collector, whose contract (the propagation policy we send) is asserted
instead. Every manifest the script produces is validated against the Kubernetes OpenAPI schema.
"""
from __future__ import annotations

import importlib.util
import io
import json
import re
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes = pytest.importorskip("kubernetes")
kv = pytest.importorskip("kubernetes_validate")
from kubernetes import client as k8s  # noqa: E402
from urllib3 import HTTPResponse  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.33"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _load_script():
    spec = importlib.util.spec_from_file_location("submit_job", REPO / "scripts" / "submit_job.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["submit_job"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sj = _load_script()


# --- an in-memory API server behind the real client --------------------------------------

class FakeApiServer:
    """Answers the Kubernetes REST calls submit_job.py makes; records every request.

    `job_statuses` is returned, one per status read, the last one repeating; `pods` likewise
    (each entry: the pod list at that read); `logs` maps pod name to its log bytes.
    """

    def __init__(self, job_statuses=(), pods=(), logs=None, existing_jobs=()):
        self.job_statuses = list(job_statuses) or [{}]
        self.pod_lists = list(pods) or [[]]
        self.logs = logs or {}
        self.jobs: dict[str, dict] = {name: {"metadata": {"name": name}} for name in existing_jobs}
        self.configmaps: dict[str, dict] = {}
        self.requests: list[tuple[str, str, dict, Any]] = []
        self.status_reads = 0
        self.pod_reads = 0

    def calls(self, method: str, pattern: str) -> list[tuple[str, str, dict, Any]]:
        return [r for r in self.requests if r[0] == method and re.search(pattern, r[1])]

    def handle(self, method, url, fields=None, body=None):
        parsed = urllib.parse.urlparse(url)
        path = parsed.path
        query = dict(urllib.parse.parse_qsl(parsed.query))
        # GET parameters: encoded into the URL as urllib3 does it (urlencode).
        query.update(urllib.parse.parse_qsl(urllib.parse.urlencode(fields or [])))
        data = json.loads(body) if body else None
        self.requests.append((method, path, query, data))
        m = re.fullmatch(r"/apis/batch/v1/namespaces/([^/]+)/jobs(?:/([^/]+))?(/status)?", path)
        if m:
            return self._jobs(method, m.group(1), m.group(2), bool(m.group(3)), data)
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/configmaps(?:/([^/]+))?", path)
        if m:
            return self._configmaps(method, m.group(1), m.group(2), data)
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log", path)
        if m and method == "GET":
            return 200, self.logs.get(m.group(2), b"")
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods", path)
        if m and method == "GET":
            items = self.pod_lists[min(self.pod_reads, len(self.pod_lists) - 1)]
            self.pod_reads += 1
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
        return 404, _status(404, "NotFound", f"no fake endpoint for {method} {path}")

    def _jobs(self, method, ns, name, status, data):
        if method == "POST" and name is None:
            name = data["metadata"]["name"]
            if name in self.jobs:
                return 409, _status(409, "AlreadyExists", f'jobs.batch "{name}" already exists')
            job = json.loads(json.dumps(data))
            job["metadata"].update(uid=f"uid-{name}", namespace=ns)
            self.jobs[name] = job
            return 201, job
        if name not in self.jobs:
            return 404, _status(404, "NotFound", f'jobs.batch "{name}" not found')
        if method == "GET" and status:
            job = dict(self.jobs[name])
            job["status"] = self.job_statuses[min(self.status_reads, len(self.job_statuses) - 1)]
            self.status_reads += 1
            return 200, job
        if method == "GET":
            return 200, self.jobs[name]
        if method == "DELETE":
            return 200, self.jobs.pop(name)
        return 405, _status(405, "MethodNotAllowed", method)

    def _configmaps(self, method, ns, name, data):
        if method == "POST":
            name = data["metadata"]["name"]
            if name in self.configmaps:
                return 409, _status(409, "AlreadyExists", f'configmaps "{name}" already exists')
            self.configmaps[name] = data
            return 201, data
        if name not in self.configmaps:
            return 404, _status(404, "NotFound", f'configmaps "{name}" not found')
        if method == "PATCH":
            self.configmaps[name]["metadata"].update(data["metadata"])
            return 200, self.configmaps[name]
        if method == "DELETE":
            self.configmaps.pop(name)
            return 200, _status(200, "Success", "deleted")
        return 405, _status(405, "MethodNotAllowed", method)


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure" if code >= 400 else "Success",
            "reason": reason, "message": message, "code": code}


class FakePoolManager:
    """Stands in for urllib3.PoolManager: the HTTP exchange, and only that, is faked."""

    def __init__(self, server: FakeApiServer):
        self.server = server

    def request(self, method, url, fields=None, body=None, preload_content=True, timeout=None,
                headers=None, **_):
        status, payload = self.server.handle(method, url, fields, body)
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return HTTPResponse(body=io.BytesIO(raw), status=status, preload_content=preload_content,
                            headers={"Content-Type": "application/json"}, reason="fake")


def apis_for(server: FakeApiServer) -> tuple[k8s.BatchV1Api, k8s.CoreV1Api]:
    conf = k8s.Configuration(host="https://kubernetes.invalid")
    api_client = k8s.ApiClient(conf)
    api_client.rest_client.pool_manager = FakePoolManager(server)
    return k8s.BatchV1Api(api_client), k8s.CoreV1Api(api_client)


def condition(kind: str, message: str = "") -> dict:
    return {"type": kind, "status": "True", "reason": kind, "message": message}


def pod(name: str, *, running=False, terminated=False, waiting: str | None = None,
        unschedulable=False) -> dict:
    state = {}
    if running:
        state = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
    elif terminated:
        state = {"terminated": {"exitCode": 0, "reason": "Completed"}}
    elif waiting:
        state = {"waiting": {"reason": waiting, "message": f"{waiting} details"}}
    status: dict[str, Any] = {"phase": "Running" if running else "Pending"}
    if state:
        status["containerStatuses"] = [{"name": "ticketsmith", "image": "img", "imageID": "",
                                        "ready": running, "restartCount": 0, "state": state}]
    if unschedulable:
        status["conditions"] = [{"type": "PodScheduled", "status": "False",
                                 "reason": "Unschedulable", "message": "0/3 nodes available"}]
    return {"metadata": {"name": name, "namespace": "ticketsmith"}, "status": status}


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


# --- helpers ------------------------------------------------------------------------------

def validate(doc: dict) -> None:
    kv.utils.validate(doc, K8S_VERSION, strict=True)


def run_main(argv: list[str], apis=None) -> tuple[int, str]:
    out = io.StringIO()
    code = sj.main(argv, apis=apis, out=out)
    return code, out.getvalue()


TINY = str(REPO / "configs" / "tiny.yaml")
IMAGE = "europe-west4-docker.pkg.dev/p/ticketsmith/ticketsmith:0123abc"


# --- manifests ----------------------------------------------------------------------------

@pytest.mark.parametrize("flavor", ["gpu", "gpu-spot", "cpu"])
def test_dry_run_prints_a_valid_job_and_configmap(flavor):
    from ticketsmith.base.config import load_config

    code, text = run_main(["--config", TINY, "--flavor", flavor, "--image", IMAGE,
                           "--set", "train.device=auto", "--set", "train.lr=0.02", "--dry-run"])
    assert code == 0
    configmap, job = list(yaml.safe_load_all(text))
    validate(configmap)
    validate(job)

    name = job["metadata"]["name"]
    assert DNS_LABEL.match(name) and len(name) <= 63
    assert configmap["metadata"]["name"] == name
    local = load_config(TINY, ["train.device=auto", "train.lr=0.02"])
    assert name.endswith(local.hash())
    assert job["metadata"]["labels"]["ticketsmith.io/hash"] == local.hash()

    # The pod runs exactly the validated config (same hash), from the ConfigMap.
    shipped = yaml.safe_load(configmap["data"]["config.yaml"])
    assert shipped["train"]["lr"] == 0.02 and shipped["experiment"]["output_dir"] == "runs"
    from ticketsmith.base.config import config_from_dict
    assert config_from_dict(shipped).hash() == local.hash()

    spec = job["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["image"] == IMAGE and "command" not in c  # keeps the image's tini entrypoint
    assert c["args"] == ["prune", "--config", "/etc/ticketsmith/config.yaml", "--quiet"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/ticketsmith")
    vol = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert vol["configMap"]["name"] == name

    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"] == {
        "name": "ticketsmith-tracking", "key": "uri"}  # required: never a pod-local SQLite
    assert all("value" not in e for e in c["env"] if "PASSWORD" in e["name"]
               or "CONNECTION_STRING" in e["name"])

    # The template's guardrails survive rendering.
    assert job["spec"]["activeDeadlineSeconds"] > 0 and job["spec"]["backoffLimit"] <= 2
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert gpus == ("1" if flavor.startswith("gpu") else None)


@pytest.mark.parametrize("flavor,gpu,pool,size", [
    ("gpu-spot", "t4", "gpu-spot", ("3", "10Gi")),
    ("gpu", "a100", "gpu", ("8", "48Gi")),
    ("gpu-spot", None, "gpu-spot", ("3", "10Gi")),
])
def test_spot_and_gpu_type_choose_the_pool_and_size_the_job(flavor, gpu, pool, size):
    argv = ["--config", TINY, "--flavor", flavor, "--image", IMAGE, "--set", "train.device=cuda",
            "--dry-run"] + (["--gpu", gpu] if gpu else [])
    code, text = run_main(argv)
    assert code == 0
    job = list(yaml.safe_load_all(text))[1]
    validate(job)
    spec = job["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"ticketsmith.io/pool": pool,
                                    **({"ticketsmith.io/gpu": gpu} if gpu else {})}
    res = spec["containers"][0]["resources"]
    assert (res["requests"]["cpu"], res["requests"]["memory"]) == size
    assert res["limits"]["memory"] == size[1] and res["limits"]["nvidia.com/gpu"] == "1"
    spot = any(t["key"] == "kubernetes.azure.com/scalesetpriority" for t in spec["tolerations"])
    assert spot == (flavor == "gpu-spot")
    assert job["spec"]["podFailurePolicy"]["rules"][-1] == {
        "action": "Count", "onExitCodes": {"operator": "In", "values": [143]}}


@pytest.mark.parametrize("argv,error", [
    (["--flavor", "gpu", "--gpu", "v100"], "--gpu 'v100': expected one of a10, a100, h100, h200, l4, t4"),
    (["--flavor", "cpu", "--gpu", "t4"], "--gpu needs a GPU flavor"),
])
def test_a_bad_gpu_type_is_a_one_line_error(argv, error, capsys):
    code, _ = run_main(["--config", TINY, "--image", IMAGE, "--set", "train.device=cuda",
                        "--dry-run", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and error in err[0], err


def test_dry_run_needs_no_cluster_and_no_credentials(monkeypatch):
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")
    monkeypatch.setattr(sj, "connect", lambda *_: pytest.fail("dry run must not connect"))
    code, _ = run_main(["--config", TINY, "--flavor", "cpu", "--image", IMAGE, "--dry-run"])
    assert code == 0


@pytest.mark.parametrize("experiment,levels,variants", [
    ("tiny", None, None),
    ("A Very_Long Experiment Name" * 4, (3, 12), ["ticket", "random_reinit", "random_prune"]),
    ("---", (0, 0), ["ticket"]),
])
def test_job_names_are_short_dns_labels_and_distinct_per_selection(experiment, levels, variants):
    name = sj.job_name(experiment, "0123456789ab", levels, variants)
    assert DNS_LABEL.match(name) and len(name) <= 63, name
    assert "0123456789ab" in name
    assert name != sj.job_name(experiment, "0123456789ab", None, None) or not (levels or variants)


def test_gpu_job_refuses_a_cpu_device_config():
    code, _ = run_main(["--config", TINY, "--flavor", "gpu", "--image", IMAGE, "--dry-run"])
    assert code == 2  # configs/tiny.yaml says train.device: cpu


def test_bad_config_is_a_one_line_error_before_any_request(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: -1, iterations: 5}\n")
    server = FakeApiServer()
    code, _ = run_main(["--config", str(bad), "--flavor", "cpu", "--image", IMAGE],
                       apis=apis_for(server))
    assert code == 2 and server.requests == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lr" in err[0]


def test_level_and_variant_selection_reach_the_pod_when_the_cli_supports_them(monkeypatch):
    import argparse

    import ticketsmith.cli

    def parser_with_selection():
        p = argparse.ArgumentParser()
        sub = p.add_subparsers(dest="command")
        prune = sub.add_parser("prune")
        for opt in ("--config", "--levels", "--variants"):
            prune.add_argument(opt)
        prune.add_argument("--quiet", action="store_true")
        return p

    monkeypatch.setattr(ticketsmith.cli, "build_parser", parser_with_selection)
    code, text = run_main(["--config", TINY, "--flavor", "cpu", "--image", IMAGE, "--dry-run",
                           "--levels", "1:2", "--variants", "ticket"])
    assert code == 0
    job = list(yaml.safe_load_all(text))[1]
    validate(job)
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][-4:] == [
        "--levels", "1:2", "--variants", "ticket"]
    assert job["metadata"]["name"].endswith("-l1-2-ticket")


def test_selection_is_refused_when_the_cli_cannot_run_it(monkeypatch, capsys):
    import argparse

    import ticketsmith.cli

    def parser_without_selection():
        p = argparse.ArgumentParser()
        prune = p.add_subparsers(dest="command").add_parser("prune")
        prune.add_argument("--config")
        prune.add_argument("--quiet", action="store_true")
        return p

    monkeypatch.setattr(ticketsmith.cli, "build_parser", parser_without_selection)
    code, _ = run_main(["--config", TINY, "--flavor", "cpu", "--image", IMAGE, "--dry-run",
                        "--levels", "1:2"])
    assert code == 2
    assert "--levels" in capsys.readouterr().err


@pytest.mark.parametrize("spec,error", [("2:1", "LAST"), ("x", "FIRST:LAST"), ("1:9", "levels 0..3")])
def test_bad_level_ranges(spec, error, capsys):
    code, _ = run_main(["--config", TINY, "--flavor", "cpu", "--image", IMAGE, "--dry-run",
                        "--levels", spec])
    assert code == 2 and error in capsys.readouterr().err


# --- submit / wait / cancel against the client's API surface ------------------------------

def submit_args(*extra: str) -> list[str]:
    return ["--config", TINY, "--flavor", "cpu", "--image", IMAGE, "--poll", "0", *extra]


def test_submit_creates_configmap_then_job_and_hands_the_configmap_to_the_job():
    server = FakeApiServer(job_statuses=[{"active": 1}, {"succeeded": 1, "conditions": [
        condition("Complete")]}])
    code, out = run_main(submit_args("--no-logs"), apis=apis_for(server))
    assert code == 0, out
    order = [(m, p.rsplit("/", 1)[-1]) for m, p, _, _ in server.requests
             if m in ("POST", "PATCH")]
    assert [m for m, _ in order] == ["POST", "POST", "PATCH"]
    assert "configmaps" in server.calls("POST", "configmaps")[0][1]
    (name, job), = server.jobs.items()
    validate(job)  # what went over the wire, after the client serialised it
    cm = server.configmaps[name]
    owner, = cm["metadata"]["ownerReferences"]
    assert owner["kind"] == "Job" and owner["uid"] == f"uid-{name}" and owner["name"] == name
    assert "Complete" in out


def test_an_existing_job_is_not_submitted_twice():
    from ticketsmith.base.config import load_config

    name = sj.job_name("tiny", load_config(TINY).hash(), None, None)
    server = FakeApiServer(existing_jobs=[name])
    code, _ = run_main(submit_args(), apis=apis_for(server))
    assert code == 3
    assert not server.calls("POST", ".") and not server.calls("DELETE", ".")


def test_wait_streams_pod_logs_until_complete():
    server = FakeApiServer(
        job_statuses=[{}, {"active": 1}, {"active": 1},
                      {"succeeded": 1, "conditions": [condition("Complete", "done")]}],
        pods=[[pod("p1", unschedulable=True)], [pod("p1", running=True)]],
        logs={"p1": b"experiment tiny [141bd35ee0e5] on cpu\n  r0 level 0  dense 97.50%\n"})
    batch, core = apis_for(server)
    out = io.StringIO()
    clock = FakeClock()
    server.jobs["j"] = {"metadata": {"name": "j"}}
    outcome = sj.wait_for_job(batch, core, "j", "ticketsmith", timeout_s=600, poll_s=5, out=out,
                              clock=clock, sleep=clock.sleep)
    assert outcome.state == "Complete" and outcome.exit_code == 0
    assert outcome.pods == ["p1"]
    text = out.getvalue()
    assert "waiting for a node" in text and "r0 level 0  dense 97.50%" in text
    log_calls = server.calls("GET", r"/pods/p1/log$")
    assert len(log_calls) == 1 and log_calls[0][2].get("follow", "").lower() == "true"
    pod_lists = server.calls("GET", r"/pods$")
    assert pod_lists and all(q.get("labelSelector") == "job-name=j" for _, _, q, _ in pod_lists)
    assert not server.calls("DELETE", ".")


def test_timeout_deletes_the_job_with_background_propagation():
    server = FakeApiServer(job_statuses=[{"active": 1}], pods=[[pod("p1", unschedulable=True)]])
    server.jobs["j"] = {"metadata": {"name": "j"}}
    batch, core = apis_for(server)
    clock = FakeClock()
    outcome = sj.wait_for_job(batch, core, "j", "ticketsmith", timeout_s=60, poll_s=10,
                              out=io.StringIO(), clock=clock, sleep=clock.sleep)
    assert outcome.state == "Timeout" and outcome.exit_code == 124
    (_, path, query, body), = server.calls("DELETE", "/jobs/")
    assert path == "/apis/batch/v1/namespaces/ticketsmith/jobs/j"
    # The API's default for Jobs orphans their pods, which would keep holding GPUs.
    assert query.get("propagationPolicy") == "Background" or (body or {}).get(
        "propagationPolicy") == "Background"
    assert "j" not in server.jobs
    assert clock.now >= 60


def test_ctrl_c_while_waiting_deletes_the_job():
    server = FakeApiServer(job_statuses=[{"active": 1}])
    server.jobs["j"] = {"metadata": {"name": "j"}}
    batch, core = apis_for(server)

    def interrupted(_):
        raise KeyboardInterrupt

    outcome = sj.wait_for_job(batch, core, "j", "ticketsmith", timeout_s=600, out=io.StringIO(),
                              sleep=interrupted)
    assert outcome.state == "Cancelled" and outcome.exit_code == 130
    (_, _, query, _), = server.calls("DELETE", "/jobs/j$")
    assert query.get("propagationPolicy") == "Background"


@pytest.mark.parametrize("reason", ["CreateContainerConfigError", "ImagePullBackOff"])
def test_a_pod_that_can_never_start_fails_fast_and_frees_the_node(reason):
    server = FakeApiServer(job_statuses=[{"active": 1}], pods=[[pod("p1", waiting=reason)]])
    server.jobs["j"] = {"metadata": {"name": "j"}}
    batch, core = apis_for(server)
    clock = FakeClock()
    outcome = sj.wait_for_job(batch, core, "j", "ticketsmith", timeout_s=3600, out=io.StringIO(),
                              clock=clock, sleep=clock.sleep)
    assert outcome.state == "Unstartable" and reason in outcome.message
    assert outcome.exit_code == 1 and clock.now == 0
    (_, _, query, _), = server.calls("DELETE", "/jobs/j$")
    assert query.get("propagationPolicy") == "Background"


def test_a_failed_job_reports_why():
    server = FakeApiServer(job_statuses=[{"failed": 2, "conditions": [
        condition("Failed", "Job has reached the specified backoff limit")]}],
        pods=[[pod("p1", terminated=True)]], logs={"p1": b"Traceback: boom\n"})
    batch, core = apis_for(server)
    server.jobs["j"] = {"metadata": {"name": "j"}}
    out = io.StringIO()
    outcome = sj.wait_for_job(batch, core, "j", "ticketsmith", timeout_s=60, out=out,
                              sleep=lambda _: None)
    assert outcome.state == "Failed" and outcome.exit_code == 1
    assert "backoff limit" in outcome.message and "Traceback: boom" in out.getvalue()


def test_cancel_flag_deletes_the_experiments_job():
    from ticketsmith.base.config import load_config

    name = sj.job_name("tiny", load_config(TINY).hash(), None, None)
    server = FakeApiServer(existing_jobs=[name])
    code, out = run_main(["--config", TINY, "--cancel"], apis=apis_for(server))
    assert code == 0 and name in out
    (_, path, query, _), = server.calls("DELETE", "/jobs/")
    assert path.endswith(f"/jobs/{name}") and query.get("propagationPolicy") == "Background"
    # Cancelling a Job that is already gone is not an error.
    assert run_main(["--config", TINY, "--cancel"], apis=apis_for(FakeApiServer()))[0] == 0


def test_any_job_can_be_cancelled_by_name_with_background_propagation():
    """E.g. a Job `mlflow run --backend kubernetes` submitted: MLflow's own cancel orphans pods."""
    name = "ticketsmith-2026-05-04-10-11-12-123456"
    server = FakeApiServer(existing_jobs=[name])
    code, _ = run_main(["--name", name, "--cancel"], apis=apis_for(server))
    assert code == 0
    (_, path, query, _), = server.calls("DELETE", "/jobs/")
    assert path == f"/apis/batch/v1/namespaces/ticketsmith/jobs/{name}"
    assert query.get("propagationPolicy") == "Background"
    assert run_main(["--cancel"], apis=apis_for(server))[0] == 2  # neither --config nor --name


def test_waiting_survives_a_flaky_api_server_and_notices_a_vanished_job():
    server = FakeApiServer(job_statuses=[{"active": 1}])
    server.jobs["j"] = {"metadata": {"name": "j"}}
    batch, core = apis_for(server)
    real = server.handle
    failures = iter([True, True, False, False, False, False])

    def flaky(method, url, fields=None, body=None):
        if "/status" in url and next(failures, False):
            return 503, _status(503, "ServiceUnavailable", "etcd leader election")
        return real(method, url, fields, body)

    server.handle = flaky
    clock = FakeClock()

    def sleep_then_delete(seconds):
        clock.sleep(seconds)
        if clock.now >= 20:
            server.jobs.pop("j", None)  # e.g. someone ran kubectl delete job

    outcome = sj.wait_for_job(batch, core, "j", "ticketsmith", timeout_s=600, poll_s=5,
                              out=io.StringIO(), clock=clock, sleep=sleep_then_delete)
    assert outcome.state == "Failed" and "no longer exists" in outcome.message
    assert not server.calls("DELETE", ".")
