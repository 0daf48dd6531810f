"""The language-model serving plan: every route agrees with the masked model (exact ones to
float rounding, int8 by bits per byte and greedy agreement), the KV cache of every route
gives the tokens of recomputing the whole sequence, a plan is refused for another ticket
and when a file of it is damaged, and the route per phase and batch follows measurement.

Tiny random-weight GPTs (width 32, 2 blocks) whose weights are scaled up so that their
greedy tokens vary (at GPT-2's init scale every position predicts the same byte).
"""
from __future__ import annotations

import json

import pytest
import torch

from ticketsmith.engine.checkpoint import save_checkpoint
from ticketsmith.engine.generate import Decoder, generate_ids
from ticketsmith.engine.models import build_model
from ticketsmith.engine.tokenizer import ByteTokenizer
from ticketsmith.serving import agreement
from ticketsmith.serving.plan.layout import PlanError
from ticketsmith.serving.lm_plan.build import (LmPlanSettings, build_lm_plan, ensure_lm_plan,
                                             rank_lm_routes)
from ticketsmith.serving.lm_plan.check import PROMPTS, bits_per_byte, greedy_agreement
from ticketsmith.serving.lm_plan.runtime import checkpoint_digest, load_lm_plan

OPTIONS = {"layers": 2, "heads": 4, "width": 32}
META = {"model": "gpt", "options": OPTIONS, "input_shape": [64], "num_classes": 256,
        "dataset": "sotu", "task": "language_model", "tokenizer": "byte", "level": 3,
        "variant": "ticket", "hash": "abc123"}
QUICK = LmPlanSettings(batch_sizes=(1, 8), prompt_tokens=8, new_tokens=4, trials=1,
                       kernel_trials=1, kernel_block_s=0.0005, check_steps=6)
# A measured table (seconds per token) in which every phase and batch size has a different
# winner: prefill 1 dense, prefill 8 sparse, decode 1 compacted, decode 8 int8.
TABLE = {("prefill", 1): {"dense": 1.0, "compacted": 2.0, "sparse": 3.0, "int8": 4.0},
         ("prefill", 8): {"dense": 4.0, "compacted": 3.0, "sparse": 1.0, "int8": 2.0},
         ("decode", 1): {"dense": 3.0, "compacted": 1.0, "sparse": 2.0, "int8": 5.0},
         ("decode", 8): {"dense": 9.0, "compacted": 8.0, "sparse": 7.0, "int8": 6.0}}


def _ticket(seed: int):
    """A structured ticket (half the heads and MLP units removed) with 80% of the rest of
    its qkv and MLP-input weights zero, so compaction and the sparse kernels both apply."""
    torch.manual_seed(seed)
    gpt = build_model("gpt", (64,), 256, options=OPTIONS).requires_grad_(False)
    for p in gpt.parameters():
        if p.dim() >= 2:
            p.mul_(20)
        else:  # biases and LayerNorms away from their 0 / 1 init, so a dropped one shows
            p.add_(0.1 * torch.randn(p.shape))
    for b in gpt.blocks:
        b.attn.proj.weight[:, :2 * b.attn.head_dim] = 0
        b.mlp.proj.weight[:, ::2] = 0
        for w in (b.attn.qkv.weight, b.mlp.fc.weight):
            w.mul_(torch.rand(w.shape) > 0.8)
    return gpt.eval()


def table_timer(models, phase, batch):
    return {r: TABLE[(phase, batch)][r] for r in models}


def csr_first(calls):
    """Kernel 'measurement' that favours scipy's CSR: every layer runs a sparse kernel."""
    return {n: 0.0 if n == "scipy_csr" else 1.0 for n in calls}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-plan")
    model = _ticket(0)
    ck = save_checkpoint(root / "ticket.safetensors", model.state_dict(), None, META)
    folder = build_lm_plan(model, ByteTokenizer(), META, root / "plan",
                           checkpoint_sha256=checkpoint_digest(ck), settings=QUICK,
                           timer=table_timer, kernels_timer=csr_first, threads=1)
    return {"model": model, "checkpoint": ck, "folder": folder, "root": root,
            "runner": load_lm_plan(folder, expect_checkpoint_digest=checkpoint_digest(ck))}


def _ids(n: int = 3) -> list[list[int]]:
    tok = ByteTokenizer()
    return [tok.encode(p) for p in PROMPTS[:n]]


@torch.inference_mode()
def _trace(model, prompts, fed: list[list[int]]):
    """Logits of a prefill and of KV-cache steps fed the tokens `fed` (per prompt)."""
    dec = Decoder(model)
    out = [dec.prefill(prompts, len(fed[0]) + 1)]
    for step in torch.tensor(fed).T:
        out.append(dec.step(step))
    return torch.cat(out).numpy()


