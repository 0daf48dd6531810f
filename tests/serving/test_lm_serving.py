"""`ticketsmith generate` and `ticketsmith benchmark` on language-model checkpoints: the
continuation printed is the library's, bad input is one line and exit 2, and the
tokens-per-second JSON holds every figure (tiny settings: a few decoded tokens, two rounds)."""
from __future__ import annotations

import json

import pytest
import torch

from ticketsmith.cli import main
from ticketsmith.engine.checkpoint import save_checkpoint
from ticketsmith.engine.generate import Sampling, generate_text
from ticketsmith.engine.models import build_model
from ticketsmith.serving.lm_benchmark import FIGURES
from ticketsmith.engine.tokenizer import ByteTokenizer
from ticketsmith.serving.lm_load import load_lm

OPTIONS = {"layers": 2, "heads": 4, "width": 32}


def _save(path, net, **meta):
    return save_checkpoint(path, net.state_dict(), None, meta)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A structured GPT ticket (half its heads and MLP units zero, so compaction removes them),
    a 90%-sparse one, and an image model, as checkpoints the way the lottery writes them."""
    root = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    lm_meta = {"model": "gpt", "options": OPTIONS, "input_shape": [32], "num_classes": 256,
               "dataset": "sotu", "task": "language_model", "tokenizer": "byte",
               "level": 3, "variant": "ticket"}
    gpt = build_model("gpt", (32,), 256, options=OPTIONS).requires_grad_(False)
    for b in gpt.blocks:
        b.attn.proj.weight[:, :2 * b.attn.head_dim] = 0
        b.mlp.proj.weight[:, ::2] = 0
    sparse = build_model("gpt", (32,), 256, options=OPTIONS).requires_grad_(False)
    for b in sparse.blocks:
        for w in (b.attn.qkv.weight, b.attn.proj.weight, b.mlp.fc.weight, b.mlp.proj.weight):
            w.mul_(torch.rand(w.shape) > 0.9)
    image = build_model("mlp", (1, 8, 8), 4)
    wide = build_model("gpt", (32,), 256, options={**OPTIONS, "width": 64})
    return {"structured": _save(root / "structured.safetensors", gpt, **lm_meta),
            "dense": _save(root / "dense.safetensors", build_model("gpt", (32,), 256,
                                                                   options=OPTIONS),
                           **{**lm_meta, "level": 0, "variant": "dense"}),
            "wide": _save(root / "wide.safetensors", wide, **{**lm_meta, "options":
                                                                {**OPTIONS, "width": 64}}),
            "sparse": _save(root / "sparse.safetensors", sparse, **lm_meta),
            "image": _save(root / "image.safetensors", image, model="mlp", input_shape=[1, 8, 8],
                           num_classes=4, dataset="synthetic")}


def test_generate_prints_the_prompt_and_its_continuation(checkpoints, capsys):
    rc = main(["generate", "--checkpoint", str(checkpoints["structured"]), "--prompt", "We the",
               "--max-new-tokens", "12", "--temperature", "0.8", "--top-k", "20", "--seed", "5"])
    out = capsys.readouterr().out
    model, tok, _, _ = load_lm(checkpoints["structured"])
    expected = generate_text(model, tok, ["We the"], 12, Sampling(0.8, 20, 5))[0]
    assert rc == 0 and out == f"We the{expected}\n" and len(expected) > 0


@pytest.mark.parametrize("which, args, field", [
    ("structured", ["--prompt", ""], "--prompt"),
    ("structured", ["--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens"),
    ("structured", ["--prompt", "x", "--max-new-tokens", "40"], "context"),
    ("structured", ["--prompt", "x", "--temperature", "-0.5"], "--temperature"),
    ("image", ["--prompt", "x"], "image model"),
])
def test_generate_refuses_bad_input_in_one_line(checkpoints, capsys, which, args, field):
    rc = main(["generate", "--checkpoint", str(checkpoints[which]), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and field in err, err


def test_lm_benchmark_json_holds_every_figure(checkpoints, tmp_path, capsys):
    out = tmp_path / "lm.json"
    rc = main(["benchmark", "--checkpoint", str(checkpoints["structured"]), "--quick",
               "--batch-sizes", "1,2", "--prompt-tokens", "8", "--new-tokens", "4",
               "--usd-per-hour", "2.0", "--threads", "1", "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["kind"] == "language_model" and result["model"]["variant"] == "ticket"
    formats = result["formats"]
    assert set(formats) == {"dense", "compacted", "sparse"}
    assert all(f["correct"] and f["max_error"] <= 1e-4 for f in formats.values())
    assert "heads 8 -> 4" in formats["compacted"]["note"]
    rows = {(r["format"], r["batch_size"]): r for r in result["results"]}
    assert set(rows) == {(f, b) for f in formats for b in (1, 2)}
    for r in rows.values():
        assert set(FIGURES) <= set(r)
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert 0 < r["ttft_ms"] and 0 < r["token_latency_ms"]["p50"] <= r["token_latency_ms"]["p99"]
        assert r["peak_memory_bytes"] > r["weight_bytes"] > 0
        for phase in ("prefill", "decode"):
            spread = r[f"{phase}_speedup"]
            assert spread["min"] <= spread["median"] <= spread["max"]
        assert r["decode_bytes_per_token"] > 0 and r["decode_kv_bytes"] > 0
        assert r["decode_tokens_per_s_at_bandwidth"] > 0 and r["prefill_macs_per_token"] > 0
        # dollars per million tokens = price / tokens per hour
        assert r["usd_per_million_tokens"] == pytest.approx(2.0e6 / (r["decode_tokens_per_s"] * 3600))
    small, dense = rows[("compacted", 1)], rows[("dense", 1)]
    assert small["weight_bytes"] < dense["weight_bytes"]
    assert small["decode_ideal_speedup"] > 1 and small["prefill_ideal_speedup"] > 1
    env = result["environment"]
    assert env["memory_bandwidth_bytes_per_s"] > 0 and env["load_average"] is not None
    assert set(env["noise_floor"]) == {f"{p}_batch_{b}" for p in ("prefill", "decode")
                                       for b in (1, 2)}
    cost = result["cost"]
    assert cost["usd_per_hour"] == 2.0 and set(cost["per_batch"]) == {"1", "2"}
    assert cost["per_batch"]["1"]["dense_usd_per_million_tokens"] == \
        pytest.approx(dense["usd_per_million_tokens"])
    assert result["settings"] == {"prompt_tokens": 8, "new_tokens": 4, "batch_sizes": [1, 2],
                                  "rounds": 2, "prefill_reps": 1, "clock": "wall"}


def test_sparse_kernels_agree_with_the_masked_model_and_a_wrong_one_is_caught(checkpoints):
    from ticketsmith.serving.lm_benchmark import check_logits
    from ticketsmith.serving.lm_kernels import ScipyCSRLinear, sparse_model

    model, _, _, _ = load_lm(checkpoints["sparse"])
    right, _ = sparse_model(model, rows=1, trials=1)
    for b, ref in zip(right.blocks, model.blocks):  # every layer through scipy CSR
        for path in ("qkv", "proj"):
            layer = getattr(ref.attn, path)
            setattr(b.attn, path, ScipyCSRLinear(layer.weight, layer.bias))
        b.mlp.fc = ScipyCSRLinear(ref.mlp.fc.weight, ref.mlp.fc.bias)
    assert check_logits(right, model, 8) <= 1e-4
    wrong, _ = sparse_model(model, rows=1, trials=1)
    w = model.blocks[1].attn.qkv.weight  # block 1's weights in block 0
    wrong.blocks[0].attn.qkv = ScipyCSRLinear(w, None)
    assert check_logits(wrong, model, 8) > 1e-4


def test_default_price_names_its_instance(checkpoints, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert main(["benchmark", "--checkpoint", str(checkpoints["sparse"]), "--quick",
                 "--batch-sizes", "1", "--prompt-tokens", "4", "--new-tokens", "2",
                 "--formats", "compacted", "--node", "gpu", "--threads", "1",
                 "--output", str(out)]) == 0
    cost = json.loads(out.read_text())["cost"]
    assert cost["usd_per_hour"] == 1.006 and "g5.xlarge" in cost["instance"] and cost["price_date"]
    assert isinstance(ByteTokenizer().decode([104, 105]), str)


def test_the_experiments_dense_model_is_the_timed_baseline(checkpoints):
    """--dense-checkpoint: the dense model of the same experiment runs every `dense` turn;
    the formats are still checked against the masked ticket."""
    from ticketsmith.serving.lm_benchmark import benchmark_lm_model

    ticket, _, _, _ = load_lm(checkpoints["structured"])
    dense, _, _, _ = load_lm(checkpoints["dense"])
    calls = {"dense": 0, "ticket": 0}
    for name, net in (("dense", dense), ("ticket", ticket)):
        net.blocks[0].attn.qkv.register_forward_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    result = benchmark_lm_model(ticket, baseline=dense, batch_sizes=(1,), prompt_tokens=4,
                                new_tokens=3, trials=1, prefill_reps=1, formats=["compacted"])
    # the ticket runs only in the logit checks: prefill + 4 steps, once per phase
    assert calls["dense"] > 0 and calls["ticket"] == 2 * (1 + 4)
    assert "dense model" in result["formats"]["dense"]["note"]
    assert result["formats"]["compacted"]["correct"]


def test_a_dense_checkpoint_of_another_architecture_is_refused(checkpoints, tmp_path, capsys):
    rc = main(["benchmark", "--checkpoint", str(checkpoints["structured"]), "--quick",
               "--dense-checkpoint", str(checkpoints["wide"]), "--threads", "1",
               "--output", str(tmp_path / "x.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--dense-checkpoint" in err, err
    assert not (tmp_path / "x.json").exists()


def test_the_cpu_clock_times_every_turn(checkpoints, monkeypatch):
    """--clock cpu: every prefill and decode step is read from the thread's CPU-time clock."""
    from ticketsmith.serving import lm_benchmark

    reads = []

    def clock():
        reads.append(1)
        return len(reads) * 1e-3  # 1 ms of CPU time between two reads

    monkeypatch.setitem(lm_benchmark.CLOCKS, "cpu", clock)
    model, _, _, _ = load_lm(checkpoints["structured"])
    result = lm_benchmark.benchmark_lm_model(model, batch_sizes=(1,), prompt_tokens=4,
                                             new_tokens=3, trials=1, prefill_reps=1,
                                             formats=["compacted"], clock="cpu")
    assert result["settings"]["clock"] == "cpu" and reads
    assert "thread_time" in result["environment"]["timer"]
    for r in result["results"]:  # every step and prefill read as 1 ms
        assert r["token_latency_ms"]["p50"] == pytest.approx(1.0)
        assert r["ttft_ms"] == pytest.approx(1.0) and r["decode_tokens_per_s"] == pytest.approx(1e3)


