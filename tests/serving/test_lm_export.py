"""`ticketsmith export --format onnx` on language-model tickets: one ONNX graph with the KV
cache gives the masked model's prefill and decode logits and greedy tokens in ONNX Runtime,
at any batch and prompt length; an export with a wrong cache index is refused and nothing is
written; bad input is one line and exit 2."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from ticketsmith.cli import main
from ticketsmith.engine.checkpoint import model_from_checkpoint, save_checkpoint
from ticketsmith.engine.generate import generate_ids
from ticketsmith.engine.lottery import run_experiment
from ticketsmith.engine.models import build_model, count_params
from ticketsmith.engine.store import RunStore
from ticketsmith.serving import lm_export
from ticketsmith.serving.export import ExportError, onnx_weights, ort_session
from ticketsmith.serving.lm_export import check_lm, export_lm_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_lm import tiny_lm  # noqa: E402

OPTIONS = {"layers": 2, "heads": 4, "width": 32}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A GPT with random weights, a head-structured ticket trained by the lottery (one level,
    half of each block's 4 heads removed) and an image model, as checkpoints."""
    root = tmp_path_factory.mktemp("lm_export")
    torch.manual_seed(0)
    gpt = build_model("gpt", (32,), 256, options=OPTIONS)
    cfg = tiny_lm(root / "runs", "prune.granularity=head", "prune.levels=1",
                  "train.iterations=10", f"model.options={OPTIONS}".replace("'", ""),
                  "experiment.variants=[ticket]")
    result = run_experiment(cfg, progress=False, echo=lambda s: None)
    return {"random": save_checkpoint(root / "random.safetensors", gpt.state_dict(), None, {
                "model": "gpt", "options": OPTIONS, "input_shape": [32], "num_classes": 256,
                "dataset": "sotu", "task": "language_model", "tokenizer": "byte"}),
            "structured": RunStore(result.run_root).checkpoint_path(0, 1, "ticket"),
            "image": save_checkpoint(root / "image.safetensors",
                                     build_model("mlp", (1, 8, 8), 4).state_dict(), None,
                                     {"model": "mlp", "input_shape": [1, 8, 8], "num_classes": 4,
                                      "dataset": "synthetic"})}


def ort_greedy(path: Path, prompts: np.ndarray, steps: int) -> tuple[list, np.ndarray]:
    """(logits of the prefill then of each decode step, greedy tokens) from the ONNX file,
    written here apart from the export's own check."""
    sess = ort_session(str(path), threads=1)
    pasts = [i for i in sess.get_inputs() if i.name != "ids"]
    feed = {i.name: np.zeros((len(prompts), i.shape[1], 0, i.shape[3]), np.float32)
            for i in pasts}
    out = sess.run(None, {"ids": prompts, **feed})
    logits, tokens = [out[0]], [out[0][:, -1].argmax(-1)]
    for _ in range(steps):
        out = sess.run(None, {"ids": tokens[-1][:, None], **dict(zip(feed, out[1:]))})
        logits.append(out[0][:, -1])
        tokens.append(out[0][:, -1].argmax(-1))
    return logits, np.stack(tokens, 1)


@pytest.mark.parametrize("kind, heads", [("random", "heads 8 -> 8"),
                                         ("structured", "heads 8 -> 4")])
def test_the_onnx_export_decodes_like_the_masked_model(tmp_path, checkpoints, kind, heads):
    out = tmp_path / f"{kind}.onnx"
    summary = export_lm_checkpoint(checkpoints[kind], out)
    assert summary["compaction"].startswith(heads)
    assert summary["greedy_tokens_identical"] == 3 * (8 + 1)  # 3 prompts of 16, 8 steps
    model, _, _ = model_from_checkpoint(checkpoints[kind])
    model.eval()
    # Other batch sizes and prompt lengths than the check's (3 x 16): the axes are dynamic.
    for batch, length in ((1, 5), (4, 11)):
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, 256, (batch, length), generator=g)
        logits, tokens = ort_greedy(out, prompts.numpy(), steps=6)
        new = generate_ids(model, prompts.tolist(), 7)  # the torch KV-cache decoder, greedy
        assert tokens.tolist() == new
        with torch.inference_mode():
            full = model(torch.cat([prompts, torch.tensor(new)[:, :6]], 1)).numpy()
        np.testing.assert_allclose(logits[0], full[:, :length], rtol=1e-4, atol=1e-4)
        for j, step in enumerate(logits[1:]):
            np.testing.assert_allclose(step, full[:, length + j], rtol=1e-4, atol=1e-4)
    assert summary["onnx_weights"] == onnx_weights(out.read_bytes())
    if kind == "structured":
        assert summary["onnx_weights"] < count_params(model)
        assert [b["heads"] for b in summary["blocks"]] == [2, 2]
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["context"] == 32 and sidecar["tokenizer"] == "byte"


