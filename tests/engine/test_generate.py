"""Generation with a KV cache gives the tokens of recomputing the whole sequence (greedy), for
dense, masked and compacted GPTs and a Hugging Face GPT-2; a batch of prompts of different
lengths gives each prompt its own tokens; seeded sampling repeats; stop strings cut."""
from __future__ import annotations

import codecs
import contextlib
import importlib
import io

import pytest
import torch

from ticketsmith.engine.generate import (Decoder, GenerationError, Sampling, generate_ids,
                                         generate_text, gpt_step)
from ticketsmith.engine.lm_train import generate as recompute
from ticketsmith.engine.models import prunable_weights
from ticketsmith.engine.transformer import GPT
from ticketsmith.serving.compaction import compact_gpt
from ticketsmith.engine.tokenizer import ByteTokenizer

CONTEXT = 64
with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
    ZEN = codecs.decode(importlib.import_module("this").s, "rot13")
PROMPTS = ["The state of the ", "We ", "It is the duty of the people to "]


def train_tiny_gpt(steps: int = 200, seed: int = 0) -> GPT:
    """A real (if brief) training run on the Zen of Python (fixed text, in every Python):
    peaked, text-like predictions."""
    torch.manual_seed(seed)
    text = torch.tensor(list(ZEN.encode()))
    model = GPT(256, CONTEXT, layers=2, heads=4, width=32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(len(text) - CONTEXT - 1, (8,), generator=g)
        rows = torch.stack([text[s:s + CONTEXT + 1] for s in starts.tolist()])
        loss = torch.nn.functional.cross_entropy(model(rows[:, :-1]).reshape(-1, 256),
                                                 rows[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


def unstructured(model: GPT, sparsity: float = 0.5) -> GPT:
    """Per-layer magnitude pruning of the block Linears to `sparsity`."""
    out = GPT(256, CONTEXT, layers=2, heads=4, width=32)
    out.load_state_dict(model.state_dict())
    out.requires_grad_(False)
    for w in prunable_weights(out).values():
        cut = w.abs().flatten().kthvalue(int(sparsity * w.numel())).values
        w.mul_(w.abs() > cut)
    return out.eval().requires_grad_(False)


def structured(model: GPT) -> GPT:
    """Half the heads (output columns of attn.proj) and MLP hidden units removed per block."""
    out = GPT(256, CONTEXT, layers=2, heads=4, width=32)
    out.load_state_dict(model.state_dict())
    out.requires_grad_(False)
    for b in out.blocks:
        b.attn.proj.weight[:, :2 * b.attn.head_dim] = 0
        b.mlp.proj.weight[:, ::2] = 0
    return out.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def models() -> dict[str, GPT]:
    dense = train_tiny_gpt()
    half = structured(dense)
    small, _ = compact_gpt(half)
    assert sum(b.attn.heads for b in small.blocks) == 4  # 8 -> 4: compaction did remove heads
    return {"dense": dense, "masked": unstructured(dense), "structured": half,
            "compacted": small}


def _ids(prompts):
    return [list(p.encode()) for p in prompts]


@pytest.mark.parametrize("name", ["dense", "masked", "compacted"])
def test_kv_cache_gives_the_tokens_of_recomputing_the_sequence(models, name):
    model, seen = models[name], set()
    for ids in _ids(PROMPTS):
        cached = generate_ids(model, [ids], 24)[0]
        assert cached == recompute(model, ids, 24, CONTEXT), name
        seen |= set(cached)
    assert len(seen) > 1 or name == "compacted"  # a real continuation, not one token repeated


@pytest.mark.parametrize("name", ["dense", "masked", "structured", "compacted"])
def test_every_cached_step_gives_the_full_forward_logits(models, name):
    """Teacher-forced: prefill a prompt, feed the rest one token at a time, and compare each
    step's logits with the whole sequence's forward pass at that position."""
    model = models[name]
    seq = torch.tensor([list(b"It is the duty of the people to keep")])
    full = model(seq)[0]
    dec = Decoder(model)
    steps = [dec.prefill([seq[0, :10].tolist()], seq.shape[1] - 10)]
    steps += [dec.step(seq[:, t]) for t in range(10, seq.shape[1])]
    torch.testing.assert_close(torch.cat(steps), full[9:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("lengths", [[12], [12, 5, 9]], ids=["batch 1", "padded batch"])
@pytest.mark.parametrize("name", ["masked", "compacted"])
def test_the_decode_fast_path_gives_the_general_steps_logits(models, name, lengths):
    """`Decoder.step` (decode_step.StepPlan) against `gpt_step`, the path prefill takes, from
    the same prefilled cache, token for token: a left-padded batch included."""
    model = models[name]
    prompts = [list(ZEN.encode()[40:40 + n]) for n in lengths]
    fast, general = Decoder(model), Decoder(model)
    logits, ref = fast.prefill(prompts, 12), general.prefill(prompts, 12)
    pos, cache = general.next_pos[:, None], general.cache
    for _ in range(12):
        tokens = ref.argmax(-1)
        logits = fast.step(tokens)
        cache.valid[:, cache.filled] = True
        ref = gpt_step(model, tokens[:, None], pos, cache)
        pos = pos + 1
        torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)
    assert fast.cache.filled == cache.filled


def test_compacted_model_continues_like_the_masked_one(models):
    ids = _ids(PROMPTS)
    assert generate_ids(models["compacted"], ids, 24) == generate_ids(models["structured"], ids, 24)


@pytest.mark.parametrize("name", ["dense", "masked"])
def test_a_batch_of_different_lengths_gives_each_prompt_its_own_tokens(models, name):
    model, ids = models[name], _ids(PROMPTS)
    assert len({len(i) for i in ids}) == 3
    batch = generate_ids(model, ids, 20)
    assert batch == [generate_ids(model, [i], 20)[0] for i in ids]


def test_seeded_sampling_repeats_and_the_seed_matters(models):
    model, ids = models["dense"], _ids(PROMPTS)
    draw = lambda seed: generate_ids(model, ids, 20, Sampling(1.0, 20, seed))  # noqa: E731
    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
    assert draw(3) != generate_ids(model, ids, 20)  # sampling is not greedy


def test_stop_strings_cut_the_continuation(models):
    model, tok = models["dense"], ByteTokenizer()
    full = generate_text(model, tok, [PROMPTS[0]], 24)[0]
    stop = full[6:8]
    cut = generate_text(model, tok, [PROMPTS[0]], 24, stop=(stop,))[0]
    assert cut == full[:full.find(stop)] and len(cut) < len(full)


def test_bad_requests_are_refused(models):
    model = models["dense"]
    with pytest.raises(GenerationError, match="context"):
        generate_ids(model, [[1] * 60], 5)  # 60 + 5 > 64
    with pytest.raises(GenerationError, match="max_new_tokens"):
        generate_ids(model, [[1]], -1)
    with pytest.raises(GenerationError, match="prompt"):
        generate_text(model, ByteTokenizer(), [""], 4)
    with pytest.raises(GenerationError, match="not a language model"):
        generate_ids(torch.nn.Linear(2, 2), [[1]], 1)


def test_hugging_face_gpt2_decodes_through_its_own_cache():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=CONTEXT, n_embd=32, n_layer=2,
                                  n_head=4)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # sharper logits than GPT-2's small init, so argmax is decided
        for p in model.parameters():
            p.mul_(8 if p.dim() > 1 else 1)
    ids = _ids(PROMPTS)
    batch = generate_ids(model, ids, 16)
    assert batch == [recompute(model, i, 16, CONTEXT) for i in ids]
