"""Language-model training: seeded random windows of the token stream, AdamW, warm-up and
cosine decay, gradient clipping, the mask re-applied after every step; bits per byte.

Quality is bits per byte (nats per token × tokens per byte / ln 2), comparable across
tokenizers, beside perplexity per token and next-token accuracy. Evaluation tiles a split's
first `train.eval_tokens` tokens with non-overlapping windows of `context` tokens.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ticketsmith.base.config import TrainConfig
from ticketsmith.engine.masks import Mask
from ticketsmith.engine.progress import Progress
from ticketsmith.engine.train import EvalHook, TrainResult, enforce, mask_pairs

def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Learning rate of optimizer step `step` (0-based): constant, or linear warm-up over
    `warmup_iterations` then cosine decay to `min_lr_fraction` × lr at `total`."""
    if cfg.schedule == "constant":
        return cfg.lr
    if step < cfg.warmup_iterations:
        return cfg.lr * (step + 1) / cfg.warmup_iterations
    span = max(1, total - cfg.warmup_iterations)
    progress = min(1.0, (step - cfg.warmup_iterations) / span)
    low = cfg.lr * cfg.min_lr_fraction
    return low + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - low)


def make_lm_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (or Adam/SGD as configured); weight decay only on matrices, as in nanoGPT."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay},
              {"params": others, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt(groups, lr=cfg.lr, betas=(0.9, cfg.beta2))


def windows(stream: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """Rows stream[s : s + length] for each start (one gather, no Python loop)."""
    return stream[starts.to(stream.device)[:, None] + torch.arange(length, device=stream.device)]


def draw_batch(stream: torch.Tensor, batch_size: int, context: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of `batch_size` seeded random windows of context + 1 tokens."""
    starts = torch.randint(len(stream) - context, (batch_size,), generator=generator)
    rows = windows(stream, starts, context + 1)
    return rows[:, :-1], rows[:, 1:]


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(batch, time, vocab) logits of our GPT or of a Hugging Face causal LM (`.logits`)."""
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def _autocast(device: torch.device):
    # bf16 on CUDA (no loss scaling needed); CPU stays float32 so reruns are bit-identical.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate_lm(model: nn.Module, stream: torch.Tensor, context: int, tokens_per_byte: float,
                batch_size: int = 64, max_tokens: int | None = None) -> dict[str, float]:
    """{"loss" (nats/token), "bpb", "perplexity", "accuracy"} over whole windows of the
    stream's first `max_tokens` tokens; NaNs when it holds no whole window."""
    stream = stream[:max_tokens + 1] if max_tokens else stream
    n = (len(stream) - 1) // context
    if n == 0:
        return {k: math.nan for k in ("loss", "bpb", "perplexity", "accuracy")}
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=stream.device, dtype=torch.float64)
    correct = torch.zeros((), device=stream.device, dtype=torch.long)
    starts = torch.arange(n) * context
    for i in range(0, n, batch_size):
        rows = windows(stream, starts[i:i + batch_size], context + 1)
        with _autocast(stream.device):
            logits = logits_of(model, rows[:, :-1])
        logits = logits.float().flatten(0, 1)
        loss_sum += F.cross_entropy(logits, rows[:, 1:].flatten(), reduction="sum").double()
        correct += (logits.argmax(1) == rows[:, 1:].flatten()).sum()
    model.train(was_training)
    count = n * context
    loss = loss_sum.item() / count
    return {"loss": loss, "bpb": loss * tokens_per_byte / math.log(2),
            "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct.item() / count}


def train_lm(model: nn.Module, data, cfg: TrainConfig, *, seed: int,
             masked: Mapping[str, torch.Tensor] | None = None, mask: Mask | None = None,
             save_state_at: int | None = None, on_eval: EvalHook | None = None,
             desc: str = "train", progress: bool = True,
             checkpoints: Progress | None = None) -> TrainResult:
    """Train a language model in place on `data` (a tasks.TextTask data) for
    `cfg.iterations` steps; `seed` fixes the windows drawn, shared by every variant.
    checkpoints: the level's progress checkpoint, as in `train.train`: every window is drawn
    from `seed`'s generator, so its state after a step is the whole position in the data."""
    device = data.train_x.device
    model.to(device).train()
    total, context = cfg.iterations, data.input_shape[0]
    opt = make_lm_optimizer(model, cfg)
    pairs = mask_pairs(mask, masked, device)
    order = torch.Generator().manual_seed(seed)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()} \
        if save_state_at == 0 else None
    curve: list[dict[str, float]] = []
    window_loss, window_steps = torch.zeros((), device=device), 0
    start = time.perf_counter()
    done = 0
    if checkpoints is not None and (got := checkpoints.restore(model, opt, order, window_loss)):
        done, curve, window_steps, saved = got
        for row in curve if on_eval is not None else ():  # the new run shows the whole curve
            on_eval(int(row["iteration"]), row)
    bar = tqdm(total=total, initial=done, desc=desc, unit="it", leave=False, mininterval=0.5,
               disable=None if progress else True)
    for step in range(done + 1, total + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, cfg, total)
        x, y = draw_batch(data.train_x, cfg.batch_size, context, order)
        with _autocast(device):
            logits = logits_of(model, x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        enforce(pairs)
        window_loss += loss.detach()
        window_steps += 1
        if step == save_state_at:
            saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if step % cfg.eval_every == 0 or step == total:
            val = evaluate_lm(model, data.val_x, context, data.tokens_per_byte["val"],
                              max_tokens=cfg.eval_tokens)
            row = {"iteration": step, "train_loss": window_loss.item() / window_steps,
                   "val_loss": val["loss"], "val_bpb": val["bpb"], "val_accuracy": val["accuracy"]}
            curve.append(row)
            window_loss.zero_()
            window_steps = 0
            if on_eval is not None:
                on_eval(step, row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", refresh=False)
        bar.update(1)
        if checkpoints is not None:  # a safe point: save if due, then act on a stop
            # One "epoch" per step: the generator's state now is where the next window starts.
            checkpoints.after_step(step, model, opt, order, 1, lambda: (
                curve, window_loss, window_steps, saved, order.get_state()))
    bar.close()
    return _result(model, data, cfg, curve, time.perf_counter() - start, saved)


def _result(model, data, cfg: TrainConfig, curve, wall, saved) -> TrainResult:
    total, context = cfg.iterations, data.input_shape[0]
    test = evaluate_lm(model, data.test_x, context, data.tokens_per_byte["test"],
                       max_tokens=cfg.eval_tokens)
    valid = [r for r in curve if not math.isnan(r["val_loss"])]
    best = min(valid, key=lambda r: r["val_loss"]) if valid else None
    last = curve[-1] if curve else {}
    metrics = {"test_bpb": test["bpb"], "test_perplexity": test["perplexity"],
               "val_bpb": last.get("val_bpb", math.nan),
               "val_loss": last.get("val_loss", math.nan),
               "best_val_bpb": best["val_bpb"] if best else math.nan}
    return TrainResult(
        test_accuracy=test["accuracy"], test_loss=test["loss"],
        best_val_accuracy=max((r["val_accuracy"] for r in valid), default=math.nan),
        early_stop_iteration=int(best["iteration"]) if best else total, iterations=total,
        wall_time_s=wall, curve=curve, saved_state=saved, metrics=metrics)


@torch.no_grad()
def generate(model: nn.Module, ids: list[int], new_tokens: int, context: int, *,
             temperature: float = 0.0, top_k: int | None = None,
             generator: torch.Generator | None = None) -> list[int]:
    """Continue `ids` by `new_tokens` tokens: greedy at temperature 0, else seeded sampling
    (top-k when set). A plain loop over the whole window; fast decoding is the serving side's."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = list(ids)
    for _ in range(new_tokens):
        x = torch.tensor([out[-context:]], device=device)
        logits = logits_of(model, x)[0, -1].float().cpu()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, len(logits))).values[-1]
                logits = logits.masked_fill(logits < kth, -math.inf)
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        out.append(nxt)
    model.train(was_training)
    return out[len(ids):]
