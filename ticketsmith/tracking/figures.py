"""Small per-run figures: loss curves and a sample grid of test predictions (PNG).

Drawn on bare matplotlib Figures (Agg, no pyplot: no figure manager, nothing to close) with
fixed margins: pyplot's import, one Axes per sample and `tight_layout` were most of a tracked
run's figure time (about 1 s per level on a 2-core CPU).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

PAD = 2    # pixels between the sample images of a grid, side by side
LABEL = 8  # pixels above each image for its label


def loss_curves(curve: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Training loss (mean over each evaluation window) and validation loss vs iteration."""
    fig = Figure(figsize=(6, 3.5), dpi=100)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.14, top=0.9)  # room for the labels
    ax = fig.add_subplot()
    it = [r["iteration"] for r in curve]
    ax.plot(it, [r["train_loss"] for r in curve], label="train loss (window mean)")
    val = [r["val_loss"] for r in curve]
    if any(v == v for v in val):  # NaN when there is no validation split
        ax.plot(it, val, label="validation loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)
    return path


def _mosaic(images: torch.Tensor, cols: int) -> np.ndarray:
    """(N, C, H, W) images, each scaled to 0..1 on its own, tiled `cols` wide on a white
    background with a LABEL-pixel band above each row: (rows*(H+LABEL), cols*(W+PAD)[, 3])."""
    x = images.cpu().float()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = ((x - lo) / (hi - lo + 1e-8)).permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    n, h, w, c = x.shape
    rows = (n + cols - 1) // cols
    out = np.ones((rows * (h + LABEL), cols * (w + PAD), c), dtype=np.float32)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = r * (h + LABEL) + LABEL, q * (w + PAD)
        out[top:top + h, left:left + w] = x[i]
    return out[..., 0] if c == 1 else out


@torch.no_grad()
def sample_grid(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, path: Path,
                title: str, n: int = 16) -> Path:
    """The first `n` test images with predicted (and true) labels; wrong ones in red."""
    model.eval()
    x, y = x[:n], y[:n]
    pred = model(x).argmax(1).cpu()
    cols = 4
    rows = (len(x) + cols - 1) // cols
    h, w = x.shape[-2:]
    fig = Figure(figsize=(cols * 1.6, rows * 1.8), dpi=100)
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.93))  # one Axes for the whole grid, title above
    ax.axis("off")
    mosaic = _mosaic(x, cols)
    ax.imshow(mosaic, cmap="gray" if mosaic.ndim == 2 else None, vmin=0, vmax=1,
              interpolation="nearest", aspect="equal")
    for i in range(len(x)):
        r, q = divmod(i, cols)
        wrong = int(pred[i]) != int(y[i])
        label = f"pred {int(pred[i])}" + (f" (true {int(y[i])})" if wrong else "")
        # In the band above each image, in the mosaic's pixel coordinates.
        ax.text(q * (w + PAD) + w / 2, r * (h + LABEL) + LABEL - 1, label, fontsize=8, ha="center",
                va="bottom", color="red" if wrong else "black")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path)
    return path
