"""Small per-run figures: loss curves and a sample grid of test predictions (PNG)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def loss_curves(curve: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Training loss (mean over each evaluation window) and validation loss vs iteration."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
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
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


@torch.no_grad()
def sample_grid(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, path: Path,
                title: str, n: int = 16) -> Path:
    """The first `n` test images with predicted (and true) labels; wrong ones in red."""
    model.eval()
    x, y = x[:n], y[:n]
    pred = model(x).argmax(1).cpu()
    cols = 4
    rows = (len(x) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.8), dpi=100)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(x):
            continue
        img = x[i].cpu().float()
        img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
        img = (img - img.min()) / (img.max() - img.min() + 1e-8)
        ax.imshow(img.numpy(), cmap="gray" if img.dim() == 2 else None)
        wrong = int(pred[i]) != int(y[i])
        label = f"pred {int(pred[i])}" + (f" (true {int(y[i])})" if wrong else "")
        ax.set_title(label, fontsize=8, color="red" if wrong else "black")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