class WrongCacheIndex(lm_export.CacheStep):
    """The planted bug: each block attends over the value cache as if it held the keys."""

    def forward(self, ids, *past):
        swapped = [past[i ^ 1] for i in range(len(past))]
        return super().forward(ids, *swapped)


def test_an_export_with_a_wrong_cache_index_is_refused_and_not_written(
        tmp_path, checkpoints, monkeypatch, capsys):
    monkeypatch.setattr(lm_export, "CacheStep", WrongCacheIndex)
    out = tmp_path / "bad.onnx"
    rc = main(["export", "--checkpoint", str(checkpoints["structured"]), "--output", str(out)])
    err = capsys.readouterr().err.strip()
    # The prefill has an empty cache and passes; the first decode step reads the cache.
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "logits at decode step 1 differ from the masked model's" in err
    assert not out.exists() and not Path(f"{out}.json").exists()


def test_the_check_refuses_a_file_whose_weights_differ(tmp_path, checkpoints):
    out = tmp_path / "s.onnx"
    export_lm_checkpoint(checkpoints["structured"], out, prompt_tokens=4, decode_steps=2)
    graph = onnx.load(str(out))
    init = max(graph.graph.initializer, key=lambda i: int(np.prod(i.dims)))
    w = numpy_helper.to_array(init).copy()
    w.flat[int(np.abs(w).argmax())] += 1.0  # one weight off by one
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    model, _, _ = model_from_checkpoint(checkpoints["structured"])
    prompts = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ExportError, match="prefill logits differ"):
        check_lm(graph.SerializeToString(), model.eval(), prompts, 2)
    assert check_lm(str(out), model, prompts, 2)["greedy_tokens_identical"] == 6


def test_the_cli_prints_four_lines_and_writes_beside_the_checkpoint_name(
        tmp_path, checkpoints, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["export", "--checkpoint", str(checkpoints["random"]), "--prompt-tokens", "8",
               "--decode-steps", "4"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 4, lines
    assert lines[0] == "gpt: heads 8 -> 8, MLP hidden units 256 -> 256"
    assert "3 prompts of 8 seeded random tokens, 4 greedy decode steps" in lines[2]
    assert "15 greedy tokens identical" in lines[2]
    assert "wrote random.onnx" in lines[3] and (tmp_path / "random.onnx.json").is_file()


@pytest.mark.parametrize("which, args, says", [
    ("image", ["--prompt-tokens", "8"], "--prompt-tokens: only for language-model checkpoints"),
    ("image", ["--decode-steps", "2"], "--decode-steps: only for language-model checkpoints"),
    ("absent", [], "absent.safetensors"),
    ("random", ["--prompt-tokens", "30", "--decode-steps", "8"], "exceed the model's context"),
    ("random", ["--decode-steps", "0"], "--decode-steps: expected >= 1, got 0"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, checkpoints, capsys, which, args, says):
    path = checkpoints.get(which, tmp_path / "absent.safetensors")
    out = tmp_path / "x.onnx"
    rc = main(["export", "--checkpoint", str(path), "--output", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and says in err, err
    assert not out.exists()


@pytest.mark.slow  # importing transformers: about 20 s on a loaded 2-core machine
def test_a_hugging_face_model_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "examples" / "lm"))
    from hf_gpt2 import gpt2

    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "hf.safetensors", gpt2((16,), 50, layers=1, heads=2,
                                                             width=16).state_dict(), None, {
        "model": "gpt2", "factory": "hf_gpt2:gpt2", "options": {"layers": 1, "heads": 2,
                                                                "width": 16},
        "input_shape": [16], "num_classes": 50, "task": "language_model"})
    out = tmp_path / "hf.onnx"
    rc = main(["export", "--checkpoint", str(path), "--allow-factory", "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "covers ticketsmith's GPT only" in err and not out.exists()
