"""The language-model champion's backend (`serving/lm_backend.py`) without MLflow: which model
serves (a structured ticket compacted when its logits are the masked model's, anything else
masked), that it gives the engine's text, and one-line refusals. Random-weight GPTs saved as the
lottery saves them: routing does not depend on what was learned."""
from __future__ import annotations

import pytest
import torch

from ticketsmith.engine.checkpoint import save_checkpoint
from ticketsmith.engine.generate import GenerationError, Sampling, generate_text
from ticketsmith.engine.models import build_model
from ticketsmith.engine.tokenizer import ByteTokenizer
from ticketsmith.serving import lm_backend
from ticketsmith.serving.lm_backend import load_backend

OPTIONS = {"layers": 2, "heads": 4, "width": 32}
META = {"model": "gpt", "options": OPTIONS, "input_shape": [48], "num_classes": 256,
        "dataset": "sotu", "task": "language_model", "tokenizer": "byte"}
PROMPTS = ["The ", "We the people "]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A structured ticket (half the heads and MLP units of every block zero) and an
    unstructured one (half of each block weight zero: no unit is wholly removed, whereas at 90%
    a few MLP units of 32 weights each would be, and compact exactly)."""
    root = tmp_path_factory.mktemp("lm_backend")
    torch.manual_seed(0)
    structured = build_model("gpt", (48,), 256, options=OPTIONS).requires_grad_(False)
    for b in structured.blocks:
        b.attn.proj.weight[:, :2 * b.attn.head_dim] = 0
        b.mlp.proj.weight[:, ::2] = 0
    unstructured = build_model("gpt", (48,), 256, options=OPTIONS).requires_grad_(False)
    for b in unstructured.blocks:
        for w in (b.attn.qkv.weight, b.attn.proj.weight, b.mlp.fc.weight, b.mlp.proj.weight):
            w.mul_(torch.rand(w.shape) > 0.5)
    return {name: save_checkpoint(root / f"{name}.safetensors", net.state_dict(), None, META)
            for name, net in (("structured", structured), ("unstructured", unstructured))}


def engine_text(checkpoint, n, sampling=Sampling()):
    masked = load_backend(checkpoint, route="masked_dense").model
    return generate_text(masked, ByteTokenizer(), PROMPTS, n, sampling)


def test_a_structured_ticket_serves_compacted_with_the_masked_models_text(checkpoints):
    backend = load_backend(checkpoints["structured"])
    assert backend.route == "compacted"
    assert [b.attn.heads for b in backend.model.blocks] == [2, 2]
    assert [b.mlp.fc.out_features for b in backend.model.blocks] == [64, 64]
    assert backend.check["max_abs_error"] <= backend.check["tolerance"]
    assert backend.checked().startswith("compacted (heads 8 -> 4, MLP hidden units 256 -> 128)")
    sampled = Sampling(0.9, 20, 3)
    assert backend.generate(PROMPTS, max_new_tokens=12) == engine_text(checkpoints["structured"],
                                                                       12)
    assert backend.generate(PROMPTS, max_new_tokens=12, temperature=0.9, top_k=20, seed=3) == \
        engine_text(checkpoints["structured"], 12, sampled)


def test_an_unstructured_ticket_serves_its_masked_model_and_says_why(checkpoints):
    backend = load_backend(checkpoints["unstructured"])
    assert backend.route == "masked_dense"
    assert backend.checked() == "masked dense: no head or hidden unit is wholly pruned"


def test_a_compaction_whose_logits_differ_is_not_served(checkpoints, monkeypatch):
    real = lm_backend.compact_gpt

    def off_by_a_little(model):  # a compaction bug: one kept weight changed
        small, summary = real(model)
        with torch.no_grad():
            small.blocks[0].mlp.fc.weight[0, 0] += 0.5
        return small, summary

    monkeypatch.setattr(lm_backend, "compact_gpt", off_by_a_little)
    backend = load_backend(checkpoints["structured"])
    assert backend.route == "masked_dense"
    assert backend.checked().startswith("masked dense: compacted logits: max |output difference|")


@pytest.mark.parametrize("kwargs, field", [({"max_new_tokens": -1}, "max_new_tokens"),
                                           ({"max_new_tokens": 2.5}, "max_new_tokens"),
                                           ({"max_new_tokens": 4, "temperature": -1},
                                            "temperature"),
                                           ({"max_new_tokens": 4, "top_k": -3}, "top_k"),
                                           ({"max_new_tokens": 40}, "context")])
def test_bad_requests_are_one_line_naming_the_argument(checkpoints, kwargs, field):
    with pytest.raises(GenerationError) as err:
        load_backend(checkpoints["structured"]).generate(PROMPTS, **kwargs)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and field in message


def test_an_unknown_route_is_refused_in_one_line(checkpoints):
    with pytest.raises(GenerationError, match=r"^format: expected one of serving, masked_dense"):
        load_backend(checkpoints["structured"], route="int8")
