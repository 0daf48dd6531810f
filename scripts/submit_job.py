#!/usr/bin/env python
"""Submit a TicketSmith experiment as a Kubernetes Job, without MLflow Projects.

    scripts/submit_job.py --config configs/imp_mnist.yaml --image REGISTRY/ticketsmith:TAG
    scripts/submit_job.py --config configs/tiny.yaml --flavor cpu --image ... --dry-run
    scripts/submit_job.py --config configs/imp_mnist.yaml --image ... --flavor gpu-spot --gpu t4
    scripts/submit_job.py --config configs/imp_mnist.yaml --image ... --levels 3:5 --variants ticket
    scripts/submit_job.py --config configs/imp_mnist.yaml --cancel
    scripts/submit_job.py --name ticketsmith-2026-05-04-10-11-12-123456 --cancel   # any Job,
        # e.g. one `mlflow run --backend kubernetes` submitted (its own cancel orphans the pods)

The config is loaded and validated here; the resolved config travels to the pod in a ConfigMap
owned by the Job (deleted with it), so the pod runs exactly what was validated, whatever the
image ships. The Job comes from the same template MLflow's Kubernetes backend uses
(k8s_backend/job-template-{gpu,gpu-spot,cpu}.yaml): deadline, retries, TTL, GPU pool, non-root
user and Secrets by reference are all the template's. `--gpu TYPE` pins the Job to the pools of
that GPU type and sizes its CPU and memory request for their nodes (k8s_backend/gpu/node-types.txt). The Job's name is derived from the experiment (and
the selected levels/variants), so submitting the same work twice is refused while it exists.

After submission the script waits (up to --timeout), streams the pod's log, and fails fast on
pods that can never start (missing Secret, unpullable image). On timeout or Ctrl-C it deletes
the Job with propagationPolicy=Background: a Job deleted through the API with the default policy
orphans its pods, which would keep holding their GPUs.

Exit codes: 0 Job complete (or submitted with --no-wait / printed with --dry-run), 1 Job failed,
2 bad arguments or config, 3 the Job already exists, 124 timed out (Job deleted), 130 cancelled.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import copy
import io
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import yaml

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = {"gpu": REPO / "k8s_backend" / "job-template-gpu.yaml",
             "gpu-spot": REPO / "k8s_backend" / "job-template-gpu-spot.yaml",
             "cpu": REPO / "k8s_backend" / "job-template-cpu.yaml"}
NODE_TYPES = REPO / "k8s_backend" / "gpu" / "node-types.txt"
LABEL_GPU = "ticketsmith.io/gpu"  # the GPU type label scripts/gpu_pools.sh puts on GPU pools
CONFIG_MOUNT = "/etc/ticketsmith"
TRACKING_SECRET = "ticketsmith-tracking"
LABEL_HASH = "ticketsmith.io/hash"
LABEL_EXPERIMENT = "ticketsmith.io/experiment"
# Waiting reasons from which a pod never recovers by itself: fail now rather than hold a node
# (and its GPU) until activeDeadlineSeconds.
FATAL_WAITING = {"CreateContainerConfigError", "CreateContainerError", "InvalidImageName",
                 "ErrImageNeverPull", "ImagePullBackOff"}

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_EXISTS, EXIT_TIMEOUT, EXIT_CANCELLED = 0, 1, 2, 3, 124, 130


class SubmitError(Exception):
    """A one-line reason the submission cannot go ahead, with the exit code to use."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


# --- manifests ----------------------------------------------------------------------------

