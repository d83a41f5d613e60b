"""Training pictures: `results.png` (curves per evaluation) and the validation mosaic.

Curves use matplotlib's Agg backend (no display needed); the mosaic is plain numpy: one row per
validation image, columns image | ground truth | prediction, masks coloured with the dataset
palette (ignore pixels in the palette's ignore colour). Both are written atomically.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from allspark_cli.constants import IMAGENET_MEAN, IMAGENET_STD
from allspark_cli.fileio import atomic_path, write_png
from allspark_cli.viz.palette import colorize, full_palette

CURVES = (("loss_x", "labeled loss"), ("loss_u", "unlabeled loss"), ("miou", "val mIoU (%)"), ("lr", "backbone lr"))
FIGURE_SIZE = (10.0, 6.0)
FIGURE_DPI = 100
MOSAIC_GAP = 4  # pixels of white between tiles
WHITE = 255
UINT8_MAX = 255
GRID_ALPHA = 0.3


def plot_results(rows: list[dict[str, Any]], path: Path) -> None:
    """Four panels (labeled loss, unlabeled loss, mIoU, lr) against the epoch of each evaluation row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    epochs = [row["epoch"] for row in rows]
    for axis, (key, title) in zip(axes.flat, CURVES):
        values = [math.nan if row.get(key) is None else float(row[key]) for row in rows]
        axis.plot(epochs, values, marker="o")
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(True, alpha=GRID_ALPHA)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)


def denormalize(image: np.ndarray) -> np.ndarray:
    """(3, H, W) ImageNet-normalised float -> (H, W, 3) uint8 RGB."""
    mean = np.array(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.array(IMAGENET_STD, dtype=np.float32)[:, None, None]
    rgb = (image * std + mean).clip(0, 1) * UINT8_MAX
    return rgb.round().astype(np.uint8).transpose(1, 2, 0)


def validation_mosaic(
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], palette: list | np.ndarray
) -> np.ndarray:
    """(H, W, 3) uint8 grid; each sample is (image (3,h,w) normalised float, target (h,w), prediction (h,w)).

    Rows have the height of their image; narrower rows are padded with white on the right.
    """
    colours = full_palette(palette)
    rows = []
    for image, target, prediction in samples:
        tiles = [denormalize(image), colorize(target.astype(np.uint8), colours), colorize(prediction.astype(np.uint8), colours)]
        gap = np.full((tiles[0].shape[0], MOSAIC_GAP, 3), WHITE, dtype=np.uint8)
        rows.append(np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1))
    width = max(row.shape[1] for row in rows)
    padded = []
    for row in rows:
        pad = np.full((row.shape[0], width - row.shape[1], 3), WHITE, dtype=np.uint8)
        padded.append(np.concatenate([row, pad], axis=1))
        padded.append(np.full((MOSAIC_GAP, width, 3), WHITE, dtype=np.uint8))
    return np.concatenate(padded[:-1], axis=0)


def write_validation_mosaic(samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], palette: list, path: Path) -> None:
    write_png(path, validation_mosaic(samples, palette))
