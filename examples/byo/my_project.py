"""A stand-in for your own project: a PyTorch model and a data set, with no TicketSmith imports.

TicketSmith calls these two functions by import path (see byo.yaml):

    model.factory: my_project:build_model   ->  build_model(input_shape=..., num_classes=..., **model.options)
    data.factory:  my_project:make_data     ->  make_data(**data.options)

Run from the repository root with this folder on the import path:

    PYTHONPATH=examples/byo python -m ticketsmith.prune --config examples/byo/byo.yaml
"""
from __future__ import annotations

import torch
from torch import nn


class SpiralNet(nn.Module):
    """A small classifier for 2-D points: a feature embedding, a hidden block and a head."""

    def __init__(self, in_features: int, num_classes: int, width: int):
        super().__init__()
        self.embed = nn.Linear(in_features, width)  # excluded from pruning in byo.yaml
        self.block = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
        self.norm = nn.LayerNorm(width)             # never pruned (not Linear/Conv)
        self.head = nn.Linear(width, num_classes)   # the last Linear: the output layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.embed(x))
        h = self.norm(h + torch.relu(self.block(h)))
        return self.head(h)


def build_model(input_shape: tuple[int, ...], num_classes: int, width: int = 64) -> nn.Module:
    """Model factory: TicketSmith passes the data's example shape and class count."""
    return SpiralNet(input_shape[0], num_classes, width)


def make_data(n_train: int = 1500, n_test: int = 500, arms: int = 3, noise: float = 0.15,
              seed: int = 0) -> dict[str, torch.Tensor | int]:
    """Data factory: interleaved noisy spirals, one class per arm.

    Returns train/test tensors; TicketSmith holds out `data.val_size` training examples itself.
    """
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    y = torch.randint(0, arms, (n,), generator=g)
    r = torch.rand(n, generator=g)                        # radius in [0, 1)
    angle = 4.0 * r + y * (2 * torch.pi / arms)           # 4 rad of turn per arm
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1)
    x = x + noise * r.unsqueeze(1) * torch.randn(n, 2, generator=g)
    return {"train_x": x[:n_train], "train_y": y[:n_train],
            "test_x": x[n_train:], "test_y": y[n_train:], "num_classes": arms}