def dns_label(text: str, max_len: int = 63) -> str:
    """`text` as a DNS-1123 label: lowercase alphanumerics and '-', <= max_len, alnum at ends."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower())
    label = re.sub(r"-{2,}", "-", label).strip("-")
    return label[:max_len].rstrip("-") or "x"


def parse_levels(spec: str | None) -> tuple[int, int] | None:
    """'3:5' → (3, 5); '4' → (4, 4); None → None (all levels)."""
    if spec is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", spec)
    if not m:
        raise SubmitError(f"--levels {spec!r}: expected FIRST:LAST or LEVEL, e.g. 3:5")
    first, last = int(m.group(1)), int(m.group(2) or m.group(1))
    if last < first:
        raise SubmitError(f"--levels {spec!r}: LAST must not be below FIRST")
    return first, last


def job_name(experiment: str, exp_hash: str, levels: tuple[int, int] | None,
             variants: list[str] | None) -> str:
    """Deterministic Job name: the same work always gets the same name (<= 63 characters,
    since Kubernetes copies it into the pods' job-name label)."""
    suffix = exp_hash
    if levels is not None:
        suffix += f"-l{levels[0]}-{levels[1]}"
    if variants:
        suffix += "-" + "-".join(dns_label(v).replace("-", "") for v in variants)
    suffix = dns_label(suffix, 63 - len("ts--") - 1)
    return f"ts-{dns_label(experiment, 63 - len('ts--') - len(suffix))}-{suffix}"


def prune_args(levels: tuple[int, int] | None, variants: list[str] | None) -> list[str]:
    """Arguments of `ticketsmith prune` inside the pod."""
    args = ["prune", "--config", f"{CONFIG_MOUNT}/config.yaml", "--quiet"]
    if levels is not None:
        args += ["--levels", f"{levels[0]}:{levels[1]}"]
    if variants:
        args += ["--variants", ",".join(variants)]
    return args


def check_cli_supports(args: list[str]) -> None:
    """Selections need matching `ticketsmith prune` options; refuse early if they are missing."""
    from ticketsmith.cli import build_parser

    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            build_parser().parse_args(args)
        except SystemExit:
            msg = err.getvalue().strip().splitlines()
            raise SubmitError("this ticketsmith CLI cannot run the selection: "
                              + (msg[-1] if msg else "unsupported arguments")) from None


def load_template(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SubmitError(f"{path}: cannot read Job template ({exc.strerror})") from None
    if not isinstance(doc, dict) or doc.get("kind") != "Job":
        raise SubmitError(f"{path}: not a Kubernetes Job manifest")
    return doc


@dataclass
class Plan:
    """What will be created: a ConfigMap with the resolved config, and the Job that mounts it."""
    name: str
    namespace: str
    exp_hash: str
    configmap: dict[str, Any]
    job: dict[str, Any]


def build_plan(cfg: Any, *, image: str, template: dict[str, Any], namespace: str | None = None,
               levels: tuple[int, int] | None = None, variants: list[str] | None = None,
               name: str | None = None) -> Plan:
    """Render the ConfigMap and Job for `cfg` (a validated ticketsmith Config) from `template`."""
    from ticketsmith.base.config import dump_config

    if "{replaced" in image or not image.strip():
        raise SubmitError(f"--image {image!r}: expected an image reference, e.g. REGISTRY/ticketsmith:TAG")
    exp_hash = cfg.hash()
    name = dns_label(name) if name else job_name(cfg.experiment.name, exp_hash, levels, variants)
    job = copy.deepcopy(template)
    namespace = namespace or job.get("metadata", {}).get("namespace") or "default"
    labels = {LABEL_HASH: exp_hash, LABEL_EXPERIMENT: dns_label(cfg.experiment.name)}

    meta = job.setdefault("metadata", {})
    meta["name"], meta["namespace"] = name, namespace
    meta.setdefault("labels", {}).update(labels)
    pod = job["spec"]["template"]
    pod.setdefault("metadata", {}).setdefault("labels", {}).update(labels)
    spec = pod["spec"]
    container = spec["containers"][0]
    container["name"] = "ticketsmith"
    container["image"] = image
    # Keep the image's ENTRYPOINT (tini → ticketsmith), so SIGTERM on deletion reaches Python.
    container.pop("command", None)
    container["args"] = prune_args(levels, variants)
    env = [e for e in container.get("env", []) if e["name"] != "MLFLOW_TRACKING_URI"]
    # The pod must report to the shared server, never to a SQLite file on its own disk: this
    # reference is required (a missing Secret is caught by wait_for_job and fails fast).
    env.insert(0, {"name": "MLFLOW_TRACKING_URI",
                   "valueFrom": {"secretKeyRef": {"name": TRACKING_SECRET, "key": "uri"}}})
    container["env"] = env
    container.setdefault("volumeMounts", []).append(
        {"name": "ticketsmith-config", "mountPath": CONFIG_MOUNT, "readOnly": True})
    spec.setdefault("volumes", []).append(
        {"name": "ticketsmith-config", "configMap": {"name": name}})

    configmap = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {**labels, "app.kubernetes.io/part-of": "ticketsmith"}},
        "data": {"config.yaml": dump_config(cfg)},
    }
    return Plan(name, namespace, exp_hash, configmap, job)