def test_log_mlflow_logs_the_lm_benchmark_to_a_run(checkpoints, tmp_path, monkeypatch, capsys):
    """--log-mlflow on a language-model checkpoint: one `benchmark` run in a real SQLite store
    with the tokens/s, speedups and $ per million tokens of the JSON, and the JSON itself."""
    import mlflow
    from mlflow import MlflowClient

    from ticketsmith.tracking.benchmarks import BENCHMARK_ARTIFACT

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "lm.json"
    rc = main(["benchmark", "--checkpoint", str(checkpoints["structured"]), "--quick",
               "--dense-checkpoint", str(checkpoints["dense"]), "--batch-sizes", "1",
               "--prompt-tokens", "4", "--new-tokens", "3", "--formats", "compacted",
               "--threads", "1", "--output", str(out), "--log-mlflow"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    mlflow.set_tracking_uri(None)
    assert [r.info.run_name for r in runs] == ["benchmark"]
    run = runs[0]
    assert run.data.tags["ticketsmith.checkpoint"] == str(checkpoints["structured"])
    row = next(r for r in result["results"] if r["format"] == "compacted")
    m = run.data.metrics
    assert m["speedup_decode_compacted_bs1"] == pytest.approx(row["decode_speedup"]["median"])
    assert m["decode_tokens_per_s_compacted_bs1"] == pytest.approx(row["decode_tokens_per_s"])
    assert m["usd_per_m_tokens_dense_bs1"] > 0 and "prefill_tokens_per_s_dense_bs1" in m
    logged = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{BENCHMARK_ARTIFACT}")
    assert logged["results"] == result["results"]
