"""The training loop and evaluation.

Data are tensors already on the device; a batch is an index into them. The mask is
re-applied after every optimizer step, otherwise Adam's momentum regrows pruned weights.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ticketsmith.base.config import ConfigError, TrainConfig
from ticketsmith.engine.data import batches
from ticketsmith.engine.masks import Mask
from ticketsmith.engine.progress import Progress

# Called at each evaluation with (iteration, {"train_loss", "val_loss", "val_accuracy"}).
EvalHook = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    test_accuracy: float
    test_loss: float
    best_val_accuracy: float
    early_stop_iteration: int          # iteration of minimum validation loss
    iterations: int
    wall_time_s: float
    curve: list[dict[str, float]] = field(default_factory=list)  # one row per evaluation
    saved_state: dict[str, torch.Tensor] | None = None           # weights at `save_state_at`
    metrics: dict[str, float] = field(default_factory=dict)      # task-specific, into the record


# Set by the GPU Job templates: a node provisioned for a GPU must not let 'auto' fall back to
# the CPU (for hours, holding the GPU) when the driver is missing or too old for this torch.
DEVICE_ENV = "TICKETSMITH_DEVICE"


def resolve_device(name: str) -> torch.device:
    """'auto', 'cpu' or 'cuda' → the device; $TICKETSMITH_DEVICE pins what 'auto' means."""
    pinned = os.environ.get(DEVICE_ENV, "").strip()
    if pinned and name not in ("auto", pinned):
        raise ConfigError(f"train.device: {name!r}, but this Job's node is for {pinned!r} "
                          f"({DEVICE_ENV}); set train.device to 'auto' or {pinned!r}")
    if pinned:
        name = pinned
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        why = f" (pinned by {DEVICE_ENV})" if pinned else ""
        raise ConfigError(f"train.device: 'cuda' requested{why} but torch {torch.__version__} "
                          f"(CUDA {torch.version.cuda or 'none'}) finds no usable CUDA device; "
                          "check the GPU driver (nvidia-smi) or use 'cpu'")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"{DEVICE_ENV}: expected 'cpu' or 'cuda', got {name!r}")
    return torch.device(name)


def total_iterations(cfg: TrainConfig, n_train: int) -> int:
    if cfg.iterations is not None:
        return cfg.iterations
    return max(1, math.ceil(cfg.epochs * math.ceil(n_train / cfg.batch_size)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 2048) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy in [0, 1]); (nan, nan) for an empty split."""
    if len(x) == 0:
        return math.nan, math.nan
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size])
        loss_sum += F.cross_entropy(logits, y[i:i + batch_size], reduction="sum")
        correct += (logits.argmax(1) == y[i:i + batch_size]).sum()
    model.train(was_training)
    return loss_sum.item() / len(x), correct.item() / len(x)


MaskPairs = list[tuple[torch.Tensor, torch.Tensor]]


def mask_pairs(mask: Mask | None, masked: Mapping[str, torch.Tensor] | None,
               device: torch.device) -> MaskPairs:
    """(parameter, float mask) per masked layer, prepared once so that enforcing the mask
    costs one in-place multiply per layer a step; the mask is applied once here."""
    if mask is None or masked is None:
        return []
    mask.check_fits(masked)
    pairs = [(p, mask[name].to(device=device, dtype=p.dtype)) for name, p in masked.items()]
    enforce(pairs)
    return pairs


@torch.no_grad()
def enforce(pairs: MaskPairs) -> None:
    """Zero the pruned weights again: after every optimizer step, or Adam regrows them."""
    for p, m in pairs:
        p.mul_(m)


def train(model: nn.Module, data, cfg: TrainConfig, *, seed: int,
          masked: Mapping[str, torch.Tensor] | None = None, mask: Mask | None = None,
          save_state_at: int | None = None, on_eval: EvalHook | None = None,
          desc: str = "train", progress: bool = True,
          checkpoints: Progress | None = None) -> TrainResult:
    """Train `model` in place on `data` (a data.Dataset) and evaluate on its test split.

    masked: the prunable parameters (name → Parameter) that `mask` constrains.
    seed: fixes the data order, so every variant of a replicate sees the same batches.
    save_state_at: iteration whose weights are returned in `saved_state` (late rewinding).
    checkpoints: the level's progress checkpoint: resumed from if there is one, written at
    its interval and at a pending stop (see progress.py).
    """
    device = data.train_x.device
    model.to(device).train()
    n = len(data.train_x)
    total = total_iterations(cfg, n)
    opt = make_optimizer(model, cfg)
    pairs = mask_pairs(mask, masked, device)
    order = torch.Generator().manual_seed(seed)
    saved = None
    if save_state_at == 0:
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}

    curve: list[dict[str, float]] = []
    window_loss = torch.zeros((), device=device)  # summed on device: no sync per step
    window_steps = 0
    start = time.perf_counter()
    step = 0
    if checkpoints is not None and (got := checkpoints.restore(model, opt, order, window_loss)):
        step, curve, window_steps, saved = got
        for row in curve if on_eval is not None else ():  # the new run shows the whole curve
            on_eval(int(row["iteration"]), row)
    per_epoch = math.ceil(n / cfg.batch_size)
    # disable=None: no bar when stderr is not a terminal (pod logs, CI), so logs keep only
    # the per-level summary lines.
    bar = tqdm(total=total, initial=step, desc=desc, unit="it", leave=False, mininterval=0.5,
               disable=None if progress else True)
    while step < total:
        epoch_order = order.get_state()  # a resume draws this epoch's permutation again
        for idx in islice(batches(n, cfg.batch_size, order, device), step % per_epoch, None):
            loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            enforce(pairs)
            step += 1
            window_loss += loss.detach()
            window_steps += 1
            if step == save_state_at:
                saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if step % cfg.eval_every == 0 or step == total:
                val_loss, val_acc = evaluate(model, data.val_x, data.val_y, cfg.eval_batch_size)
                row = {"iteration": step, "train_loss": window_loss.item() / window_steps,
                       "val_loss": val_loss, "val_accuracy": val_acc}
                curve.append(row)
                window_loss.zero_()
                window_steps = 0
                if on_eval is not None:
                    on_eval(step, row)
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", refresh=False)
            bar.update(1)
            if checkpoints is not None:  # a safe point: save if due, then act on a stop
                checkpoints.after_step(step, model, opt, order, per_epoch, lambda: (
                    curve, window_loss, window_steps, saved, epoch_order))
            if step >= total:
                break
    bar.close()
    test_loss, test_acc = evaluate(model, data.test_x, data.test_y, cfg.eval_batch_size)
    wall = time.perf_counter() - start
    valid = [r for r in curve if not math.isnan(r["val_loss"])]
    if valid:
        best = min(valid, key=lambda r: r["val_loss"])
        early, best_acc = int(best["iteration"]), max(r["val_accuracy"] for r in valid)
    else:
        early, best_acc = total, math.nan
    return TrainResult(test_accuracy=test_acc, test_loss=test_loss, best_val_accuracy=best_acc,
                       early_stop_iteration=early, iterations=total, wall_time_s=wall,
                       curve=curve, saved_state=saved)

