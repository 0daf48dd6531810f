"""ONNX export of a language-model ticket with its KV cache, checked in ONNX Runtime first.

One graph serves both phases. Inputs: `ids` (batch, tokens) int64 and, per block i,
`past_key_<i>` and `past_value_<i>` (batch, heads_i, past, head_dim) float32. Outputs:
`logits` (batch, tokens, vocab) and `present_key_<i>`, `present_value_<i>` (batch, heads_i,
past + tokens, head_dim). Prefill passes pasts of length 0 and the prompt; each decode step
passes the last presents and one token per row. Positions are past .. past + tokens - 1: the
rows of a batch share one length (no padding), and past + tokens must stay within the
model's context (its learned positions end there). Batch, tokens and past are dynamic axes.

The network exported is the compacted ticket (`compaction.compact_gpt`: a structured
ticket's removed heads and MLP units gone, so heads_i may differ per block). The exporter is
torch's TorchScript-based one (`dynamo=False`), as for images: the dynamo exporter needs
`onnxscript`, which is not a dependency. `scaled_dot_product_attention` with a boolean
mask over the cached keys exports as it is (opset 17), so the step below is the training
model's own arithmetic, reordered only by the runtime's kernels.

Before anything is written, `check_lm` runs the file in ONNX Runtime against the masked model
(recomputed over the whole sequence, no cache): the prefill logits of every prompt position,
then each decode step's logits within `agreement.exact`, and the greedy tokens identical.
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ticketsmith.base.errors import ConfigError, ExportError
from ticketsmith.base.files import atomic_write, atomic_write_text
from ticketsmith.base.secrets import redact
from ticketsmith.engine.models import count_params
from ticketsmith.engine.transformer import GPT
from ticketsmith.serving import agreement
from ticketsmith.serving.benchmark import format_bytes, load_ticket
from ticketsmith.serving.checkpoint_export import default_output
from ticketsmith.serving.compaction import compact_gpt
from ticketsmith.serving.export import OPSET, onnx_weights, ort_session
from ticketsmith.serving.formats import weight_bytes
from ticketsmith.serving.lm_load import is_language_model

PROBE_BATCH = 3  # prompts in the check; the export's example input has 2, so batch is dynamic
PROMPT_TOKENS, DECODE_STEPS = 16, 8  # the check's defaults, cut to fit a small context


class CacheStep(nn.Module):
    """A GPT run on `ids` after cached keys and values: (ids, *pasts) → (logits, *presents)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        g, (b, t) = self.model, ids.shape
        start = past[0].shape[2]
        pos = torch.arange(t, device=ids.device) + start
        # Query at position p sees the keys at positions <= p: every cached one, then causal.
        see = torch.arange(start + t, device=ids.device)[None, :] <= pos[:, None]
        # The tied embedding as one (width, vocab) matrix for both the lookup and the output
        # head: read as wte and wte.T, the exporter would store it twice (a folded transpose).
        table = g.wte.weight.t()
        x, present = table[:, ids].permute(1, 2, 0) + g.wpe(pos), []
        for i, block in enumerate(g.blocks):
            a = block.attn
            q, k, v = a.qkv(block.ln1(x)).view(b, t, 3, a.heads, a.head_dim).permute(2, 0, 3, 1, 4)
            k, v = torch.cat([past[2 * i], k], 2), torch.cat([past[2 * i + 1], v], 2)
            present += [k, v]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=see)
            x = x + a.proj(y.transpose(1, 2).reshape(b, t, a.heads * a.head_dim))
            x = x + block.mlp(block.ln2(x))
        return (g.ln_f(x) @ table, *present)


def cache_names(model: GPT, kind: str) -> list[str]:
    """`<kind>_key_<i>`, `<kind>_value_<i>` per block (kind 'past' or 'present')."""
    return [f"{kind}_{kv}_{i}" for i in range(len(model.blocks)) for kv in ("key", "value")]


def lm_onnx_bytes(model: GPT) -> bytes:
    """`model` as one ONNX graph with its KV cache (module docstring); batch, tokens and past
    are dynamic axes. ExportError when the exporter refuses it."""
    if model.context < 3:
        raise ExportError(f"the model's context ({model.context} tokens) is too short to "
                          "export with a cache (at least 3)")
    past_in, present = cache_names(model, "past"), cache_names(model, "present")
    axes = {"ids": {0: "batch", 1: "tokens"}, "logits": {0: "batch", 1: "tokens"},
            **{n: {0: "batch", 2: "past"} for n in past_in},
            **{n: {0: "batch", 2: "past_plus_tokens"} for n in present}}
    # Example: batch 2, 2 new tokens after 1 cached one; any size traces the same graph.
    ids = torch.zeros(2, 2, dtype=torch.long)
    past = [torch.zeros(2, b.attn.heads, 1, b.attn.head_dim) for b in model.blocks
            for _ in ("key", "value")]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and tracer notes
        try:
            torch.onnx.export(CacheStep(model.cpu().eval()), (ids, *past), buf,
                              input_names=["ids", *past_in], output_names=["logits", *present],
                              opset_version=OPSET, dynamo=False, dynamic_axes=axes)
        except Exception as exc:  # the exporter raises many types; all mean "cannot export"
            raise ExportError(f"ONNX export failed: {str(exc).splitlines()[0]}") from None
    return buf.getvalue()