def gpu_sizes(path: Path = NODE_TYPES) -> dict[str, tuple[str, str]]:
    """GPU type → (CPU, memory) request of a Job on that type's nodes: the smallest over the
    clouds' rows of the table, so the pod fits the node on either cloud."""
    sizes: dict[str, tuple[str, str]] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        _cloud, kind, _machine, _vcpus, _gib, gpus, _acc, cpu, memory = line.split()
        if int(gpus) == 0:
            continue
        old = sizes.get(kind)
        if old is None or (float(cpu), int(memory.removesuffix("Gi"))) < (
                float(old[0]), int(old[1].removesuffix("Gi"))):
            sizes[kind] = (cpu, memory)
    return sizes


def pin_gpu_type(job: dict[str, Any], gpu_type: str) -> None:
    """Only nodes of `gpu_type` (their pool label), with the request sized for them."""
    sizes = gpu_sizes()
    if gpu_type not in sizes:
        raise SubmitError(f"--gpu {gpu_type!r}: expected one of {', '.join(sorted(sizes))} "
                          f"({NODE_TYPES.relative_to(REPO)})")
    spec = job["spec"]["template"]["spec"]
    if "nvidia.com/gpu" not in spec["containers"][0].get("resources", {}).get("requests", {}):
        raise SubmitError("--gpu needs a GPU flavor (--flavor gpu or gpu-spot)")
    spec.setdefault("nodeSelector", {})[LABEL_GPU] = gpu_type
    cpu, memory = sizes[gpu_type]
    res = spec["containers"][0]["resources"]
    res["requests"].update(cpu=cpu, memory=memory)
    res.setdefault("limits", {})["memory"] = memory  # request = limit: no memory overcommit


def pod_config(cfg: Any, flavor: str | None) -> Any:
    """The config as the pod must see it: local paths reset to the image's scratch directories
    (neither field is part of the experiment hash); a GPU Job must not train on the CPU."""
    from ticketsmith.base.config import config_from_dict

    raw = cfg.model_dump(mode="json")
    raw["experiment"]["output_dir"] = "runs"
    raw["data"]["root"] = "data"
    gpu = flavor is not None and flavor.startswith("gpu")
    if gpu and raw["train"]["device"] == "cpu":
        raise SubmitError(f"--flavor {flavor} but train.device is 'cpu': the GPU would sit idle; "
                          "add --set train.device=cuda (or use --flavor cpu)")
    if gpu:
        # Never 'auto' on a GPU node: without a usable driver it would train on the CPU for
        # hours while holding the GPU; 'cuda' fails at once (exit 2, no retry).
        raw["train"]["device"] = "cuda"
    out = config_from_dict(raw)
    assert out.hash() == cfg.hash(), "path fields must not change the experiment hash"
    return out


# --- cluster operations (any object with the BatchV1Api / CoreV1Api surface) ---------------

