"""A served ticket needs no torch: in a fresh process, importing the module MLflow loads for a
registered ticket (`ticketsmith.tracking.pyfunc_model`) imports no torch, and with torch made
unimportable the logged model loads its plan and predicts the masked model's labels; only the
masked dense format, asked for, brings torch in."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import torch

from ticketsmith.base.config import load_config
from ticketsmith.engine.checkpoint import model_from_checkpoint
from ticketsmith.engine.lottery import run_experiment
from ticketsmith.engine.store import RunStore
from ticketsmith.serving.plan.build import ensure_plan
from ticketsmith.tracking.registry import log_ticket_model

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
import numpy as np
import ticketsmith.tracking.pyfunc_model
imported = "torch" in sys.modules
sys.modules["torch"] = None  # from here on, `import torch` raises ImportError
import mlflow
model = mlflow.pyfunc.load_model(sys.argv[1], model_config={"threads": 1})
x = np.load(sys.argv[2])
labels = model.predict(x, params={"output": "labels"}).tolist()
plan_loaded_torch = sys.modules["torch"] is not None
del sys.modules["torch"]  # torch importable again: the masked dense format imports it
dense = model.predict(x, params={"output": "labels", "format": "masked_dense"}).tolist()
print(json.dumps({"torch_on_import": imported, "plan_loaded_torch": plan_loaded_torch,
                  "labels": labels, "dense": dense,
                  "torch_after_dense": sys.modules.get("torch") is not None}))
"""


def test_a_logged_ticket_loads_and_predicts_without_torch(tmp_path, sqlite_uri):
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      [f"experiment.output_dir={tmp_path / 'runs'}", "prune.levels=1",
                       "experiment.variants=[ticket]"])
    result = run_experiment(cfg, progress=False, echo=lambda _: None)
    ckpt = RunStore(result.run_root).checkpoint_path(0, 1, "ticket")
    plan = ensure_plan(RunStore.serving_next_to(ckpt), ckpt)
    with mlflow.start_run():
        uri = log_ticket_model(ckpt, plan).model_uri
    x = result.data.test_x[:50].cpu()
    np.save(tmp_path / "x.npy", x.numpy())
    with torch.inference_mode():
        want = model_from_checkpoint(ckpt)[0](x).argmax(1).tolist()
    out = subprocess.run([sys.executable, "-c", SCRIPT, uri, str(tmp_path / "x.npy")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["torch_on_import"] is False
    assert got["plan_loaded_torch"] is False  # still blocked: nothing asked for it
    assert got["labels"] == want and got["dense"] == want
    assert got["torch_after_dense"] is True
