"""Pictures of the Semantic Memory and of the AllSpark module (paper figures 5, 6 and 7).

- `memory_grid`: the stored channels of one class slot as heat maps, each above the unlabeled
  image it was taken from (figure 7).
- `fill_level_chart`, `assigned_count_chart`: how many slots of each class hold written channels,
  and how many channels the grouping sent to each class (figure 6).
- `feature_pair_grid`: the same channel indices before and after the module (figure 5).
- `attention_class_map`, `attention_class_bars`: how much attention mass each query channel of
  an image puts on each class slot of the memory.

Every function returns an (H, W, 3) uint8 RGB array; the caller writes it (fileio.write_png).
Heat maps are min-max normalised per channel (a channel's absolute scale says nothing about
where it looks); a constant channel renders as the colour of 0.
"""
from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence

import cv2
import numpy as np

# Pixel size of one heat-map / thumbnail tile; large enough to read a 3x3 token grid, small
# enough that a 512-channel class slot stays a few megapixels.
TILE_SIZE = 96
# Height of the text strip under each tile, and the text look.
LABEL_HEIGHT = 14
FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.33
TEXT_COLOR = (20, 20, 20)
LABEL_PAD = 2  # pixels kept free left and right of a caption
BACKGROUND = 255
# Gap between tiles, in pixels.
GAP = 2
# Matplotlib output resolution and the per-class width of the bar charts (inches).
CHART_DPI = 100
CHART_HEIGHT_IN = 3.2
CHART_MIN_WIDTH_IN = 6.0
CHART_WIDTH_PER_CLASS_IN = 0.28
LABEL_FONT_SIZE = 8
LABEL_CHAR_IN = 0.075  # about one character of LABEL_FONT_SIZE text, in inches (with spacing)
LABEL_SLANT_DEGREES = 45
TITLE_FONT_SIZE = 11
TITLE_CHAR_IN = 0.095  # about one character of TITLE_FONT_SIZE text, in inches
# Colour of filled slots / noise slots / assigned counts in the charts.
FILLED_COLOR = "#2b7bba"
NOISE_COLOR = "#d9d9d9"
COUNT_COLOR = "#e6550d"


