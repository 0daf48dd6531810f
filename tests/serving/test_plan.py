"""The deployable serving plan, on tickets trained for real: it loads without torch.load and
without unpickling, predicts the masked model's labels on the MNIST test set from the input a
user has, its registered tags are what the benchmark measured, a damaged plan fails loudly,
and a plan that needs what the host lacks falls back and says so."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from ticketsmith.base.config import load_config
from ticketsmith.engine.checkpoint import model_from_checkpoint
from ticketsmith.engine.data import load_dataset
from ticketsmith.engine.lottery import run_experiment
from ticketsmith.engine.store import RunStore
from ticketsmith.serving.benchmark import benchmark_checkpoint
from ticketsmith.serving.plan.check import check_plan, verify
from ticketsmith.serving.plan.inputs import to_model_input
from ticketsmith.serving.plan.layout import INEXACT, PLAN, WEIGHTS, PlanError, read_plan
from ticketsmith.serving.plan.runtime import load_plan
from ticketsmith.tracking.registry import register_ticket

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"
# LeNet-300-100 on real MNIST, two levels at 80% per level (4% of the weights left): a short
# budget, but a ticket sparse enough that CSR and compaction both pay.
MNIST = ["train.iterations=150", "train.epochs=null", "train.eval_every=50", "prune.levels=2",
         "prune.fraction=0.8", "prune.output_fraction=0.5", "experiment.variants=[ticket]",
         "experiment.benchmark=false", f"data.root={DATA}", "data.val_size=1000"]


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    """(checkpoint of the level-2 ticket, its benchmark with the plan written, MNIST test set)."""
    root = tmp_path_factory.mktemp("plan")
    cfg = load_config(REPO / "configs" / "imp_mnist.yaml",
                      [f"experiment.output_dir={root / 'runs'}", *MNIST])
    result = run_experiment(cfg, progress=False, echo=lambda _: None)
    store = RunStore(result.run_root)
    ckpt = store.checkpoint_path(0, 2, "ticket")
    bench = benchmark_checkpoint(ckpt, batch_sizes=(1, 64), quick=True, threads=1,
                                 data=result.data, plan_dir=store.serving_path(0, 2, "ticket"),
                                 formats=["onnxruntime", "numpy"])
    return ckpt, bench, result.data


def masked_labels(ckpt: Path, x: torch.Tensor) -> np.ndarray:
    model = model_from_checkpoint(ckpt)[0]
    with torch.inference_mode():
        return model(x).argmax(1).numpy()


def raw_pixels(x: torch.Tensor) -> np.ndarray:
    """Normalised MNIST back to the uint8 images a user has."""
    return ((x * 0.3081 + 0.1307) * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def test_the_plan_serves_the_masked_models_labels_from_natural_input(mnist):
    ckpt, bench, data = mnist
    plan = load_plan(bench["serving"]["path"])
    want = masked_labels(ckpt, data.test_x)
    u8 = raw_pixels(data.test_x)  # (N, 1, 28, 28)
    assert "onnxruntime_int8" in plan.routes  # built with the benchmark: int8 is there
    runners = {route: load_plan(plan.folder, route=route) for route in plan.routes}
    for name, images in {"uint8 (N,1,28,28)": u8, "uint8 (N,28,28)": u8[:, 0],
                         "uint8 flat": u8.reshape(len(u8), -1),
                         "float 0..1 (N,28,28)": u8[:, 0] / np.float32(255)}.items():
        for route, runner in runners.items():  # every form on every route, whole test set
            got = runner.predict(images, "labels")
            agree = (got == want).mean()
            # pixels rounded to uint8; int8 weights are inexact by design (checked and gated)
            assert agree >= (0.98 if route in INEXACT else 0.999), (name, route, agree)
    probs = plan.predict(u8[:5])
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    assert probs.dtype == np.float32 and probs.shape == (5, 10)
    # the exact model input gives the masked model's logits
    model = model_from_checkpoint(ckpt)[0]
    with torch.inference_mode():
        ref = model(data.test_x[:256]).numpy()
    np.testing.assert_allclose(plan.logits(data.test_x[:256].numpy()), ref, atol=1e-4)


def test_feature_major_input_is_the_same_model_input():
    spec = {"shape": [1, 4, 4], "mean": [0.5], "std": [0.25]}
    u8 = np.arange(32, dtype=np.uint8).reshape(2, 4, 4) * 8
    x = to_model_input(u8, spec)
    np.testing.assert_allclose(x, (u8[:, None] / 255.0 - 0.5) / 0.25, atol=1e-6)
    np.testing.assert_array_equal(to_model_input(u8, spec, feature_major=True),
                                  x.reshape(2, -1).T)
    with pytest.raises(PlanError, match=r"input: expected a batch of 16 values per sample"):
        to_model_input(np.zeros((2, 15)), spec)
    with pytest.raises(PlanError, match="input: expected numbers"):
        to_model_input(np.array([["a"] * 16]), spec)


def test_the_registered_plan_loads_without_torch_load_or_unpickling(mnist, tmp_path):
    """In a fresh process where torch.load and every pickle loader raise, the registered
    version loads through MLflow and predicts; its tags are the benchmark's figures."""
    ckpt, bench, data = mnist
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("plan", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp).info.run_id
    version = register_ticket(client, "plan-ticket", run, ckpt, probe=data.test_x[:500])
    mlflow.set_tracking_uri(uri)
    mv = client.get_model_version("plan-ticket", version)
    serving = bench["serving"]
    assert mv.tags["serving.format"] == serving["format"]
    assert mv.tags["serving.threads"] == str(serving["threads"]) == "1"
    for bs, key in (("1", "serving.speedup_bs1"),):
        assert mv.tags[key] == f"{serving['speedup'][bs]:.2f}"
    assert mv.tags["serving.speedup_bs256"] == "not measured"  # measured at 1 and 64 only
    assert mv.tags["serving.checked"].startswith("500 probe inputs at registration")
    assert "argmax agreement 100.00%" in mv.tags["serving.checked"]
    assert_the_thread_override_takes_effect(f"models:/plan-ticket/{version}")
    images = raw_pixels(data.test_x[:300])
    np.save(tmp_path / "images.npy", images)
    script = f"""
import pickle, sys, torch, numpy as np, mlflow
def refuse(*a, **k):
    raise AssertionError("unpickling or torch.load while loading the served model")
pickle.load = pickle.loads = torch.load = refuse
pickle.Unpickler = refuse
mlflow.set_tracking_uri({uri!r})
model = mlflow.pyfunc.load_model("models:/plan-ticket/{version}")
labels = model.predict(np.load({str(tmp_path / 'images.npy')!r}), params={{"output": "labels"}})
np.save({str(tmp_path / 'labels.npy')!r}, labels)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    got = np.load(tmp_path / "labels.npy")
    assert (got == masked_labels(ckpt, data.test_x[:300])).mean() >= 0.99


def assert_the_thread_override_takes_effect(uri: str, threads: int = 3) -> None:
    """The plan was measured (and its `threads` recorded) at one thread; a deployment's
    `model_config={"threads": N}` is what its ONNX Runtime sessions and torch run at. numpy's
    BLAS stays at one thread whatever N (its idle threads spin: see pyfunc_model)."""
    from threadpoolctl import threadpool_info

    before = torch.get_num_threads()
    try:
        loaded = mlflow.pyfunc.load_model(uri, model_config={"threads": threads})
        runner = loaded._model_impl.python_model.plan
        assert runner.plan["threads"] == 1 and runner.threads == threads
        onnx = [r for name, r in runner.routes.items() if name.startswith("onnxruntime")]
        assert len(onnx) == 2 and "numpy" in runner.routes
        for route in onnx:
            assert route.session.get_session_options().intra_op_num_threads == threads
        assert torch.get_num_threads() == threads  # the numpy route's torch CSR kernels
        assert {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} == {1}
        torch.set_num_threads(before)
        mlflow.pyfunc.load_model(uri, model_config={"threads": threads, "format": "masked_dense"})
        assert torch.get_num_threads() == threads  # the masked dense network's torch
    finally:
        torch.set_num_threads(before)


def test_a_damaged_plan_fails_loudly(mnist, tmp_path):
    ckpt, bench, data = mnist
    src = Path(bench["serving"]["path"])
    for name in (WEIGHTS, "model.onnx"):
        folder = tmp_path / name
        subprocess.run(["cp", "-r", str(src), str(folder)], check=True)
        blob = bytearray((folder / name).read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        (folder / name).write_bytes(bytes(blob))
        with pytest.raises(PlanError, match=rf"{name}: content differs from the digest"):
            load_plan(folder)
    # A plan whose numbers were changed consistently (digests rewritten) fails its check.
    folder = tmp_path / "rewritten"
    subprocess.run(["cp", "-r", str(src), str(folder)], check=True)
    from safetensors.numpy import load_file, save_file

    arrays = load_file(str(folder / WEIGHTS))
    key = next(k for k in arrays if k.endswith(".bias"))
    arrays[key] = arrays[key] + 1.0
    save_file(arrays, str(folder / WEIGHTS))
    plan = json.loads((folder / PLAN).read_text())
    import hashlib

    plan["files"][WEIGHTS] = hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
    (folder / PLAN).write_text(json.dumps(plan))
    model = model_from_checkpoint(ckpt)[0]
    with pytest.raises(PlanError, match="route numpy fails its check"):
        check_plan(folder, model, data.test_x[:200])
    with pytest.raises(PlanError, match="not a readable serving plan"):
        (folder / PLAN).write_text("{")
        read_plan(folder)


def test_a_plan_for_what_the_host_lacks_falls_back_and_says_so(mnist, tmp_path):
    """A plan built where a CUDA-only route exists (2:4) and a layer kernel from a library
    this host lacks: the runner serves the next measured route and kernel, and says so."""
    ckpt, bench, data = mnist
    folder = tmp_path / "plan"
    subprocess.run(["cp", "-r", bench["serving"]["path"], str(folder)], check=True)
    plan = json.loads((folder / PLAN).read_text())
    plan["routes"] = {"semi_structured_2:4": {"needs": ["cuda"]}, **plan["routes"]}
    for order in plan["ranking"].values():
        order.insert(0, "semi_structured_2:4")
    linear = next(s for s in plan["steps"] if s["op"] == "linear")
    linear["kernel"]["1"] = "torch_csr"
    (folder / PLAN).write_text(json.dumps(plan))
    # torch_csr needs torch; run where torch cannot be imported, as a serving host without it
    script = f"""