def submit(batch: Any, core: Any, plan: Plan) -> Any:
    """Create the ConfigMap, then the Job, then make the Job own the ConfigMap (so Kubernetes
    garbage-collects it with the Job). Returns the created V1Job."""
    from kubernetes.client.exceptions import ApiException

    exists = SubmitError(f"job {plan.namespace}/{plan.name} already exists: follow it with "
                         f"--attach, or stop it with --cancel", EXIT_EXISTS)
    try:  # before touching the ConfigMap, which a running Job of that name would be using
        batch.read_namespaced_job(name=plan.name, namespace=plan.namespace)
        raise exists
    except ApiException as exc:
        if exc.status != 404:
            raise
    try:
        core.create_namespaced_config_map(namespace=plan.namespace, body=plan.configmap)
    except ApiException as exc:
        if exc.status != 409:
            raise
        # Left over from a Job that is gone (or never got created): replace it.
        core.delete_namespaced_config_map(name=plan.name, namespace=plan.namespace)
        core.create_namespaced_config_map(namespace=plan.namespace, body=plan.configmap)
    try:
        job = batch.create_namespaced_job(namespace=plan.namespace, body=plan.job)
    except ApiException as exc:
        if exc.status == 409:  # created meanwhile by someone else: theirs, ConfigMap included
            raise exists from None
        core.delete_namespaced_config_map(name=plan.name, namespace=plan.namespace)
        raise
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": job.metadata.name,
             "uid": job.metadata.uid, "blockOwnerDeletion": False}
    core.patch_namespaced_config_map(name=plan.name, namespace=plan.namespace,
                                     body={"metadata": {"ownerReferences": [owner]}})
    return job


def cancel_job(batch: Any, name: str, namespace: str) -> None:
    """Delete the Job and, in the background, its pods (the API's default for Jobs orphans
    them, and an orphaned pod keeps its GPU until it ends)."""
    from kubernetes.client.exceptions import ApiException

    try:
        batch.delete_namespaced_job(name=name, namespace=namespace,
                                    propagation_policy="Background")
    except ApiException as exc:
        if exc.status != 404:
            raise


def job_state(job: Any) -> str | None:
    """'Complete', 'Failed' or None (still running) from a V1Job's conditions."""
    for cond in (job.status.conditions or []) if job.status else []:
        if cond.status == "True" and cond.type in ("Complete", "Failed"):
            return cond.type
    return None


def _pod_problem(pod: Any) -> str | None:
    statuses = ((pod.status.container_statuses or []) + (pod.status.init_container_statuses or [])
                if pod.status else [])
    for st in statuses:
        waiting = st.state.waiting if st.state else None
        if waiting is not None and waiting.reason in FATAL_WAITING:
            return f"pod {pod.metadata.name}: {waiting.reason}: {waiting.message or ''}".strip()
    return None


def _pod_started(pod: Any) -> bool:
    for st in (pod.status.container_statuses or []) if pod.status else []:
        if st.state and (st.state.running or st.state.terminated):
            return True
    return False


def _unschedulable(pod: Any) -> bool:
    for cond in (pod.status.conditions or []) if pod.status else []:
        if cond.type == "PodScheduled" and cond.status == "False" and cond.reason == "Unschedulable":
            return True
    return False


def follow_log(core: Any, pod: str, namespace: str, out: TextIO) -> None:
    """Copy a pod's log to `out` until the container ends (call in a thread)."""
    from kubernetes.client.exceptions import ApiException

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # chunks split characters
    try:
        resp = core.read_namespaced_pod_log(name=pod, namespace=namespace, follow=True,
                                            _preload_content=False)
        try:
            for chunk in resp.stream(64 * 1024, decode_content=True):
                out.write(decoder.decode(chunk))
                out.flush()
            out.write(decoder.decode(b"", final=True))
        finally:
            resp.release_conn()
    except (ApiException, OSError) as exc:
        out.write(f"[log of {pod} unavailable: {exc}]\n")


@dataclass
class Outcome:
    state: str            # Complete, Failed, Timeout, Cancelled, Unstartable
    message: str = ""
    pods: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return {"Complete": EXIT_OK, "Timeout": EXIT_TIMEOUT,
                "Cancelled": EXIT_CANCELLED}.get(self.state, EXIT_FAILED)