def normalize_unit(values: np.ndarray) -> np.ndarray:
    """Min-max scales any float array to [0, 1] (a constant array gives zeros)."""
    values = np.asarray(values, dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    if not np.isfinite(low) or not np.isfinite(high) or high - low <= 0.0:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def heatmap(channel: np.ndarray, size: tuple[int, int] = (TILE_SIZE, TILE_SIZE)) -> np.ndarray:
    """(h, w) float map -> (size[0], size[1], 3) uint8 RGB jet heat map, bilinear upsampled."""
    unit = normalize_unit(channel)
    height, width = size
    upsampled = cv2.resize(unit, (width, height), interpolation=cv2.INTER_LINEAR)
    gray = np.clip(upsampled * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(gray, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def thumbnail(image: np.ndarray, size: tuple[int, int] = (TILE_SIZE, TILE_SIZE)) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (size[0], size[1], 3), area-resized (no aspect kept: tiles align)."""
    height, width = size
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def limit_long_side(image: np.ndarray, max_side: int) -> np.ndarray:
    """(H, W, 3) uint8 -> the same image area-shrunk so that its long side is at most `max_side`."""
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return image
    return cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)


def label_scale(text: str, width: int) -> float:
    """FONT_SCALE, shrunk so that `text` fits `width` with LABEL_PAD pixels free on both sides."""
    text_width = cv2.getTextSize(text, FONT, FONT_SCALE, 1)[0][0]
    return min(FONT_SCALE, FONT_SCALE * (width - 2 * LABEL_PAD) / max(text_width, 1))


def label_strip(text: str, width: int) -> np.ndarray:
    """A white (LABEL_HEIGHT, width, 3) strip with `text` written on it, scaled down to fit inside
    the strip with a margin on both sides (so captions never touch the neighbouring tile)."""
    strip = np.full((LABEL_HEIGHT, width, 3), BACKGROUND, dtype=np.uint8)
    cv2.putText(strip, text, (LABEL_PAD, LABEL_HEIGHT - 4), FONT, label_scale(text, width), TEXT_COLOR, 1, cv2.LINE_AA)
    return strip


def tile_grid(cells: Sequence[np.ndarray], columns: int) -> np.ndarray:
    """Lays equally sized (h, w, 3) uint8 cells out row by row, GAP pixels apart, on white."""
    if not cells:
        raise ValueError("tile_grid needs at least one cell")
    cell_h, cell_w = cells[0].shape[:2]
    columns = max(1, min(columns, len(cells)))
    rows = -(-len(cells) // columns)
    canvas = np.full(
        (rows * cell_h + (rows - 1) * GAP, columns * cell_w + (columns - 1) * GAP, 3), BACKGROUND, dtype=np.uint8
    )
    for index, cell in enumerate(cells):
        row, col = divmod(index, columns)
        top, left = row * (cell_h + GAP), col * (cell_w + GAP)
        canvas[top : top + cell_h, left : left + cell_w] = cell
    return canvas


def memory_grid(
    channels: np.ndarray,
    labels: Sequence[str],
    sources: Sequence[np.ndarray | None] | None = None,
    *,
    columns: int = 16,
) -> np.ndarray:
    """Figure 7: stored channels of one class slot as heat maps, each above its source image.

    channels: (n, h, w) float, the stored N-vectors reshaped to the token grid.
    labels: n short captions (slot, iteration, channel). sources: n (H, W, 3) uint8 RGB images
    or None (drawn as a grey tile); leave the whole argument None when no provenance exists.
    Returns the (H, W, 3) uint8 RGB grid.
    """
    if len(labels) != len(channels):
        raise ValueError(f"{len(channels)} channels but {len(labels)} labels")
    cells = []
    for index, channel in enumerate(channels):
        parts = [heatmap(channel)]
        if sources is not None:
            source = sources[index]
            parts.append(
                thumbnail(source) if source is not None else np.full((TILE_SIZE, TILE_SIZE, 3), 200, np.uint8)
            )
        parts.append(label_strip(labels[index], TILE_SIZE))
        cells.append(np.concatenate(parts, axis=0))
    return tile_grid(cells, columns)


def feature_pair_grid(
    image: np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
    channel_ids: Sequence[int],
    *,
    columns: int = 8,
) -> np.ndarray:
    """Figure 5: the same channels before (top) and after (bottom) the AllSpark module.

    image: (H, W, 3) uint8 RGB input (drawn as the first cell). before, after: (C, h, w) float
    stage-4 maps; channel_ids: the indices shown. Heat maps keep the image's aspect ratio.
    """
    height, width = image.shape[:2]
    scale = TILE_SIZE / max(height, width)  # the long side fills the tile
    tile = (max(1, round(height * scale)), max(1, round(width * scale)))
    picture = thumbnail(image, tile)
    # The input heads both rows, so each row reads "image, then its channels".
    cells = [
        np.concatenate(
            [picture, label_strip("before AllSpark", tile[1]), picture, label_strip("after AllSpark", tile[1])], axis=0
        )
    ]
    for channel in channel_ids:
        cells.append(
            np.concatenate(
                [
                    heatmap(before[channel], tile),
                    label_strip(f"ch {channel}", tile[1]),
                    heatmap(after[channel], tile),
                    label_strip(f"ch {channel}", tile[1]),
                ],
                axis=0,
            )
        )
    return tile_grid(cells, columns + 1)


def _figure(width_in: float, height_in: float):
    # The object API with an Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=CHART_DPI)
    FigureCanvasAgg(figure)
    return figure


def _render(figure) -> np.ndarray:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=CHART_DPI)
    decoded = cv2.imdecode(np.frombuffer(buffer.getvalue(), np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def _chart_width(num_classes: int) -> float:
    return max(CHART_MIN_WIDTH_IN, CHART_WIDTH_PER_CLASS_IN * num_classes)


def _class_axis(axes, class_names: Sequence[str]) -> None:
    """Class names under the bars: level when they fit side by side, else slanted (read left to right)."""
    axes.set_xticks(range(len(class_names)))
    width_in = axes.figure.get_figwidth()
    fits_level = max((len(name) for name in class_names), default=0) * LABEL_CHAR_IN * len(class_names) < width_in
    if fits_level:
        axes.set_xticklabels(class_names, fontsize=LABEL_FONT_SIZE)
    else:
        axes.set_xticklabels(class_names, rotation=LABEL_SLANT_DEGREES, ha="right", rotation_mode="anchor",
                             fontsize=LABEL_FONT_SIZE)
    axes.set_xlim(-0.6, len(class_names) - 0.4)


def _title(axes, text: str) -> None:
    """A title wrapped to the figure's width (a long one would run off a narrow chart)."""
    characters = max(1, int(axes.figure.get_figwidth() / TITLE_CHAR_IN))
    axes.set_title("\n".join(textwrap.wrap(text, characters)), fontsize=TITLE_FONT_SIZE)


def fill_level_chart(filled: Sequence[int], slots: int, class_names: Sequence[str]) -> np.ndarray:
    """Stacked bars per class: slots holding written channels vs slots still holding initial noise."""
    filled_arr = np.asarray(filled, dtype=np.int64)
    figure = _figure(_chart_width(len(class_names)), CHART_HEIGHT_IN)
    axes = figure.add_subplot(1, 1, 1)
    positions = np.arange(len(class_names))
    axes.bar(positions, filled_arr, color=FILLED_COLOR, label="written")
    axes.bar(positions, slots - filled_arr, bottom=filled_arr, color=NOISE_COLOR, label="initial noise")
    axes.set_ylim(0, slots)
    axes.set_ylabel(f"slots (of {slots})")
    _title(axes, "Semantic Memory fill level per class")
    axes.legend(fontsize=7, loc="upper right")
    _class_axis(axes, class_names)
    return _render(figure)


def _class_bar_chart(values: np.ndarray, class_names: Sequence[str], *, ylabel: str, title: str, color) -> np.ndarray:
    """One bar per class (x axis: class names) -> RGB picture."""
    figure = _figure(_chart_width(len(class_names)), CHART_HEIGHT_IN)
    axes = figure.add_subplot(1, 1, 1)
    axes.bar(np.arange(len(class_names)), values, color=color)
    axes.set_ylabel(ylabel)
    _title(axes, title)
    _class_axis(axes, class_names)
    return _render(figure)


def assigned_count_chart(counts: Sequence[int], class_names: Sequence[str]) -> np.ndarray:
    """Figure 6: bars of how many channels the grouping sent to each class since training began."""
    return _class_bar_chart(np.asarray(counts, dtype=np.int64), class_names, ylabel="channels assigned",
                            title="Channel-wise Semantic Grouping: channels sent to each class", color=COUNT_COLOR)


def attention_class_map(mass: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """(Q, K) attention mass of Q query channels on K class slots -> heat map (rows: channels)."""
    num_channels = mass.shape[0]
    figure = _figure(_chart_width(len(class_names)), CHART_HEIGHT_IN * 1.5)
    axes = figure.add_subplot(1, 1, 1)
    shown = axes.imshow(mass, aspect="auto", interpolation="nearest", cmap="viridis")
    figure.colorbar(shown, ax=axes, label="attention mass")
    axes.set_ylabel(f"query channel (0..{num_channels - 1})")
    _title(axes, "Labeled-branch attention on the memory, per class slot")
    _class_axis(axes, class_names)
    return _render(figure)


def attention_class_bars(mean_mass: Sequence[float], class_names: Sequence[str]) -> np.ndarray:
    """(K,) mean attention mass per class slot (sums to 1 over classes) -> bar chart."""
    return _class_bar_chart(np.asarray(mean_mass, dtype=np.float64), class_names, ylabel="mean attention mass",
                            title="Which class slots the image's channels draw from", color=FILLED_COLOR)
