"""Picture of a confusion matrix (rows = ground truth, columns = prediction).

Each row is normalised by its ground-truth pixel count, so a cell reads "share of class r's pixels
predicted as c" and the diagonal is the per-class accuracy; raw counts would be dominated by the
large classes (background, road). Rows of classes without ground-truth pixels stay blank.
Rendered with matplotlib's object API on an Agg canvas (no display, no pyplot global state) and
returned as an (H, W, 3) uint8 RGB array; the caller writes it (fileio.write_png).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DPI = 100
# Figure size grows with the class count so that tick labels stay readable (inches).
MIN_SIDE_IN = 5.0
MAX_SIDE_IN = 30.0
SIDE_PER_CLASS_IN = 0.32
# Cell values are printed only while they fit in a cell.
MAX_ANNOTATED_CLASSES = 25
# Above this share the cell is dark: write its value in white.
DARK_CELL_SHARE = 0.5
COLORMAP = "Blues"
TICK_FONT_SIZE = 7
CELL_FONT_SIZE = 6


def row_normalized(confusion: np.ndarray) -> np.ndarray:
    """(K, K) counts -> (K, K) float64 row shares in [0, 1]; NaN rows for classes without ground truth."""
    counts = np.asarray(confusion, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts / np.maximum(totals, 1), np.nan)


def confusion_figure(confusion: np.ndarray, class_names: Sequence[str], title: str = "") -> np.ndarray:
    """Renders the row-normalised confusion matrix with class names on both axes; (H, W, 3) uint8 RGB."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_classes = len(class_names)
    if confusion.shape != (num_classes, num_classes):
        raise ValueError(f"confusion matrix {confusion.shape} does not match {num_classes} class names")
    shares = row_normalized(confusion)
    side = min(MAX_SIDE_IN, max(MIN_SIDE_IN, SIDE_PER_CLASS_IN * num_classes + 2))
    figure = Figure(figsize=(side, side), dpi=DPI)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(shares), cmap=COLORMAP, vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the ground-truth pixels")
    ticks = np.arange(num_classes)
    axes.set_xticks(ticks, labels=list(class_names), rotation=90, fontsize=TICK_FONT_SIZE)
    axes.set_yticks(ticks, labels=list(class_names), fontsize=TICK_FONT_SIZE)
    axes.set_xlabel("prediction")
    axes.set_ylabel("ground truth")
    if title:
        axes.set_title(title)
    if num_classes <= MAX_ANNOTATED_CLASSES:
        for row in range(num_classes):
            for col in range(num_classes):
                share = shares[row, col]
                if np.isfinite(share) and share > 0:
                    color = "white" if share > DARK_CELL_SHARE else "black"
                    axes.text(col, row, f"{share:.2f}", ha="center", va="center", fontsize=CELL_FONT_SIZE, color=color)
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
