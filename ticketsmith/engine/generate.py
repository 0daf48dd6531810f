"""Text generation with a KV cache: prefill the prompt once, then decode one token at a time.

Two model families:
- our GPT (engine/transformer.py), run functionally over its own submodules (`ln1`,
  `attn.qkv`, `attn.proj`, `ln2`, `mlp`) with each block's own head count, so a compacted
  structured ticket (fewer heads, narrower MLP per block) and a model whose Linear layers were
  swapped for sparse kernels (serving/lm_benchmark.py) decode through the same code: prefill
  here (`gpt_step`), each decode step as flat calls without module dispatch
  (engine/decode_step.py, which also holds the cache);
- Hugging Face causal LMs, through their own `past_key_values`.

A batch of prompts of different lengths is left-padded; an attention mask hides the padding
and every prompt gets its own positions (0 at its first real token), so each prompt decodes
exactly as it would alone (to float rounding). The context limit is refused, not slid: the
learned absolute positions of a GPT end at `context`, and a sliding window would have to
recompute the whole cache at every step. `prompt + max_new_tokens > context` is a
`GenerationError` naming both.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ticketsmith.base.errors import ConfigError
from ticketsmith.engine.decode_step import Cache, StepPlan
from ticketsmith.engine.transformer import GPT


class GenerationError(ConfigError):
    """A request the model cannot serve (empty prompt, too long, not a language model): bad
    input, exit 2 at the command line."""


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; else softmax(logits / temperature), cut to the top_k logits
    when set, drawn with a generator seeded by `seed` (the same seed gives the same tokens)."""
    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0


def _norm(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """`ln(x)` without nn.Module's call machinery (a few us per call, 5 calls a step)."""
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _attention(block: nn.Module, x: torch.Tensor, cache: Cache, i: int, start: int,
               mask: torch.Tensor | None) -> torch.Tensor:
    a = block.attn
    b, t, _ = x.shape
    qkv = a.qkv(_norm(block.ln1, x)).view(b, t, 3, a.heads, a.head_dim)
    cache.qkv[i][:, start:start + t] = qkv
    q = qkv[:, :, 0].transpose(1, 2)
    keys, values = cache.k[i][:, :, :start + t], cache.v[i][:, :, :start + t]
    # Without padding, prefill is plain causal attention and a decode step sees every key.
    causal = mask is None and t > 1
    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal)
    return a.proj(y.transpose(1, 2).reshape(b, t, a.heads * a.head_dim))


def gpt_step(model: GPT, ids: torch.Tensor, pos: torch.Tensor, cache: Cache) -> torch.Tensor:
    """Run `ids` (batch, t) at positions `pos` (batch, t) after the cached ones; returns the
    last position's logits (batch, vocab) and fills the cache."""
    start, t = cache.filled, ids.shape[1]
    mask = None
    if cache.padded:
        keys = torch.arange(start + t, device=ids.device)
        causal = keys[None, :] <= (start + torch.arange(t, device=ids.device))[:, None]
        # A padded query still sees itself, so no row is all -inf (NaN); nothing reads it.
        self_key = keys[None, :] == (start + torch.arange(t, device=ids.device))[:, None]
        mask = ((causal & cache.valid[:, None, :start + t]) | self_key)[:, None]
    x = F.embedding(ids, model.wte.weight) + F.embedding(pos, model.wpe.weight)
    for i, block in enumerate(model.blocks):
        x = x + _attention(block, x, cache, i, start, mask)
        x = x + block.mlp(_norm(block.ln2, x))
    cache.filled = start + t
    return F.linear(_norm(model.ln_f, x[:, -1]), model.wte.weight)


