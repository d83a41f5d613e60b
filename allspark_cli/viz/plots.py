"""Training pictures: `results.png` (curves) and the validation mosaic.

Curves use matplotlib's Agg backend (no display needed): losses and lr per logged iteration (thin:
as logged; bold: exponentially smoothed), mIoU per evaluation, all against the iteration. The
mosaic is plain numpy: one row per validation image, columns image | ground truth | prediction,
masks coloured with the dataset palette (ignore pixels in the palette's ignore colour), and a
legend panel of the classes shown. Both are written atomically.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from allspark_cli.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from allspark_cli.fileio import atomic_path
from allspark_cli.viz.overlay import FONT, FONT_PX_AT_SCALE_1, draw_legend, legend_height
from allspark_cli.labels import full_palette
from allspark_cli.viz.palette import colorize

CURVES = (("loss_x", "labeled loss"), ("loss_u", "unlabeled loss"), ("miou", "val mIoU (%)"), ("lr", "backbone lr"))
FIGURE_SIZE = (10.0, 6.0)
WIDE_FIGURE_SIZE = (18.0, 7.0)  # with the pseudo-label health panels
HEALTH_TITLES = ("pseudo labels passing the threshold (%)", "class share (%): pseudo, labeled dashed",
                 "mean pseudo-label confidence per class")
PERCENT = 100.0
SHARE_LINEAR_BELOW = 1.0  # percent: below it the share axis is linear, above logarithmic (thin classes stay visible)
FIGURE_DPI = 100
MOSAIC_GAP = 4  # pixels of white between tiles
WHITE = 255
UINT8_MAX = 255
GRID_ALPHA = 0.3
SMOOTHING = 0.8  # EMA weight of the previous smoothed value (TensorBoard's default 0.6 is too jumpy at log_every 10-20)
RAW_ALPHA = 0.35
LEGEND_PANEL_WIDTH = 200  # pixels right of the mosaic
MOSAIC_TITLES = ("image", "ground truth", "prediction")
MOSAIC_TITLE_PX = 14  # text height of the column titles
TITLE_COLOR = (0, 0, 0)


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average (NaNs skipped; NaN until the first value).

    s_n = weight s_(n-1) + (1 - weight) x_n from s_0 = 0, shown as s_n / (1 - weight^n): the mean of
    the points so far with weights decaying by `weight` per point. Started at the first value
    instead, the first point would keep weight^n of the line, and on a short run the line would
    trail far above the falling losses."""
    out, average, seen = [], 0.0, 0
    for value in values:
        if not math.isnan(value):
            average = weight * average + (1 - weight) * value
            seen += 1
        out.append(average / (1 - weight**seen) if seen else math.nan)
    return out


def _per_class(steps: list[dict[str, Any]], key: str, class_id: int) -> list[float]:
    values = []
    for row in steps:
        series = row.get(key)
        value = series[class_id] if series and class_id < len(series) else None
        values.append(math.nan if value is None else float(value))
    return values


def _plot_health(axes, steps: list[dict[str, Any]], class_names: list[str]) -> None:
    """The pseudo labels' health panels: share passing the threshold; per class the pseudo labels'
    share against the labeled masks' (dashed); per class the mean confidence."""
    pass_axis, share_axis, confidence_axis = axes
    x = [row["iteration"] for row in steps]
    share = [math.nan if row.get("pseudo_pass_share") is None else float(row["pseudo_pass_share"]) for row in steps]
    for axis, title in zip(axes, HEALTH_TITLES):
        axis.set_title(title)
        axis.set_xlabel("iteration")
        axis.grid(True, alpha=GRID_ALPHA)
    if all(math.isnan(v) for v in share):
        for axis in axes:
            axis.text(0.5, 0.5, "not part of this run", ha="center", va="center", transform=axis.transAxes)
        return
    pass_axis.plot(x, share)
    pass_axis.set_ylim(0, PERCENT)
    for class_id, name in enumerate(class_names):
        line, = share_axis.plot(x, _per_class(steps, "pseudo_class_share", class_id), label=name)
        share_axis.plot(x, _per_class(steps, "labeled_class_share", class_id), linestyle="--", color=line.get_color())
        confidence_axis.plot(x, _per_class(steps, "pseudo_confidence", class_id), label=name)
    share_axis.set_yscale("symlog", linthresh=SHARE_LINEAR_BELOW)
    confidence_axis.set_ylim(0, 1)
    confidence_axis.legend(loc="lower right", fontsize="small", ncol=2)


