"""The per-run figures, drawn without pyplot: the sample grid is one image of tiles, each test
image in its own tile, scaled on its own, labelled red where the prediction is wrong."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from ticketsmith.tracking.figures import LABEL, PAD, _mosaic, loss_curves, sample_grid


def test_each_image_lands_in_its_own_tile_scaled_on_its_own():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 5, 7, generator=g) * torch.arange(1, 7).view(6, 1, 1, 1) - 2
    tiles = _mosaic(x, cols=4)
    assert tiles.shape == (2 * (5 + LABEL), 4 * (7 + PAD))
    for i in range(6):
        r, q = divmod(i, 4)
        top, left = r * (5 + LABEL) + LABEL, q * (7 + PAD)
        img = x[i, 0]
        expected = ((img - img.min()) / (img.max() - img.min())).numpy()
        np.testing.assert_allclose(tiles[top:top + 5, left:left + 7], expected, atol=1e-6)
    assert (tiles[:LABEL] == 1).all()  # the label band is white
    assert (tiles[5 + LABEL:, 2 * (7 + PAD):] == 1).all()  # and so are the two empty tiles
    colour = _mosaic(torch.rand(3, 3, 4, 4, generator=g), cols=4)
    assert colour.shape == (4 + LABEL, 4 * (4 + PAD), 3)


class Constant(torch.nn.Module):
    """Predicts class `label` for every input."""

    def __init__(self, label: int):
        super().__init__()
        self.label = label

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.full((len(x),), self.label), 10).float()


def red_pixels(path) -> int:
    rgb = imread(path)[..., :3]
    return int(((rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)).sum())


@pytest.mark.parametrize("truth,wrong", [(3, False), (5, True)])
def test_the_grid_is_a_png_with_wrong_predictions_in_red(tmp_path, truth, wrong):
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    path = sample_grid(Constant(3), x, torch.full((16,), truth), tmp_path / "samples.png",
                       "level 1 ticket (50.0% weights)")
    image = imread(path)
    assert image.shape[:2] == (720, 640)  # 4 rows x 1.8 in, 4 columns x 1.6 in, at 100 dpi
    assert (red_pixels(path) > 100) == wrong


def test_loss_curves_is_a_png(tmp_path):
    curve = [{"iteration": i, "train_loss": 2.0 / i, "val_loss": 2.2 / i} for i in range(1, 6)]
    assert imread(loss_curves(curve, tmp_path / "loss.png", "dense")).shape[:2] == (350, 600)
