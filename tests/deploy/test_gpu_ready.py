"""GPU readiness, proven on the CPU: a GPU Job fails fast without CUDA, the 2:4 plan skips what
cuSPARSELt cannot run, a run folder is not resumed on another device, the benchmark entry point
passes its device, the Job templates fit their node pools, and scripts/gpu_smoke.sh runs.
The CUDA paths themselves are the `gpu`-marked tests here and in test_serving.py."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ticketsmith.base.config import ConfigError, load_config
from ticketsmith.engine.execution import determinism
from ticketsmith.engine.lottery import run_experiment
from ticketsmith.engine.masks import (Mask, prune_magnitude, prune_n_m, semi_structured_plan)
from ticketsmith.engine.models import ResNet20, build_model, prunable_weights
from ticketsmith.engine.store import RunStore

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny(tmp_path: Path, *extra: str):
    return load_config(TINY, [f"experiment.output_dir={tmp_path}", "train.iterations=40", *extra])


def quiet(_: str) -> None:
    pass


# --- a GPU Job without CUDA fails fast, with one line, exit 2 (bad input for this host) ---

@no_cuda
@pytest.mark.parametrize("overrides, env", [
    ("train.device=cuda", {}),                                # what submit_job.py renders
    ("train.device=auto", {"TICKETSMITH_DEVICE": "cuda"}),    # MLflow backend: template env
])
def test_gpu_job_without_cuda_exits_2_with_one_line(tmp_path, overrides, env):
    out = subprocess.run(
        [sys.executable, "entrypoints/prune.py", "--config", str(TINY), "--overrides",
         f"{overrides} experiment.output_dir={tmp_path}", "--quiet"], cwd=REPO,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db", **env},
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.device: 'cuda'"), lines
    assert "driver" in lines[0]
    assert not list(tmp_path.glob("*/replicate_0")), "nothing trained"


def test_pinned_device_refuses_another(monkeypatch):
    from ticketsmith.engine.train import resolve_device

    monkeypatch.setenv("TICKETSMITH_DEVICE", "cuda")
    with pytest.raises(ConfigError, match="train.device: 'cpu'.*TICKETSMITH_DEVICE"):
        resolve_device("cpu")


def test_the_gpu_template_pins_cuda_and_submit_job_asks_for_it():
    job = yaml.safe_load((REPO / "k8s_backend" / "job-template-gpu.yaml").read_text())
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "TICKETSMITH_DEVICE", "value": "cuda"} in env
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import submit_job
    finally:
        sys.path.pop(0)
    cfg = load_config(TINY, ["train.device=auto"])
    pod = submit_job.pod_config(cfg, "gpu")
    assert pod.train.device == "cuda" and pod.hash() == cfg.hash()


# --- `--set prune.pattern=2:4` and the 2:4 plan -------------------------------------------

def test_unquoted_2_4_is_accepted_and_base_60_is_gone():
    assert load_config(TINY, ["prune.pattern=2:4"]).prune.pattern == "2:4"
    cfg = load_config(TINY, ["model.name=x1:30", "train.lr=1.5", "train.batch_size=0x10"])
    assert (cfg.model.name, cfg.train.lr, cfg.train.batch_size) == ("x1:30", 1.5, 16)


def test_the_2_4_plan_skips_what_cusparselt_cannot_run():
    lenet = prunable_weights(build_model("lenet_300_100", (1, 28, 28), 10))
    plan = semi_structured_plan(lenet)
    assert all(why and "multiples of 16" in why for why in plan.values()), plan  # 300x784 ...
    conv2 = prunable_weights(build_model("conv2", (3, 32, 32), 10))
    plan = semi_structured_plan(conv2)
    assert [n for n, why in plan.items() if why is None] == ["fc1.weight", "fc2.weight"]
    assert "not a Linear layer" in plan["features.0.weight"] and "10x256" in plan["out.weight"]


def test_a_2_4_experiment_says_which_layers_and_leaves_the_others_unstructured(tmp_path):
    lines: list[str] = []
    cfg = tiny(tmp_path, "prune.pattern=2:4", "prune.levels=1")
    result = run_experiment(cfg, progress=False, echo=lines.append)
    (plan,) = [ln for ln in lines if "2:4 pattern" in ln]
    assert "on hidden.0.weight" in plan and "skipped" in plan and "out.weight (shape 4x32" in plan
    ticket = next(r for r in result.records if r["level"] == 1 and r["variant"] == "ticket")
    assert ticket["layer_density"]["hidden.0.weight"] <= 0.5                 # 2:4 capped
    assert ticket["layer_density"]["out.weight"] == pytest.approx(0.75, abs=0.01)  # 25%, no cap


# --- ties, determinism, ResNet-20's pooling ------------------------------------------------

def test_ties_go_to_the_lower_index():
    w = {"a": torch.tensor([[1.0, -1.0, 1.0, 2.0, 1.0, 3.0]])}
    kept = prune_magnitude(w, Mask.ones_like(w), {"a": 0.5})["a"]
    assert kept.tolist() == [[False, False, False, True, True, True]]
    w = {"b": torch.ones(1, 8)}
    nm = prune_n_m(w, Mask.ones_like(w))["b"]
    assert nm.tolist() == [[True, True, False, False, True, True, False, False]]


def test_resnet20_pooling_is_the_same_numbers_as_adaptive_avg_pool():
    torch.manual_seed(0)
    model = ResNet20((3, 8, 8), 4, width=4)
    x = torch.randn(5, 3, 8, 8)
    feats = model.blocks(torch.relu(model.bn(model.conv(x))))
    expected = model.out(torch.nn.functional.adaptive_avg_pool2d(feats, 1).flatten(1))
    assert torch.equal(model(x), expected)


def test_determinism_policy_changes_nothing_on_cpu_and_is_restored():
    before = torch.are_deterministic_algorithms_enabled()
    with determinism("strict", torch.device("cpu")):
        assert torch.are_deterministic_algorithms_enabled() == before


def test_every_record_carries_its_device_and_policy(tmp_path):
    result = run_experiment(tiny(tmp_path, "prune.levels=1"), progress=False, echo=quiet)
    assert {(r["device"], r["determinism"], r["gpu"]) for r in result.records} == \
        {("cpu", "warn", None)}


# --- resume on another device ---------------------------------------------------------------

def test_resuming_on_another_device_is_refused_unless_asked_for(tmp_path):
    first = run_experiment(tiny(tmp_path, "prune.levels=1"), progress=False, echo=quiet)
    store = RunStore(first.run_root)
    for r in store.records():  # as if trained on a GPU: the same writer the engine uses
        store.write_json(store.metrics_path(r["replicate"], r["level"], r["variant"]),
                         {**r, "device": "cuda", "gpu": "NVIDIA H200"})
    with pytest.raises(ConfigError) as err:
        run_experiment(tiny(tmp_path, "prune.levels=2"), progress=False, echo=quiet)
    msg = str(err.value)
    assert "\n" not in msg and "cuda (NVIDIA H200)" in msg and "train.allow_device_change" in msg
    assert not store.is_done(0, 2, "ticket"), "nothing trained on the other device"
    more = run_experiment(tiny(tmp_path, "prune.levels=2", "train.allow_device_change=true"),
                          progress=False, echo=quiet)
    assert (0, 2, "ticket") in more.trained


# --- MLproject benchmark passes its device ------------------------------------------------

def test_mlproject_benchmark_passes_the_device(tmp_path):
    from mlflow.projects import _project_spec

    ep = _project_spec.load_project(str(REPO)).get_entry_point("benchmark")
    command = ep.compute_command({"checkpoint": "x.safetensors", "device": "cuda"}, str(tmp_path))
    assert "--device cuda" in command
    assert "--device auto" in ep.compute_command({"checkpoint": "x"}, str(tmp_path))
    if not torch.cuda.is_available():  # the device reaches the benchmark: CUDA is refused
        out = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True,
                             timeout=300, env={**os.environ, "PATH": f"{Path(sys.executable).parent}"
                                               f"{os.pathsep}{os.environ['PATH']}"})
        assert out.returncode == 2 and "'cuda'" in out.stderr, out.stderr[-2000:]


# --- Job templates fit their pools ----------------------------------------------------------

def aks_reserved_mcpu(vcpus: int) -> int:
    """AKS kube-reserved CPU (learn.microsoft.com/azure/aks/node-resource-reservations): 60m
    for 1 core, 100m for 2, 140m for 4, 180m for 8, 260m for 16, 420m for 32, 740m for 64;
    i.e. 60m for the first core, 40m for the second, 20m each for the third and fourth, then
    10m per core."""
    return 60 + 40 * (min(vcpus, 2) - 1) + 20 * min(max(vcpus - 2, 0), 2) + 10 * max(vcpus - 4, 0)


def gke_reserved_mcpu(vcpus: int) -> int:
    """GKE (cloud.google.com/kubernetes-engine/docs/concepts/plan-node-sizes): 6% of the first
    core, 1% of the second, 0.5% of cores 3-4, 0.25% of every core above 4."""
    shares = [(1, 0.06), (1, 0.01), (2, 0.005), (math.inf, 0.0025)]
    left, total = vcpus, 0.0
    for cores, share in shares:
        used = min(left, cores)
        total, left = total + used * share * 1000, left - used
    return math.ceil(total)


# DaemonSets on every node request CPU and memory too: kube-proxy, CNI, CSI, logging and metrics
# agents, the NVIDIA device plugin. Their defaults sum to about 0.5 vCPU and 0.5 GiB on either
# cloud; 0.8 vCPU and 1 GiB are kept free for them.
DAEMONSETS_MCPU = 800
DAEMONSETS_MIB = 1024
RESERVED = {"aks": aks_reserved_mcpu, "gke": gke_reserved_mcpu}


def reserved_memory_mib(cloud: str, gib: int) -> int:
    """Memory the cloud keeps from pods. GKE (plan-node-sizes): 25% of the first 4 GiB, 20% of
    the next 4, 10% of the next 8, 6% of the next 112, 2% above 128 GiB, plus a 100 MiB eviction
    threshold. AKS (node-resource-reservations): the same regressive rule with a 750 MiB
    threshold (before 1.29), or 20 MiB per pod (250 at most) + 50 MiB and 100 MiB (1.29+): the
    larger of the two."""
    shares = [(4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (math.inf, 0.02)]
    left, regressive = gib, 0.0
    for size, share in shares:
        used = min(left, size)
        regressive, left = regressive + used * share * 1024, left - used
    if cloud == "gke":
        return math.ceil(regressive + 100)
    return math.ceil(max(regressive + 750, 20 * 250 + 50 + 100))


def test_reservation_rules_match_the_published_tables():
    assert [aks_reserved_mcpu(c) for c in (1, 2, 4, 8, 16, 32, 64)] == \
        [60, 100, 140, 180, 260, 420, 740]
    assert [gke_reserved_mcpu(c) for c in (1, 2, 4, 8)] == [60, 70, 80, 90]
    # GKE's published examples: 1.8 GiB of 7.5 GiB, 2.6 GiB of 15 GiB reserved (with eviction)
    assert reserved_memory_mib("gke", 15) == math.ceil(2.5 * 1024 + 100)
    assert reserved_memory_mib("aks", 28) == 5150  # 1.29+: 250 pods at 20 MiB + 150 MiB


def mcpu(text: str) -> int:
    return int(text[:-1]) if str(text).endswith("m") else int(float(text) * 1000)


def mib(text: str) -> int:
    units = {"Gi": 1024, "Mi": 1}
    assert str(text)[-2:] in units, text
    return int(text[:-2]) * units[text[-2:]]


def gpu_pods() -> dict[str, dict]:
    k8s = REPO / "k8s_backend"
    out = {}
    for path in (k8s / "job-template-gpu.yaml", k8s / "job-template-gpu-spot.yaml",
                 k8s / "sweep" / "worker-job.yaml", k8s / "gpu" / "gpu-smoke-test.yaml",
                 k8s / "job-template-cpu.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Job":
                out[path.name] = doc["spec"]["template"]["spec"]
    return out


def node_types() -> list[list[str]]:
    out = subprocess.run(["bash", str(REPO / "scripts" / "gpu_pools.sh"), "machines"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return [line.split() for line in out.splitlines() if line.strip()]


def fits(cloud: str, vcpus: str, gib: str, cpu: str, memory: str) -> bool:
    free_mcpu = int(vcpus) * 1000 - RESERVED[cloud](int(vcpus)) - DAEMONSETS_MCPU
    free_mib = int(gib) * 1024 - reserved_memory_mib(cloud, int(gib)) - DAEMONSETS_MIB
    return mcpu(cpu) <= free_mcpu and (memory is None or mib(memory) <= free_mib)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_job_templates_requests_fit_every_pools_allocatable_cpu_and_memory():
    machines = node_types()
    assert {m[1] for m in machines} >= {"cpu", "t4", "l4", "a10", "a100", "h100", "h200"}
    checked = 0
    for name, pod in gpu_pods().items():
        req = pod["containers"][0]["resources"]["requests"]
        wants_gpu = "nvidia.com/gpu" in req
        for cloud, _kind, machine, vcpus, gib, gpus, *_ in machines:
            if (int(gpus) > 0) != wants_gpu:
                continue
            assert fits(cloud, vcpus, gib, req["cpu"], req.get("memory")), (name, machine, req)
            checked += 1
    assert checked == 4 * 10 + 1  # four GPU pods on ten GPU machines, the CPU Job on its pool


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_each_node_types_job_size_fits_it_and_submit_job_uses_the_smallest():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import submit_job
    finally:
        sys.path.pop(0)
    machines = node_types()
    for cloud, kind, machine, vcpus, gib, gpus, _acc, cpu, memory in machines:
        assert fits(cloud, vcpus, gib, cpu, memory), (cloud, machine, cpu, memory)
    sizes = submit_job.gpu_sizes()
    assert sizes["t4"] == sizes["l4"] == ("3", "10Gi")  # 4 vCPUs: ~3.8 allocatable
    for kind, (cpu, memory) in sizes.items():
        rows = [m for m in machines if m[1] == kind]
        assert all(mcpu(cpu) <= mcpu(m[7]) and mib(memory) <= mib(m[8]) for m in rows), kind
    assert "cpu" not in sizes


# --- the smoke script -------------------------------------------------------------------------

def test_gpu_smoke_script_passes_bash_n_and_shellcheck():
    script = REPO / "scripts" / "gpu_smoke.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    shellcheck = Path(sys.executable).parent / "shellcheck"
    out = subprocess.run([str(shellcheck if shellcheck.exists() else "shellcheck"), str(script)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout


@pytest.mark.slow
def test_gpu_smoke_script_dry_run_on_cpu(tmp_path):
    out = subprocess.run(["bash", "scripts/gpu_smoke.sh", "--device", "cpu", "--quick",
                          "--formats", "dense,csr", "--out", str(tmp_path)], cwd=REPO,
                         env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    verdict = out.stdout.strip().splitlines()
    assert len(verdict) == 1 and verdict[0].startswith("gpu smoke: PASS (6/6 steps ok) on cpu")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["verdict"] == "PASS" and summary["environment"]["torch"] == torch.__version__
    assert set(summary["steps"]) == {"environment", "gpu_tests", "determinism", "benchmark",
                                     "train_loop", "serving"}
    assert "identical across two runs" in summary["steps"]["determinism"]["last_line"]


def test_gpu_smoke_script_fails_without_cuda_when_cuda_is_asked(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    out = subprocess.run(["bash", "scripts/gpu_smoke.sh", "--out", str(tmp_path), "--quick"],
                         cwd=REPO, env={**os.environ, "PYTHON": sys.executable},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stdout.startswith("gpu smoke: FAIL (0/1 steps ok; failed: environment)")
    assert "R580" in (tmp_path / "environment.log").read_text()


# --- CUDA paths (skipped without a GPU; scripts/gpu_smoke.sh runs them) ------------------

@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("model", ["mlp", "conv2"])
def test_two_cuda_runs_give_identical_checkpoints(tmp_path, model):
    extra = ["model.options={}", "data.options={n_train: 600, n_test: 200, image_size: 8, "
             "num_classes: 4, channels: 3}"] if model == "conv2" else []
    runs = []
    for name in ("a", "b"):
        cfg = load_config(TINY, [f"experiment.output_dir={tmp_path / name}", f"model.name={model}",
                                 "train.device=cuda", "train.determinism=strict",
                                 "prune.levels=1", *extra])
        runs.append(run_experiment(cfg, progress=False, echo=quiet))
    assert [r["test_loss"] for r in runs[0].records] == [r["test_loss"] for r in runs[1].records]


@pytest.mark.gpu
@cuda
def test_cuda_event_clock_times_calls():
    from ticketsmith.serving.measure import clock_for, time_side_by_side

    x = torch.randn(256, 256, device="cuda")
    got = time_side_by_side({"mm": lambda: x @ x}, trials=3, warmup=2, block_s=0.001,
                            clock=clock_for(torch.device("cuda")))
    assert all(t > 0 for block in got["mm"] for t in block)
