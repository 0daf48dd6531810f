"""The served model's input contract, on an MNIST ticket trained for real: every natural form
(uint8, float 0..1, float 0..255, flat or shaped) gives the masked model's logits, input
already normalised is served as is when the caller says so (`input: normalized`, per call or
in the model's config), and anything else — normalised input without the flag, pixels below 0
or above 255, NaN, infinity, an unknown form — is refused with one line, through every route
of the runtime and through the logged pyfunc alike."""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from ticketsmith.base.config import load_config
from ticketsmith.engine.checkpoint import model_from_checkpoint
from ticketsmith.engine.data import normalisation
from ticketsmith.engine.lottery import run_experiment
from ticketsmith.engine.store import RunStore
from ticketsmith.serving.plan.build import ensure_plan
from ticketsmith.serving.plan.layout import PlanError
from ticketsmith.serving.plan.runtime import load_plan
from ticketsmith.tracking.registry import log_ticket_model

REPO = Path(__file__).resolve().parents[2]
N = 200  # test images per form


@pytest.fixture(scope="module")
def ticket(tmp_path_factory):
    """(plan folder, checkpoint, uint8 test images (N, 28, 28), the masked model's logits on
    them, their normalised form as torchvision's Normalize writes it)."""
    root = tmp_path_factory.mktemp("input")
    cfg = load_config(REPO / "configs" / "imp_mnist.yaml", [
        f"experiment.output_dir={root / 'runs'}", "train.iterations=60", "train.epochs=null",
        "train.eval_every=30", "prune.levels=1", "experiment.variants=[ticket]",
        "experiment.benchmark=false", f"data.root={REPO / 'data'}", "data.val_size=500"])
    result = run_experiment(cfg, progress=False, echo=lambda _: None)
    ckpt = RunStore(result.run_root).checkpoint_path(0, 1, "ticket")
    mean, std = (np.float32(v[0]) for v in normalisation("mnist"))
    x = result.data.test_x[:N].cpu()
    u8 = ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    normalised = ((u8.astype(np.float32) / 255 - mean) / std)[:, None]  # (N, 1, 28, 28)
    model = model_from_checkpoint(ckpt)[0]
    with torch.inference_mode():
        logits = model(torch.from_numpy(normalised)).numpy()
    plan = ensure_plan(RunStore.serving_next_to(ckpt), ckpt)
    return plan, ckpt, u8, logits, normalised


def natural_forms(u8: np.ndarray) -> dict[str, np.ndarray]:
    return {"uint8 (N, 28, 28)": u8, "uint8 flat": u8.reshape(len(u8), -1),
            "uint8 (N, 1, 28, 28)": u8[:, None], "int64 0..255": u8.astype(np.int64),
            "float 0..1": u8.astype(np.float32) / 255, "float64 0..1 flat":
            (u8.astype(np.float64) / 255).reshape(len(u8), -1),
            "float 0..255": u8.astype(np.float32)}


def refused_forms(u8: np.ndarray, normalised: np.ndarray) -> dict[str, tuple[np.ndarray, str]]:
    """Input outside the pixel contract, and the words its one-line refusal must hold."""
    above = u8.astype(np.float32)
    above[3, 5, 5] = 300.0
    nan, inf = u8.astype(np.float32) / 255, u8.astype(np.float32)
    nan[0, 0, 0], inf[1, 2, 3] = np.nan, np.inf
    return {"normalised without the flag": (normalised, '"input": "normalized"'),
            "negative integers": (u8.astype(np.int16) - 5, "got values from -5"),
            "a pixel above 255": (above, "to 300"), "NaN": (nan, "NaN or infinity"),
            "infinity": (inf, "NaN or infinity")}


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text.startswith("input: expected"), text
    return text


def test_every_input_form_through_every_route_of_the_runtime(ticket):
    folder, _, u8, logits, normalised = ticket
    routes = list(load_plan(folder).routes)
    assert routes == ["onnxruntime", "numpy"], routes
    for route in routes:
        runner = load_plan(folder, threads=1, route=route)
        for name, data in natural_forms(u8).items():
            got = runner.predict(data, "logits")
            np.testing.assert_allclose(got, logits, atol=1e-4, err_msg=f"{route}: {name}")
        got = runner.predict(normalised, "logits", "normalized")
        np.testing.assert_allclose(got, logits, atol=1e-4, err_msg=f"{route}: normalised")
        for n in (1, 7):  # one sample (the batch-1 path), and a small batch
            np.testing.assert_allclose(runner.predict(u8[:n], "logits"), logits[:n], atol=1e-4)
        for name, (data, said) in refused_forms(u8, normalised).items():
            with pytest.raises(PlanError) as exc:
                runner.predict(data, "labels")
            assert said in one_line(exc), (route, name, str(exc.value))
        with pytest.raises(PlanError, match="input: expected pixels or normalized, got 'z'"):
            runner.predict(u8, "labels", "z")


def test_every_input_form_through_the_logged_pyfunc(ticket, sqlite_uri):
    folder, ckpt, u8, logits, normalised = ticket
    with mlflow.start_run():
        uri = log_ticket_model(Path(ckpt), folder).model_uri
    for fmt in ("serving", "masked_dense"):
        model = mlflow.pyfunc.load_model(uri, model_config={"format": fmt, "threads": 1})
        for name, data in natural_forms(u8).items():
            got = model.predict(data, params={"output": "logits"})
            np.testing.assert_allclose(got, logits, atol=1e-4, err_msg=f"{fmt}: {name}")
        got = model.predict(normalised, params={"output": "logits", "input": "normalized"})
        np.testing.assert_allclose(got, logits, atol=1e-4, err_msg=f"{fmt}: normalised")
        for name, (data, said) in refused_forms(u8, normalised).items():
            with pytest.raises(PlanError) as exc:
                model.predict(data)
            assert said in one_line(exc), (fmt, name, str(exc.value))
    # a deployment of normalised pipelines says so once, in the model's config
    model = mlflow.pyfunc.load_model(uri, model_config={"input": "normalized", "threads": 1})
    got = model.predict(normalised, params={"output": "labels"})
    assert (got == logits.argmax(1)).all()
    with pytest.raises(PlanError, match="input: expected finite numbers"):
        model.predict(normalised * np.nan)