import sys, numpy as np
sys.modules["torch"] = None
from ticketsmith.serving.plan.runtime import load_plan
runner = load_plan({str(folder)!r})
print("\\n".join(runner.fallbacks))
np.save({str(tmp_path / 'labels.npy')!r}, runner.predict(np.load({str(tmp_path / 'x.npy')!r}),
        "labels"))
"""
    np.save(tmp_path / "x.npy", raw_pixels(data.test_x[:1]))
    if torch.cuda.is_available():
        pytest.skip("this host can run the CUDA route")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "route semi_structured_2:4 needs cuda, which this host lacks" in out.stdout
    assert f"{linear['name']} at batch 1: torch_csr needs torch, which this host lacks; csr " \
           "instead" in out.stdout
    assert "batch 1: serving" in out.stdout and "instead of the measured best " \
           "semi_structured_2:4" in out.stdout
    assert np.load(tmp_path / "labels.npy").tolist() == \
        masked_labels(ckpt, data.test_x[:1]).tolist()


def test_verify_refuses_a_plan_of_another_ticket(mnist, tmp_path):
    ckpt, bench, data = mnist
    folder = tmp_path / "plan"
    subprocess.run(["cp", "-r", bench["serving"]["path"], str(folder)], check=True)
    plan = json.loads((folder / PLAN).read_text())
    plan["source"]["level"] = 1
    (folder / PLAN).write_text(json.dumps(plan))
    with pytest.raises(PlanError, match="built for"):
        verify(folder, ckpt)


@pytest.mark.parametrize("granularity, extra", [
    ("neuron", []),
    ("channel", ["model.name=mnist_cnn", "model.options={}",
                 "data.options={n_train: 1200, n_test: 400, image_size: 12, num_classes: 4}"])])
def test_a_structured_ticket_ships_as_a_smaller_dense_network(tmp_path, granularity, extra):
    """No special case: the plan of a structured ticket is its compacted network, and every
    route gives the masked model's outputs."""
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      [f"experiment.output_dir={tmp_path}", "train.iterations=40",
                       "prune.levels=1", "experiment.variants=[ticket]",
                       f"prune.granularity={granularity}", *extra])
    result = run_experiment(cfg, progress=False, echo=lambda _: None)
    ckpt = RunStore(result.run_root).checkpoint_path(0, 1, "ticket")
    model, _, meta = model_from_checkpoint(ckpt)
    folder = tmp_path / "plan"
    from ticketsmith.serving.plan.build import build_plan

    build_plan(model, meta, folder)
    plan = read_plan(folder)
    assert "->" in plan["compaction"] and not plan["compaction"].startswith("not compacted")
    routes = ["onnxruntime", "numpy"] if granularity == "neuron" else ["onnxruntime"]
    # conv nets: the ONNX graph serves them; int8 only where a benchmark measured it, so an
    # unmeasured plan has no int8 route at all
    assert set(plan["routes"]) == set(routes)
    assert all(order == routes for order in plan["ranking"].values())
    x = torch.randn(64, *meta["input_shape"], generator=torch.Generator().manual_seed(3))
    check = check_plan(folder, model, x)
    assert check["routes"] == routes and check["argmax_agreement"] == 1.0
    with torch.inference_mode():
        ref = model(x).numpy()
    np.testing.assert_allclose(load_plan(folder).logits(x.numpy()), ref, atol=1e-4)