@torch.inference_mode()
def reference(masked: nn.Module, prompts: torch.Tensor, steps: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The masked model recomputed over the whole sequence at every step, no cache: (prefill
    logits (batch, tokens, vocab), decode logits (batch, steps, vocab), greedy tokens
    (batch, steps + 1): the first from the prefill)."""
    logits = masked(prompts).float()
    prefill, decode, tokens = logits.numpy(), [], [logits[:, -1].argmax(-1)]
    seq = prompts
    for _ in range(steps):
        seq = torch.cat([seq, tokens[-1][:, None]], 1)
        last = masked(seq)[:, -1].float()
        decode.append(last.numpy())
        tokens.append(last.argmax(-1))
    return prefill, np.stack(decode, 1), torch.stack(tokens, 1).numpy()


def _exact(got: np.ndarray, ref: np.ndarray, what: str) -> dict[str, float]:
    record, why = agreement.exact(got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1]))
    if why is not None:
        raise ExportError(f"ONNX Runtime's {what} differ from the masked model's: {why}")
    return record


def _same_tokens(got: np.ndarray, ref: np.ndarray, new: int) -> None:
    rows = np.flatnonzero(got != ref)
    if len(rows):
        r = int(rows[0])
        raise ExportError(f"greedy continuation differs from the masked model's at new token "
                          f"{new} of prompt {r}: {int(got[r])} instead of {int(ref[r])}")


class OnnxDecoder:
    """The exported graph in ONNX Runtime: `prefill(ids)` → logits (batch, tokens, vocab),
    then `step(tokens)` → logits (batch, vocab) of the position after them; the presents of
    each call are the next call's pasts (matched by name). One object per batch of prompts."""

    def __init__(self, model: bytes | str, threads: int = 1):
        self.sess = ort_session(model, threads)
        self.pasts = [i for i in self.sess.get_inputs() if i.name != "ids"]
        self.presents = [o.name for o in self.sess.get_outputs()][1:]

    def _run(self, ids: np.ndarray, pasts: dict[str, np.ndarray]) -> np.ndarray:
        out = self.sess.run(None, {"ids": ids.astype(np.int64), **pasts})
        self.cache = {n.replace("present_", "past_", 1): v for n, v in zip(self.presents, out[1:])}
        return out[0]

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self._run(ids, {i.name: np.zeros((len(ids), i.shape[1], 0, i.shape[3]), np.float32)
                               for i in self.pasts})

    def step(self, tokens: np.ndarray) -> np.ndarray:
        return self._run(tokens[:, None], self.cache)[:, -1]


def check_lm(model: bytes | str, masked: nn.Module, prompts: torch.Tensor,
             steps: int) -> dict[str, Any]:
    """Prefill `prompts` (batch, tokens) and decode `steps` greedy tokens with the exported
    graph in ONNX Runtime; ExportError unless the prefill logits and every decode step's
    agree with the masked model's (`agreement.exact`) and the greedy tokens are identical."""
    ref_prefill, ref_decode, ref_tokens = reference(masked, prompts, steps)
    try:
        dec = OnnxDecoder(model)
        prefill, decode = dec.prefill(prompts.numpy()), []
        pre = _exact(prefill, ref_prefill, "prefill logits")
        _same_tokens(tokens := prefill[:, -1].argmax(-1), ref_tokens[:, 0], 1)
        for j in range(steps):
            decode.append(dec.step(tokens))
            _exact(decode[-1], ref_decode[:, j], f"logits at decode step {j + 1}")
            _same_tokens(tokens := decode[-1].argmax(-1), ref_tokens[:, j + 1], j + 2)
    except ExportError:
        raise
    except Exception as exc:  # onnxruntime's own error types; all mean "does not run"
        raise ExportError(f"ONNX Runtime cannot run the export: {str(exc).splitlines()[0]}") \
            from None
    steps_all = _exact(np.stack(decode, 1), ref_decode, "decode logits")
    return {"batch": len(prompts), "prompt_tokens": prompts.shape[1], "decode_steps": steps,
            "prefill_max_abs_error": pre["max_abs_error"], "prefill_tolerance": pre["tolerance"],
            "decode_max_abs_error": steps_all["max_abs_error"],
            "decode_tolerance": steps_all["tolerance"],
            "greedy_tokens_identical": int(ref_tokens.size)}


def probe_sizes(context: int, prompt_tokens: int | None, decode_steps: int | None
                ) -> tuple[int, int]:
    """(prompt tokens, decode steps) of the check: the defaults cut to fit `context`, or the
    asked ones; ConfigError when they are below 1 or do not fit."""
    prompt = prompt_tokens if prompt_tokens is not None else min(PROMPT_TOKENS, context // 2)
    steps = decode_steps if decode_steps is not None else min(DECODE_STEPS, context - prompt)
    for flag, value in (("--prompt-tokens", prompt), ("--decode-steps", steps)):
        if value < 1:
            raise ConfigError(f"{flag}: expected >= 1, got {value}")
    if prompt + steps > context:
        raise ConfigError(f"--prompt-tokens ({prompt}) + --decode-steps ({steps}) exceed the "
                          f"model's context ({context} tokens)")
    return prompt, steps


def export_lm_checkpoint(path: str | Path, output: str | Path | None = None, *,
                         prompt_tokens: int | None = None, decode_steps: int | None = None,
                         allow_factory: bool | str | None = False,
                         source: str | None = None) -> dict[str, Any]:
    """Export a language-model ticket (a local checkpoint) as ONNX with its KV cache: the
    compacted GPT, checked by `check_lm` on PROBE_BATCH prompts of seeded random tokens
    before it is written. source: what the checkpoint was named by (default `path`).

    Writes `output` (default `default_output`) and `<output>.json` (inputs, outputs, the
    check) atomically; returns the summary. ExportError when the export fails or differs."""
    source = str(source or path)
    model, _, meta = load_ticket(path, "cpu", allow_factory)
    if not is_language_model(meta):
        raise ConfigError(f"--checkpoint: {path} holds an image model ({meta.get('model')!r}); "
                          "expected a language-model checkpoint")
    if not isinstance(model, GPT):
        raise ExportError(f"{type(model).__name__}: ONNX export with a KV cache covers "
                          "ticketsmith's GPT only")
    prompt, steps = probe_sizes(model.context, prompt_tokens, decode_steps)
    small, compaction = compact_gpt(model.eval())
    blob = lm_onnx_bytes(small)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.vocab, (PROBE_BATCH, prompt), generator=g)
    check = check_lm(blob, model, prompts, steps)
    out = Path(output) if output is not None else default_output(source)
    summary = {"checkpoint": redact(source), "model": meta["model"], "format": "onnx",
               "opset": OPSET, "compacted": True, "compaction": compaction,
               "onnx_weights": onnx_weights(blob), "dense_weights": count_params(model),
               "onnx_bytes": len(blob), "dense_bytes": weight_bytes(model),
               "probe": f"{PROBE_BATCH} prompts of {prompt} seeded random tokens, "
                        f"{steps} greedy decode steps", **check, **lm_spec(small, meta),
               "path": str(out), "sidecar": f"{out}.json"}
    atomic_write(out, lambda p: p.write_bytes(blob))
    atomic_write_text(Path(f"{out}.json"), json.dumps(
        {k: v for k, v in summary.items() if k not in ("path", "sidecar")}, indent=2))
    return summary


def lm_spec(model: GPT, meta: dict[str, Any]) -> dict[str, Any]:
    """What the exported graph takes and returns, and the tokenizer its ids come from."""
    blocks = [{"heads": b.attn.heads, "head_dim": b.attn.head_dim} for b in model.blocks]
    return {"inputs": {"ids": ["batch", "tokens"], "past_key_<i>, past_value_<i>":
                       ["batch", "heads_i", "past", "head_dim"]},
            "outputs": {"logits": ["batch", "tokens", model.vocab],
                        "present_key_<i>, present_value_<i>":
                            ["batch", "heads_i", "past + tokens", "head_dim"]},
            "blocks": blocks, "context": model.context, "vocab": model.vocab,
            "tokenizer": meta.get("tokenizer", "byte"),
            "positions": "past .. past + tokens - 1; rows of a batch share one length"}


def format_lm_summary(s: dict[str, Any]) -> str:
    """The export in four lines: compaction, size, check, where it went."""
    heads = "/".join(str(b["heads"]) for b in s["blocks"])
    return "\n".join([
        f"{s['model']}: {s['compaction']}",
        f"weights: {s['onnx_weights']:,} in the ONNX file vs {s['dense_weights']:,} dense "
        f"({s['onnx_weights'] / s['dense_weights']:.1%}); {format_bytes(s['onnx_bytes'])} "
        f"file vs {format_bytes(s['dense_bytes'])} of dense weights",
        f"checked with ONNX Runtime on {s['probe']}: max |difference| prefill "
        f"{s['prefill_max_abs_error']:.2g} (tolerance {s['prefill_tolerance']:.2g}), decode "
        f"{s['decode_max_abs_error']:.2g} (tolerance {s['decode_tolerance']:.2g}), "
        f"{s['greedy_tokens_identical']} greedy tokens identical",
        f"wrote {s['path']} (ONNX opset {s['opset']}; ids (batch, tokens) int64 with a KV cache "
        f"per block, heads {heads}; context {s['context']}) and {s['sidecar']}"])