def test_every_exact_route_gives_the_masked_models_logits(built):
    runner, model = built["runner"], built["model"]
    assert set(runner.models) == {"dense", "compacted", "sparse", "int8"}
    fed = generate_ids(model, _ids(), 5)  # the masked model's greedy continuations
    want = _trace(model, _ids(), fed)
    for route, m in runner.models.items():
        if route == "int8":
            continue
        for key, each in (m.items() if isinstance(m, dict) else [("all", m)]):
            record, why = agreement.exact(_trace(each, _ids(), fed), want)
            assert why is None, f"{route} {key}: {why}"
    sparse = runner.describe()["sparse_kernels"]
    assert all(v == "8/8 layers sparse" for v in sparse.values()), sparse


def test_int8_route_is_judged_by_bits_per_byte_and_greedy_agreement(built):
    runner, model, tok = built["runner"], built["model"], ByteTokenizer()
    recorded = runner.plan["check"]["int8"]
    bpb, ref = bits_per_byte(runner.models["int8"], tok), bits_per_byte(model, tok)
    agree = greedy_agreement(runner.models["int8"], model, _ids(4), QUICK.check_steps)
    assert recorded["bits_per_byte"] == pytest.approx(bpb)
    assert recorded["masked_bits_per_byte"] == pytest.approx(ref)
    assert recorded["greedy_agreement"] == pytest.approx(agree)
    assert recorded["passed"] and bpb - ref <= agreement.LM_BPB_DELTA
    assert agree >= agreement.LM_GREEDY_AGREEMENT
    assert bpb != ref  # really int8: not the float weights again


def test_a_failed_int8_check_is_recorded_and_never_ranked():
    record, why = agreement.language_model(6.3, 6.0, 0.99)
    assert why is not None and "bits per byte" in why and record["bpb_delta"] == pytest.approx(0.3)
    ranking = rank_lm_routes({"decode": {"1": TABLE[("decode", 8)]}}, ["dense", "compacted"])
    assert ranking == {"decode": {"1": ["compacted", "dense"]}}


@torch.inference_mode()
def _recomputed(model, prompts, steps: int) -> list[list[int]]:
    """Greedy tokens by running the whole sequence again at every step (no cache)."""
    out = []
    for p in prompts:
        seq = list(p)
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        out.append(seq[len(p):])
    return out


def test_kv_cache_of_every_route_gives_the_tokens_of_recomputing(built):
    runner, prompts = built["runner"], _ids(4)  # different lengths: left padding
    # int8 is left out: torch's dynamic int8 Linear scales activations by the range of each
    # call's rows, so one decoded row and a recomputed sequence round differently (it is
    # judged by bits per byte and greedy agreement instead).
    models = {"masked": built["model"], **{r: (m["decode_8"] if isinstance(m, dict) else m)
                                           for r, m in runner.models.items() if r != "int8"}}
    for name, model in models.items():
        assert generate_ids(model, prompts, 8) == _recomputed(model, prompts, 8), name


def test_runner_switches_routes_between_prefill_and_decode_and_keeps_the_tokens(built):
    runner, tok = built["runner"], ByteTokenizer()
    text = list(PROMPTS[:1])
    # batch 1 prefills on dense (every head) and decodes on compacted (half of them)
    assert runner.describe()["routes"]["prefill"]["1"] == "dense"
    assert runner.describe()["routes"]["decode"]["1"] == "compacted"
    shipped = runner.plan["check"]["shipped"]  # the build checked the pair as it runs
    assert shipped["1"]["prefill"] == "dense" and shipped["1"]["max_abs_error"] < 1e-3
    assert shipped["8"] == {"prefill": "sparse", "decode": "int8", "checked": False}
    want = [tok.decode(t) for t in _recomputed(built["model"], [tok.encode(text[0])], 8)]
    assert runner.generate(text, max_new_tokens=8) == want
    # and the other way: prefill on compacted heads, decode on all of them
    flipped = load_lm_plan(built["folder"])
    flipped.order = {"prefill": {1: ["compacted"], 8: ["compacted"]},
                     "decode": {1: ["dense"], 8: ["dense"]}}
    assert flipped.generate(text, max_new_tokens=8) == want
    sampled = runner.generate(text * 2, max_new_tokens=6, temperature=0.8, top_k=20, seed=3)
    assert sampled == runner.generate(text * 2, max_new_tokens=6, temperature=0.8, top_k=20,
                                      seed=3)


def test_route_per_phase_and_batch_follows_measurement(built):
    plan, routes = built["runner"].plan, built["runner"].describe()["routes"]
    for (phase, b), times in TABLE.items():
        assert plan["ranking"][phase][str(b)] == sorted(times, key=times.get)
        assert routes[phase][str(b)] == min(times, key=times.get)
    # requests are served at the measured batch size nearest theirs (log scale: 2 -> 1, 3 -> 8)
    assert [built["runner"].model_for("decode", n)[0] for n in (2, 3)] == ["compacted", "int8"]