def test_feature_major_input_is_c_ordered():
    """The numpy route's kernels read rows: an F-ordered input would make torch copy it."""
    for spec in ({"shape": [1, 4, 4], "mean": [0.5], "std": [0.25]},
                 {"shape": [16], "mean": None, "std": None}):
        x = to_model_input(np.zeros((8, 16), np.uint8), spec, feature_major=True)
        assert x.shape == (16, 8) and x.flags.c_contiguous and x.dtype == np.float32


def test_natural_input_is_never_changed_in_place():
    spec = {"shape": [1, 2, 2], "mean": [0.5], "std": [0.25]}
    for images in (np.full((1, 4), 0.5, np.float32), np.full((3, 2, 2), 0.5, np.float32)):
        before = images.copy()
        for fm in (False, True):
            to_model_input(images, spec, feature_major=fm)
            np.testing.assert_array_equal(images, before)


def test_checking_a_plan_leaves_torchs_thread_count_as_it_was(mnist):
    """A ticket is checked while the next level trains (tracking/background.py): the check
    must not change the process-wide thread count the training runs at."""
    from ticketsmith.serving.plan.layout import default_threads

    ckpt, bench, data = mnist
    before = torch.get_num_threads()
    odd = default_threads() + 1  # neither the plan's own count nor the suite's one thread
    torch.set_num_threads(odd)
    try:
        verify(bench["serving"]["path"], ckpt, data.test_x[:200])
        assert torch.get_num_threads() == odd
    finally:
        torch.set_num_threads(before)