def wait_for_job(batch: Any, core: Any, name: str, namespace: str, *, timeout_s: float,
                 poll_s: float = 5.0, logs: bool = True, out: TextIO = sys.stdout,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> Outcome:
    """Wait for the Job to finish, streaming each pod's log once it starts.

    Cancels the Job (background propagation) on timeout, on Ctrl-C and on a pod that can never
    start. Polls the Job status every `poll_s` seconds; `clock` and `sleep` are injectable.
    """
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    deadline = clock() + timeout_s
    followers: dict[str, threading.Thread] = {}
    said_pending = False
    api_errors = 0  # consecutive transient API failures tolerated over a long wait

    def finish(outcome: Outcome) -> Outcome:
        for t in followers.values():
            t.join(timeout=30)
        outcome.pods = list(followers)
        return outcome

    try:
        while True:
            try:
                job = batch.read_namespaced_job_status(name=name, namespace=namespace)
                pods = core.list_namespaced_pod(namespace=namespace,
                                                label_selector=f"job-name={name}").items
                api_errors = 0
            except ApiException as exc:
                if exc.status == 404:
                    return finish(Outcome("Failed", "the job no longer exists (deleted, or "
                                                    "removed after ttlSecondsAfterFinished)"))
                if exc.status < 500 or api_errors >= 5:
                    raise
                api_errors += 1
                sleep(poll_s)
                continue
            except HTTPError:
                if api_errors >= 5:
                    raise
                api_errors += 1
                sleep(poll_s)
                continue
            state = job_state(job)
            for pod in pods:
                problem = _pod_problem(pod)
                if problem:
                    cancel_job(batch, name, namespace)
                    return finish(Outcome("Unstartable", problem + " (job deleted)"))
                if _unschedulable(pod) and not said_pending:
                    out.write(f"[{name}] waiting for a node (pool may be scaling up from zero)\n")
                    said_pending = True
                if logs and pod.metadata.name not in followers and _pod_started(pod):
                    t = threading.Thread(target=follow_log, daemon=True,
                                         args=(core, pod.metadata.name, namespace, out))
                    followers[pod.metadata.name] = t
                    t.start()
            if state is not None:
                reason = next((c.message or c.reason or "" for c in job.status.conditions
                               if c.type == state and c.status == "True"), "")
                return finish(Outcome(state, reason))
            if clock() >= deadline:
                cancel_job(batch, name, namespace)
                return finish(Outcome("Timeout", f"no result within {timeout_s:.0f}s (job deleted)"))
            sleep(poll_s)
    except KeyboardInterrupt:
        cancel_job(batch, name, namespace)
        return finish(Outcome("Cancelled", "interrupted (job deleted)"))


# --- command line -------------------------------------------------------------------------

class _ManifestDumper(yaml.SafeDumper):
    """YAML for people: multi-line strings (the embedded config) as literal blocks."""


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_ManifestDumper.add_representer(str, _str_representer)


def dump_manifests(plan: Plan) -> str:
    return yaml.dump_all([plan.configmap, plan.job], Dumper=_ManifestDumper, sort_keys=False)


def parse_duration(text: str) -> float:
    """'90', '90s', '45m', '6h' → seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected e.g. 3600, 45m or 6h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="submit_job.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See docs/kubernetes.md.")
    p.add_argument("--config", "-c", help="experiment YAML (see configs/); not needed for "
                   "--cancel/--attach with --name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable), as for `ticketsmith prune`")
    p.add_argument("--image", help="image reference, e.g. REGISTRY/ticketsmith:TAG "
                   "(required unless --cancel/--attach)")
    p.add_argument("--flavor", choices=sorted(TEMPLATES), default="gpu",
                   help="which Job template (node pool) to use: gpu (on-demand), gpu-spot "
                   "(preemptible, cheaper) or cpu (default: gpu)")
    p.add_argument("--gpu", metavar="TYPE", help="only GPU pools of this type (t4, l4, a10, a100, "
                   "h100, h200), with the CPU and memory request sized for their nodes "
                   "(default: any GPU pool, at a size that fits the smallest)")
    p.add_argument("--template", type=Path, help="a Job template other than the flavor's")
    p.add_argument("--namespace", "-n", help="namespace (default: the template's)")
    p.add_argument("--context", help="kube-context (default: current context, else in-cluster)")
    p.add_argument("--name", help="Job name (default: derived from the experiment and selection)")
    p.add_argument("--levels", help="only these IMP levels, FIRST:LAST (earlier levels must be "
                   "finished in the tracking store)")
    p.add_argument("--variants", help="only these variants, comma-separated (e.g. ticket)")
    p.add_argument("--timeout", type=parse_duration, default=parse_duration("13h"),
                   help="how long to wait before deleting the Job (default: 13h, beyond the "
                   "GPU template's 12 h activeDeadlineSeconds)")
    p.add_argument("--poll", type=parse_duration, default=5.0, help="status poll interval")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="print the ConfigMap and Job manifests, submit nothing")
    mode.add_argument("--no-wait", action="store_true", help="submit and return")
    mode.add_argument("--attach", action="store_true", help="wait for the existing Job instead")
    mode.add_argument("--cancel", action="store_true",
                      help="delete the existing Job (and its pods) and return")
    p.add_argument("--no-logs", action="store_true", help="do not stream pod logs")
    return p


def plan_from_args(args: argparse.Namespace, *, submitting: bool = True) -> Plan:
    """The plan for the arguments; `submitting=False` (--cancel/--attach) only needs the name."""
    from ticketsmith.base.config import ConfigError, load_config

    try:
        cfg = pod_config(load_config(args.config, args.overrides),
                         args.flavor if submitting else None)
    except ConfigError as exc:
        raise SubmitError(str(exc)) from None
    levels = parse_levels(args.levels)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    unknown = sorted(set(variants or []) - set(cfg.experiment.variants) - {"dense"})
    if unknown:
        raise SubmitError(f"--variants: {unknown[0]!r} is not one of this experiment's variants "
                          f"({', '.join(cfg.experiment.variants)})")
    if levels is not None and levels[1] > cfg.prune.levels:
        raise SubmitError(f"--levels: the experiment has levels 0..{cfg.prune.levels}")
    if submitting and (levels is not None or variants):
        check_cli_supports(prune_args(levels, variants))
    template = load_template(args.template or TEMPLATES[args.flavor])
    if args.gpu:
        pin_gpu_type(template, args.gpu)
    return build_plan(cfg, image=args.image or "(existing job)", template=template,
                      namespace=args.namespace, levels=levels, variants=variants, name=args.name)


def connect(context: str | None) -> tuple[Any, Any]:
    """BatchV1Api and CoreV1Api from the kube-config (context) or the in-cluster config."""
    import kubernetes
    from kubernetes.config.config_exception import ConfigException

    try:
        kubernetes.config.load_kube_config(context=context)
    except (OSError, ConfigException):
        if context:
            raise SubmitError(f"--context {context!r}: not found in the kube-config") from None
        kubernetes.config.load_incluster_config()
    return kubernetes.client.BatchV1Api(), kubernetes.client.CoreV1Api()


def main(argv: list[str] | None = None, *, apis: tuple[Any, Any] | None = None,
         out: TextIO = sys.stdout) -> int:
    args = build_parser().parse_args(argv)
    try:
        submitting = not (args.cancel or args.attach)
        if submitting and not args.image:
            raise SubmitError("--image is required (e.g. REGISTRY/ticketsmith:TAG)")
        if args.config:
            plan = plan_from_args(args, submitting=submitting)
        elif not submitting and args.name:
            template = load_template(args.template or TEMPLATES[args.flavor])
            namespace = args.namespace or template["metadata"].get("namespace") or "default"
            plan = Plan(dns_label(args.name), namespace, "", {}, {})
        else:
            raise SubmitError("--config is required (or --name with --cancel/--attach)")
        if args.dry_run:
            out.write(dump_manifests(plan))
            return EXIT_OK
        batch, core = apis or connect(args.context)
        if args.cancel:
            cancel_job(batch, plan.name, plan.namespace)
            out.write(f"deleted job {plan.namespace}/{plan.name} (pods in the background)\n")
            return EXIT_OK
        if not args.attach:
            submit(batch, core, plan)
            out.write(f"submitted job {plan.namespace}/{plan.name} "
                      f"(experiment {plan.exp_hash}, {args.flavor})\n")
            if args.no_wait:
                return EXIT_OK
        outcome = wait_for_job(batch, core, plan.name, plan.namespace, timeout_s=args.timeout,
                               poll_s=args.poll, logs=not args.no_logs, out=out)
        out.write(f"job {plan.namespace}/{plan.name}: {outcome.state}"
                  f"{': ' + outcome.message if outcome.message else ''}\n")
        return outcome.exit_code
    except SubmitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