class Decoder:
    """prefill(prompts) → first logits; step(tokens) → next logits. One object per request
    batch; `family` is 'gpt' or 'hf'."""

    def __init__(self, model: nn.Module, max_length: int | None = None):
        self.model = model
        if isinstance(model, GPT):
            self.family, self.context = "gpt", model.context
        elif hasattr(model, "config") and hasattr(model, "generation_config"):
            self.family = "hf"
            # transformers >= 5.2x calls `past_key_values` `cache` (argument and output field).
            params = inspect.signature(model.forward).parameters
            self.past_name = "cache" if "cache" in params else "past_key_values"
            self.context = int(getattr(model.config, "n_positions", None)
                               or getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        else:
            raise GenerationError(f"{type(model).__name__} is not a language model (expected "
                                  "the GPT or a Hugging Face causal LM)")
        self.max_length = max_length
        self.plan: StepPlan | None = None
        self.device = next(model.parameters()).device

    def prefill(self, prompts: list[list[int]], new_tokens: int) -> torch.Tensor:
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1:
            raise GenerationError("prompt: empty after tokenization; give at least one token")
        width = max(lengths)
        if width + new_tokens > self.context:
            raise GenerationError(f"prompt ({width} tokens) + max_new_tokens ({new_tokens}) "
                                  f"exceed the model's context ({self.context} tokens)")
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        valid = torch.zeros(len(prompts), width, dtype=torch.bool, device=self.device)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p, device=self.device)
            valid[r, width - len(p):] = True
        # Each prompt's own positions: 0 at its first real token (padding gets 0 too).
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        self.next_pos = pos[:, -1] + 1
        if self.family == "hf":
            self.mask = valid.long()
            out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos,
                             use_cache=True)
            self.past = getattr(out, self.past_name)
            return out.logits[:, -1]
        self.cache = Cache(self.model, len(prompts), width + new_tokens, self.device,
                           self.model.wte.weight.dtype)
        self.cache.pad(valid)
        return gpt_step(self.model, ids, pos, self.cache)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch,) → logits (batch, vocab) of the position after them."""
        if self.family == "gpt":
            return self._gpt_step(tokens)
        pos = self.next_pos[:, None]
        self.next_pos = self.next_pos + 1
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask,
                         position_ids=pos, use_cache=True, **{self.past_name: self.past})
        self.past = getattr(out, self.past_name)
        return out.logits[:, -1]

    def _gpt_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """The decode step's fast path (`decode_step.StepPlan`, one per model: a plan's
        Decoder swaps models between prefill and decode)."""
        cache = self.cache
        if self.plan is None or self.plan.model is not self.model:
            self.plan = StepPlan(self.model)
        if not cache.padded:  # every row is at the same position, the cache's length
            return self.plan(tokens, cache.filled, cache)  # (`next_pos` is not kept up)
        cache.valid[:, cache.filled] = True  # what `gpt_step`'s mask reads, if it runs next
        pos, self.next_pos = self.next_pos, self.next_pos + 1
        return self.plan(tokens, pos, cache)


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None
         ) -> torch.Tensor:
    """Next tokens (batch,) from logits (batch, vocab): argmax, or a seeded top-k draw."""
    if sampling.temperature <= 0:  # in any float dtype: widening keeps the order
        return logits.argmax(-1)
    logits = logits.float()
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, -1).cpu()
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)


@torch.inference_mode()
def generate_ids(model: nn.Module, prompts: list[list[int]], max_new_tokens: int,
                 sampling: Sampling = Sampling(),
                 stop: Callable[[int, list[int]], bool] | None = None,
                 decoder: Callable[[nn.Module], Decoder] = Decoder) -> list[list[int]]:
    """New token ids per prompt (prompt not included). `stop(row, new_ids)` ends a row early
    (its tokens so far are kept); decoding ends when every row has stopped. `decoder` makes
    the Decoder (a serving plan's switches models between prefill and decode)."""
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    try:
        dec = decoder(model)
        logits = dec.prefill(prompts, max_new_tokens)
        gen = torch.Generator().manual_seed(sampling.seed) if sampling.temperature > 0 else None
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for n in range(max_new_tokens):
            tokens = pick(logits, sampling, gen)
            for r, t in enumerate(tokens.tolist()):
                if not done[r]:
                    out[r].append(t)
                    done[r] = stop is not None and stop(r, out[r])
            if all(done) or n == max_new_tokens - 1:
                break
            logits = dec.step(tokens)
        return out
    finally:
        model.train(was_training)


def generate_text(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int,
                  sampling: Sampling = Sampling(), stop: tuple[str, ...] = (),
                  decoder: Callable[[nn.Module], Decoder] = Decoder) -> list[str]:
    """Continuations of `prompts` as text, each cut before the first stop string it holds."""
    if any(not p for p in prompts):
        raise GenerationError("prompt: empty; give some text to continue")
    ids = [list(tokenizer.encode(p)) for p in prompts]

    def stopped(row: int, new: list[int]) -> bool:
        text = tokenizer.decode(new)
        return any(s in text for s in stop)

    new = generate_ids(model, ids, max_new_tokens, sampling, stopped if stop else None, decoder)
    return [cut(tokenizer.decode(t), stop) for t in new]


def cut(text: str, stop: tuple[str, ...]) -> str:
    """`text` up to (not including) the earliest stop string in it."""
    ends = [text.find(s) for s in stop if s and s in text]
    return text[:min(ends)] if ends else text


def check_request(prompts: list[str], max_new_tokens: int, temperature: float,
                  top_k: int | None) -> None:
    """A generation request's arguments, each refused in one line naming it (GenerationError):
    what the served champion's backend and its serving plan both check first."""
    if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens \
            or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens: expected an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:  # also refuses NaN
        raise GenerationError(f"temperature: expected >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and top_k < 0:
        raise GenerationError(f"top_k: expected >= 1 (0 or none: every token), got {top_k!r}")
    if not all(isinstance(p, str) for p in prompts):
        raise GenerationError("prompts: expected strings")
