"""`ticketsmith export --format onnx` on tickets trained for real: the ONNX file gives the
masked model's outputs in ONNX Runtime and holds fewer weights than the dense model; bad
checkpoints are one line and exit 2; a models:/ URI works against a real SQLite store; and
the check refuses an export whose weights differ."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from ticketsmith.cli import main
from ticketsmith.base.config import load_config
from ticketsmith.engine.checkpoint import model_from_checkpoint, save_checkpoint
from ticketsmith.engine.lottery import run_experiment
from ticketsmith.engine.models import build_model, count_params
from ticketsmith.engine.store import RunStore
from ticketsmith.serving.checkpoint_export import export_checkpoint
from ticketsmith.serving.export import ExportError, check_outputs, onnx_weights, run_onnx

REPO = Path(__file__).resolve().parents[2]
# One level of structured pruning (half the hidden units or channels): a ticket whose
# compaction really shrinks it, trained in about a second.
STRUCTURED = ["train.iterations=40", "prune.levels=1", "experiment.variants=[ticket]"]
LENET = ["model.name=mnist_cnn", "model.options={}", "prune.granularity=channel",
         "data.options={n_train: 1200, n_test: 400, image_size: 12, num_classes: 4}"]


def ticket(root: Path, *overrides: str) -> Path:
    """The level-1 ticket checkpoint of the tiny experiment with `overrides`."""
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      [f"experiment.output_dir={root}", *STRUCTURED, *overrides])
    result = run_experiment(cfg, progress=False, echo=lambda _: None)
    return RunStore(result.run_root).checkpoint_path(0, 1, "ticket")


@pytest.fixture(scope="module")
def tickets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tickets")
    return {"mlp": ticket(root, "prune.granularity=neuron"), "lenet": ticket(root, *LENET)}


@pytest.mark.parametrize("kind, shrunk", [
    ("mlp", "hidden.0 32->16"),
    ("lenet", "conv1 6->3, conv2 16->8, fc1 120->60, fc2 84->42")])
def test_the_onnx_export_round_trips(tmp_path, tickets, kind, shrunk):
    out = tmp_path / f"{kind}.onnx"
    summary = export_checkpoint(tickets[kind], out, data_root=tmp_path / "data")
    assert summary["compacted"] and shrunk in summary["compaction"]
    model, _, meta = model_from_checkpoint(tickets[kind])
    # Fresh inputs, not the probe the export was checked on: the file itself is right.
    x = torch.randn(33, *meta["input_shape"], generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        ref = model(x).numpy()
    np.testing.assert_allclose(run_onnx(str(out), x.numpy()), ref, rtol=1e-4, atol=1e-4)
    assert summary["onnx_weights"] == onnx_weights(out.read_bytes()) < count_params(model)
    assert summary["onnx_bytes"] == out.stat().st_size < summary["dense_bytes"]
    assert summary["argmax_agreement"] == 1.0 and summary["max_abs_error"] <= summary["tolerance"]
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["input"] == {"name": "x", "shape": ["batch", *meta["input_shape"]],
                                "dtype": "float32", "normalisation": None}  # synthetic data
    assert sidecar["compaction"] == summary["compaction"] and sidecar["opset"] == summary["opset"]


# In a fresh process: each ticket exported through `onnx_bytes` without the `onnx` package
# being imported, then by torch's exporter with its own last step (which imports `onnx`).
WITHOUT_ONNX = """
import io, json, sys
import torch
from ticketsmith.engine.checkpoint import model_from_checkpoint
from ticketsmith.serving.compaction import as_chain, compact
from ticketsmith.serving.export import OPSET, onnx_bytes
nets = [compact(as_chain(model_from_checkpoint(path)[0]))[0] for path in sys.argv[1:]]
shapes = [tuple(model_from_checkpoint(path)[2]["input_shape"]) for path in sys.argv[1:]]
ours = [onnx_bytes(net, shape) for net, shape in zip(nets, shapes)]
imported = "onnx" in sys.modules
same = []
for net, shape, blob in zip(nets, shapes, ours):
    buf = io.BytesIO()
    torch.onnx.export(net, (torch.zeros(1, *shape),), buf, input_names=["x"],
                      output_names=["y"], opset_version=OPSET, dynamo=False,
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    same.append(blob == buf.getvalue())
print(json.dumps({"onnx_imported": imported, "same": same,
                  "torch_imported_onnx": "onnx" in sys.modules,
                  "sizes": [len(blob) for blob in ours]}))
"""


def test_the_export_is_torchs_own_bytes_without_importing_onnx(tmp_path, tickets):
    """The exporter's last step imports `onnx` (0.7 s of CPU per process) only to add the
    functions of custom operators; skipped, the bytes are exactly torch's own export."""
    import subprocess
    import sys

    from torch.onnx._internal.torchscript_exporter import onnx_proto_utils

    from ticketsmith.serving.export import onnx_bytes

    step = onnx_proto_utils._add_onnxscript_fn
    onnx_bytes(torch.nn.Linear(4, 2), (4,))
    assert onnx_proto_utils._add_onnxscript_fn is step  # torch's own step is back after
    out = subprocess.run([sys.executable, "-c", WITHOUT_ONNX, str(tickets["mlp"]),
                          str(tickets["lenet"])],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["onnx_imported"] is False and got["torch_imported_onnx"] is True
    assert got["same"] == [True, True] and min(got["sizes"]) > 1000


def test_the_probe_is_the_test_set_when_it_fits_else_seeded_noise(tmp_path, tickets):
    mlp = export_checkpoint(tickets["mlp"], tmp_path / "a.onnx", data_root=tmp_path)
    assert mlp["probe"] == "the first 400 synthetic test images"
    # The LeNet was trained on 12x12 images; the built-in synthetic set is 8x8.
    lenet = export_checkpoint(tickets["lenet"], tmp_path / "b.onnx", data_root=tmp_path)
    assert lenet["probe"].startswith("1,000 inputs of seeded noise (no synthetic test data")
    none = export_checkpoint(tickets["mlp"], tmp_path / "c.onnx", data_root=None)
    assert none["probe"] == "1,000 inputs of seeded noise (no data root given)"


def test_the_check_refuses_an_export_whose_weights_differ(tmp_path, tickets):
    out = tmp_path / "t.onnx"
    export_checkpoint(tickets["mlp"], out, data_root=None)
    graph = onnx.load(str(out))
    init = max((i for i in graph.graph.initializer if i.dims and len(i.dims) == 2),
               key=lambda i: int(np.prod(i.dims)))
    w = numpy_helper.to_array(init).copy()
    w.flat[int(np.abs(w).argmax())] += 1.0  # one weight off by one
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    model, _, meta = model_from_checkpoint(tickets["mlp"])
    x = torch.randn(64, *meta["input_shape"], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(x).numpy()
    got = run_onnx(graph.SerializeToString(), x.numpy())
    with pytest.raises(ExportError, match=r"max \|output difference\| .* exceeds"):
        check_outputs(got, ref)
    check_outputs(run_onnx(str(out), x.numpy()), ref)  # the untouched file passes


# A network the exporter's tracer cannot follow: which sign the output takes depends on the
# input's values, and the tracer records the branch its all-zero example input took.
VALUE_GATED = """
from torch import nn


class ValueGated(nn.Module):
    def __init__(self, features, num_classes):
        super().__init__()
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x):
        y = self.fc(x.flatten(1))
        return y if bool((x != 0).any()) else -y


def build(input_shape, num_classes):
    return ValueGated(input_shape[0] * input_shape[1] * input_shape[2], num_classes)
"""


def test_an_export_that_differs_from_the_masked_model_is_refused_and_not_written(
        tmp_path, monkeypatch):
    """The export's own check, end to end: the file and its sidecar are written only after
    ONNX Runtime gave the masked model's outputs on the probe."""
    (tmp_path / "value_gated.py").write_text(VALUE_GATED)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    model = build_model("gated", (1, 4, 4), 3, factory="value_gated:build")
    path = save_checkpoint(tmp_path / "gated.safetensors", model.state_dict(), meta={
        "model": "gated", "factory": "value_gated:build", "options": {},
        "input_shape": [1, 4, 4], "num_classes": 3, "dataset": "synthetic"})
    out = tmp_path / "gated.onnx"
    with pytest.raises(ExportError, match=r"max \|output difference\| .* exceeds"):
        export_checkpoint(path, out, data_root=None, allow_factory=True)
    assert not out.exists() and not Path(f"{out}.json").exists()


def test_the_export_is_held_to_float_precision_of_the_masked_model(tmp_path, tickets):
    """The bound the export is checked to: 1e-4 x max(1, max |masked output|) on its probe."""
    from ticketsmith.serving.checkpoint_export import probe_batch

    summary = export_checkpoint(tickets["mlp"], tmp_path / "m.onnx", data_root=None)
    model, _, meta = model_from_checkpoint(tickets["mlp"])
    x, _ = probe_batch(meta, None)
    with torch.inference_mode():
        ref = model(x).numpy()
    assert summary["tolerance"] == pytest.approx(1e-4 * max(1.0, float(np.abs(ref).max())))
    assert summary["max_abs_error"] <= summary["tolerance"]


def test_a_model_that_is_not_a_chain_is_exported_uncompacted_and_says_so(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet20", (3, 8, 8), 4, options={"width": 4}).eval()
    path = save_checkpoint(tmp_path / "resnet.safetensors", model.state_dict(), meta={
        "model": "resnet20", "options": {"width": 4}, "input_shape": [3, 8, 8],
        "num_classes": 4, "dataset": "cifar10"})
    summary = export_checkpoint(path, tmp_path / "r.onnx", data_root=tmp_path / "none")
    assert not summary["compacted"]
    assert summary["compaction"].startswith("not compacted: ResNet20 is not a straight chain")
    assert summary["probe"].startswith("1,000 inputs of seeded noise")
    assert summary["input"]["normalisation"]["mean"] == [0.4914, 0.4822, 0.4465]


def test_cli_writes_beside_the_checkpoint_name_and_prints_one_summary(tmp_path, tickets,
                                                                      monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--checkpoint", str(tickets["lenet"]), "--format", "onnx"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("mnist_cnn: inputs 1->1, conv1 6->3")
    assert lines[1].startswith("weights: ") and "dense" in lines[1]
    assert "max |difference|" in lines[2] and "argmax agreement 100.00%" in lines[2]
    assert "ONNX opset 17" in lines[3] and "checkpoint.onnx" in lines[3]
    assert (tmp_path / "checkpoint.onnx").is_file()
    assert (tmp_path / "checkpoint.onnx.json").is_file()
    with pytest.raises(SystemExit) as exc:
        main(["export", "--checkpoint", str(tickets["lenet"]), "--format", "tflite"])
    assert exc.value.code == 2


def test_a_truncated_or_missing_checkpoint_is_one_line_and_exit_2(tmp_path, tickets, capsys):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tickets["mlp"].read_bytes()[:-100])
    for path in (cut, tmp_path / "absent.safetensors"):
        assert main(["export", "--checkpoint", str(path), "--output",
                     str(tmp_path / "x.onnx")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"error: {path}:"), err
    assert not (tmp_path / "x.onnx").exists()


def test_a_registered_ticket_exports_from_its_models_uri(tmp_path, tickets, sqlite_uri):
    import mlflow
    from mlflow import MlflowClient

    from ticketsmith.tracking.benchmarks import resolve_checkpoint
    from ticketsmith.tracking.registry import register_ticket

    client = MlflowClient(sqlite_uri)
    with mlflow.start_run() as run:
        pass
    version = register_ticket(client, "tiny_ticket", run.info.run_id, tickets["mlp"])
    client.set_registered_model_alias("tiny_ticket", "champion", version)
    uri = "models:/tiny_ticket@champion"
    summary = export_checkpoint(resolve_checkpoint(uri), data_root=None, source=uri)
    assert summary["path"] == "tiny_ticket.onnx" and summary["compacted"]
    assert summary["checkpoint"] == "models:/tiny_ticket@champion"
    assert Path("tiny_ticket.onnx").is_file()  # the fixture's working directory: tmp_path
