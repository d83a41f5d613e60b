"""Prediction overlays: the image blended with the class colours, plus a legend of the classes shown.

`blend` mixes image and colour map per pixel (`opacity` = weight of the colours); pixels of the
ignore index keep the plain image. `draw_legend` writes one swatch and name per class present in
the mask into the top-left corner (at most LEGEND_CORNER_SHARE of the height and width) with OpenCV (no matplotlib per image: prediction writes
thousands of these). All arrays are RGB uint8.
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from allspark_cli.constants import IGNORE_INDEX
from allspark_cli.viz.palette import colorize

FONT = cv2.FONT_HERSHEY_SIMPLEX
# Legend text height relative to the image's shorter side, within readable bounds (pixels).
LEGEND_TEXT_FRACTION = 0.03
MIN_TEXT_PX = 10
MAX_TEXT_PX = 28
# cv2's Hershey font is about 22 pixels tall at scale 1.
FONT_PX_AT_SCALE_1 = 22.0
LEGEND_MARGIN_FRACTION = 0.4  # of the text height
LEGEND_BACKGROUND = (255, 255, 255)
LEGEND_BACKGROUND_ALPHA = 0.7
TEXT_COLOR = (0, 0, 0)
# The range of `opacity`: the image only .. the colours only (every caller's bound).
MIN_OPACITY, MAX_OPACITY = 0.0, 1.0
TEXT_THICKNESS = 1
# The overlay legend keeps to the top-left corner of this share of the image's height and width.
LEGEND_CORNER_SHARE = 0.4


def blend(image: np.ndarray, mask: np.ndarray, palette: np.ndarray | Sequence, opacity: float) -> np.ndarray:
    """(H, W, 3) uint8 RGB image + (H, W) class ids -> (H, W, 3) uint8 RGB overlay.

    opacity in [0, 1]: 0 shows the image, 1 the colour map; ignore pixels always show the image.
    """
    if not MIN_OPACITY <= opacity <= MAX_OPACITY:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    colors = colorize(mask, palette).astype(np.float32)
    mixed = image.astype(np.float32) * (MAX_OPACITY - opacity) + colors * opacity
    mixed[mask == IGNORE_INDEX] = image[mask == IGNORE_INDEX]
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _legend_geometry(height: int, width: int) -> tuple[float, int, int]:
    text_px = int(np.clip(min(height, width) * LEGEND_TEXT_FRACTION, MIN_TEXT_PX, MAX_TEXT_PX))
    scale = text_px / FONT_PX_AT_SCALE_1
    margin = max(1, int(text_px * LEGEND_MARGIN_FRACTION))
    return scale, text_px, margin


def legend_height(rows: int, width: int) -> int:
    """Pixels that `draw_legend` needs for `rows` classes on a canvas `width` wide (and at least as tall)."""
    _, text_px, margin = _legend_geometry(width, width)
    return 2 * margin + rows * (text_px + margin)


def draw_legend(
    image: np.ndarray, class_ids: Sequence[int], class_names: Sequence[str], palette: np.ndarray | Sequence,
    corner_share: float = LEGEND_CORNER_SHARE,
) -> np.ndarray:
    """Copy of `image` (H, W, 3 uint8 RGB) with a swatch + name per class id in the top-left corner.

    The legend stays inside the corner of `corner_share` of the image's height and width (on a small
    image, classes that do not fit become one "+N more" row, long names are shortened); it never
    changes the image size. A legend panel of its own (the mosaic's) passes `corner_share=1`.
    """
    out = image.copy()
    height, width = out.shape[:2]
    colors = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    scale, text_px, margin = _legend_geometry(height, width)
    row_height = text_px + margin
    labels = [class_names[k] if k < len(class_names) else f"class_{k}" for k in class_ids]
    fitting = max(0, (int(height * corner_share) - margin) // row_height)
    rows = min(len(labels), fitting)
    if rows == 0:
        return out
    # Rows that do not fit in the corner are summed up in its last row ("+N more").
    shown = list(zip(class_ids[:rows], labels[:rows]))
    text_room = max(1, int(width * corner_share) - margin * 3 - text_px)
    shown = [(class_id, _fit_text(label, scale, text_room)) for class_id, label in shown]
    if rows < len(labels):
        hidden = len(labels) - rows + 1
        summary = f"+{hidden} more"
        fits = cv2.getTextSize(summary, FONT, scale, TEXT_THICKNESS)[0][0] <= text_room
        shown[-1] = (None, summary if fits else f"+{hidden}")
    text_width = max(cv2.getTextSize(label, FONT, scale, TEXT_THICKNESS)[0][0] for _, label in shown)
    box_right = min(width, margin * 3 + text_px + text_width)
    box_bottom = min(height, margin + rows * row_height)
    panel = out[:box_bottom, :box_right].astype(np.float32)
    panel = panel * (1 - LEGEND_BACKGROUND_ALPHA) + np.array(LEGEND_BACKGROUND, np.float32) * LEGEND_BACKGROUND_ALPHA
    out[:box_bottom, :box_right] = np.rint(panel).astype(np.uint8)
    for row, (class_id, label) in enumerate(shown):
        top = margin + row * row_height
        if class_id is not None:
            color = tuple(int(c) for c in colors[class_id]) if class_id < len(colors) else TEXT_COLOR
            cv2.rectangle(out, (margin, top), (margin + text_px, top + text_px), color, thickness=cv2.FILLED)
        origin = (margin * 2 + text_px, top + text_px - 1)
        cv2.putText(out, label, origin, FONT, scale, TEXT_COLOR, TEXT_THICKNESS, cv2.LINE_AA)
    return out


def _fit_text(label: str, scale: float, room: int) -> str:
    """`label`, shortened with a trailing '.' until it is at most `room` pixels wide (at least one character)."""
    if cv2.getTextSize(label, FONT, scale, TEXT_THICKNESS)[0][0] <= room:
        return label
    for end in range(len(label) - 1, 0, -1):
        short = label[:end] + "."
        if cv2.getTextSize(short, FONT, scale, TEXT_THICKNESS)[0][0] <= room:
            return short
    return label[:1]


def overlay_with_legend(
    image: np.ndarray,
    mask: np.ndarray,
    class_names: Sequence[str],
    palette: np.ndarray | Sequence,
    opacity: float,
) -> np.ndarray:
    """`blend` + `draw_legend` of the classes present in `mask` (ignore excluded), ascending ids."""
    present = [int(k) for k in np.unique(mask) if k != IGNORE_INDEX]
    return draw_legend(blend(image, mask, palette, opacity), present, class_names, palette)