def plot_results(rows: list[dict[str, Any]], path: Path, steps: list[dict[str, Any]] | None = None,
                 class_names: list[str] | None = None) -> None:
    """Four panels (labeled loss, unlabeled loss, mIoU, lr), and with `class_names` three more on
    the pseudo labels' health. With `steps` (metrics.jsonl records), losses and lr are drawn per
    logged iteration and mIoU per evaluation, against the iteration; without, everything per
    evaluation row against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_health = bool(steps) and bool(class_names)
    figure, axes = plt.subplots(2, 4 if with_health else 2, figsize=WIDE_FIGURE_SIZE if with_health else FIGURE_SIZE,
                                dpi=FIGURE_DPI)
    per_step = bool(steps)
    curve_axes = [axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]]
    if with_health:
        _plot_health([axes[0, 2], axes[0, 3], axes[1, 2]], steps, class_names)
        axes[1, 3].axis("off")
    for axis, (key, title) in zip(curve_axes, CURVES):
        source = rows if (key == "miou" or not per_step) else steps
        x = [row["iteration" if per_step else "epoch"] for row in source]
        values = [math.nan if row.get(key) is None else float(row[key]) for row in source]
        if all(math.isnan(v) for v in values):  # e.g. the unlabeled loss of `sup`
            axis.text(0.5, 0.5, "not part of this run", ha="center", va="center", transform=axis.transAxes)
        elif key == "miou" or not per_step:
            axis.plot(x, values, marker="o")
        elif key == "lr":
            axis.plot(x, values)
        else:
            axis.plot(x, values, alpha=RAW_ALPHA, linewidth=1, label="logged")
            axis.plot(x, smoothed(values), linewidth=2, label="smoothed")
            axis.legend(loc="upper right")
        axis.set_title(title)
        axis.set_xlabel("iteration" if per_step else "epoch")
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
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    palette: list | np.ndarray,
    class_names: list[str] | None = None,
) -> np.ndarray:
    """(H, W, 3) uint8 grid; each sample is (image (3,h,w) normalised float, target (h,w), prediction (h,w)).

    Rows have the height of their image; narrower rows are padded with white on the right. With
    `class_names`, a legend panel (swatch + name of every class in a target or prediction) is
    added on the right.
    """
    grid = _mosaic_grid(samples, palette)
    if class_names is None:
        return grid
    shown = sorted({int(k) for _, target, prediction in samples for k in (*np.unique(target), *np.unique(prediction))
                    if k != IGNORE_INDEX})
    height = max(grid.shape[0], legend_height(len(shown), LEGEND_PANEL_WIDTH))
    grid = np.concatenate([grid, np.full((height - grid.shape[0], grid.shape[1], 3), WHITE, np.uint8)], axis=0)
    panel = draw_legend(np.full((height, LEGEND_PANEL_WIDTH, 3), WHITE, dtype=np.uint8), shown, class_names,
                        full_palette(palette), corner_share=1.0)
    return np.concatenate([grid, np.full((height, MOSAIC_GAP, 3), WHITE, np.uint8), panel], axis=1)


def _pad_to_width(tile: np.ndarray, width: int) -> np.ndarray:
    return np.concatenate([tile, np.full((tile.shape[0], width - tile.shape[1], 3), WHITE, np.uint8)], axis=1)


def _title_strip(titles: tuple[str, ...], widths: list[int]) -> np.ndarray:
    """A white strip with each column's title, left-aligned over its column."""
    scale = MOSAIC_TITLE_PX / FONT_PX_AT_SCALE_1
    strip = np.full((MOSAIC_TITLE_PX + 2 * MOSAIC_GAP, sum(widths) + MOSAIC_GAP * (len(widths) - 1), 3), WHITE,
                    np.uint8)
    left = 0
    for title, width in zip(titles, widths):
        cv2.putText(strip, title, (left, MOSAIC_GAP + MOSAIC_TITLE_PX - 1), FONT, scale, TITLE_COLOR, 1, cv2.LINE_AA)
        left += width + MOSAIC_GAP
    return strip


def _mosaic_grid(samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], palette: list | np.ndarray) -> np.ndarray:
    """Rows of (image, ground truth, prediction) under a title strip; every column as wide as its
    widest tile, so the columns line up whatever the images' sizes."""
    colours = full_palette(palette)
    rows = [[denormalize(image), colorize(target.astype(np.uint8), colours), colorize(prediction.astype(np.uint8), colours)]
            for image, target, prediction in samples]
    widths = [max(row[column].shape[1] for row in rows) for column in range(len(MOSAIC_TITLES))]
    parts = [_title_strip(MOSAIC_TITLES, widths)]
    for tiles in rows:
        gap = np.full((tiles[0].shape[0], MOSAIC_GAP, 3), WHITE, dtype=np.uint8)
        padded = [_pad_to_width(tile, width) for tile, width in zip(tiles, widths)]
        parts.append(np.concatenate([padded[0], gap, padded[1], gap, padded[2]], axis=1))
        parts.append(np.full((MOSAIC_GAP, parts[-1].shape[1], 3), WHITE, dtype=np.uint8))
    return np.concatenate(parts[:-1], axis=0)