def test_a_plan_for_another_ticket_is_refused_and_ensure_rebuilds_it(built, tmp_path):
    other = save_checkpoint(tmp_path / "other.safetensors", _ticket(1).state_dict(), None, META)
    with pytest.raises(PlanError) as err:
        load_lm_plan(built["folder"], expect_checkpoint_digest=checkpoint_digest(other))
    assert len(str(err.value).splitlines()) == 1 and "another ticket" in str(err.value)
    folder = tmp_path / "plan"
    ensure_lm_plan(folder, built["checkpoint"], settings=QUICK, threads=1)  # measured for real
    before = json.loads((folder / "plan.json").read_text())
    assert before["source"]["checkpoint_sha256"] == checkpoint_digest(built["checkpoint"])
    noise = before["measured"]["decode"]["1"]["dense (again)"]  # timed, never ranked
    assert noise > 0 and "dense (again)" not in before["ranking"]["decode"]["1"]
    assert ensure_lm_plan(folder, built["checkpoint"], settings=QUICK) == folder
    assert json.loads((folder / "plan.json").read_text()) == before  # fresh: not rebuilt
    ensure_lm_plan(folder, other, settings=QUICK, threads=1)
    after = load_lm_plan(folder, expect_checkpoint_digest=checkpoint_digest(other))
    assert after.plan["source"]["checkpoint_sha256"] != before["source"]["checkpoint_sha256"]


@pytest.mark.parametrize("name, damage", [
    ("dense.safetensors", lambda b: b[:-1] + bytes([b[-1] ^ 1])),
    ("int8.safetensors", lambda b: b[:100]),
    ("plan.json", lambda b: b[: len(b) // 2]),
    ("plan.json", lambda b: json.dumps({k: v for k, v in json.loads(b).items()
                                        if k != "models"}).encode()),
])
def test_a_damaged_plan_file_is_refused_in_one_line_and_rebuilt(built, tmp_path, name, damage):
    import shutil

    folder = tmp_path / "plan"
    shutil.copytree(built["folder"], folder)
    (folder / name).write_bytes(damage((folder / name).read_bytes()))
    with pytest.raises(PlanError) as err:
        load_lm_plan(folder)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and str(folder / name) in message, message
    ensure_lm_plan(folder, built["checkpoint"], settings=QUICK, timer=table_timer,
                   kernels_timer=csr_first, threads=1)
    assert load_lm_plan(folder).generate(["We"], max_new_tokens=3) == \
        built["runner"].generate(["We"], max_new_tokens=3)


@pytest.mark.slow  # the benchmark and a measured plan build: a few seconds on an idle machine
def test_benchmark_with_plan_dir_prints_the_routes_it_ships(built, tmp_path, capsys):
    from ticketsmith.cli import main

    out, folder = tmp_path / "lm.json", tmp_path / "plan"
    rc = main(["benchmark", "--checkpoint", str(built["checkpoint"]), "--quick",
               "--batch-sizes", "1,2", "--prompt-tokens", "8", "--new-tokens", "4",
               "--threads", "1", "--plan-dir", str(folder), "--output", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    routes = load_lm_plan(folder).describe()["routes"]
    line = next(s for s in printed.splitlines() if s.startswith("serving plan"))
    assert line.endswith("; ".join(f"{ph} " + ", ".join(f"batch {b}: {r}" for b, r in
                                                        routes[ph].items())
                                   for ph in ("prefill", "decode")))
    assert json.loads(out.read_text())["serving_plan"]["routes"] == routes


def test_a_model_other_than_the_gpt_is_refused_in_one_line(tmp_path):
    with pytest.raises(PlanError) as err:
        build_lm_plan(torch.nn.Linear(4, 4), ByteTokenizer(), META, tmp_path / "plan",
                      checkpoint_sha256="x", settings=QUICK)
    assert len(str(err.value).splitlines()) == 1 and "Linear" in str(err.value)


def test_a_route_this_host_cannot_run_falls_back_to_the_next_measured(built, monkeypatch):
    import ticketsmith.serving.lm_plan.runtime as runtime

    def no_engine(*_):  # what torch raises on a build without a quantized engine
        raise RuntimeError("Didn't find engine for operation quantized::linear_prepack")

    monkeypatch.setattr(runtime, "int8_gpt", no_engine)
    runner = load_lm_plan(built["folder"])
    said = runner.describe()
    assert "int8" not in runner.models and said["routes"]["decode"]["8"] == "sparse"
    assert any("int8 cannot run" in f for f in said["fallbacks"])
    assert any("decode batch 8: serving sparse instead of the measured best int8" in f
               for f in said["fallbacks"])
