"""TensorBoard events of a tiny run (the reference's tags), runs without the package, and the
per-iteration curves and mosaic legend of the run folder's pictures."""
from __future__ import annotations

import math

from pathlib import Path

import numpy as np
import pytest
from train_fixtures import make_dataset, tiny_layer

from allspark_cli.engine.training import tensorboard as tensorboard_module
from allspark_cli.engine.settings_layers import build_settings
from allspark_cli.engine.training.train import train
from allspark_cli.errors import EnvError
from allspark_cli.viz.plots import smoothed, validation_mosaic

pytest.importorskip("tensorboard")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tb_data"))


def _tags(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    scalars.update({tag: [] for tag in events.Tags()["images"]})
    return scalars


def test_a_tiny_run_writes_tensorboard_events(manifest: Path, tmp_path: Path) -> None:
    layer = tiny_layer(manifest, tmp_path / "runs", train={"epochs": 2}, run={"tensorboard": "on"})
    result = train(build_settings(base=layer))
    tags = _tags(result.run_dir)
    for tag in ("train/loss_all", "train/loss_x", "train/loss_u", "train/lr", "eval/mIoU", "eval/pixel_accuracy",
                "eval/square_IoU", "eval/val_mosaic"):
        assert tag in tags, tag
    assert len(tags["train/loss_all"]) == result.iterations  # log_every 1: one point per iteration
    assert tags["eval/mIoU"] == pytest.approx([row["miou"] for row in result.history], abs=1e-3)


def test_runs_without_the_package(manifest: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tensorboard_module, "tensorboard_available", lambda: False)
    result = train(build_settings(base=tiny_layer(manifest, tmp_path / "runs")))  # auto: simply no events
    assert not (result.run_dir / "tensorboard").exists()
    with pytest.raises(EnvError, match="allspark\\[tensorboard\\]"):
        train(build_settings(base=tiny_layer(manifest, tmp_path / "runs2", run={"tensorboard": "on"})))
    assert not (tmp_path / "runs2").exists()  # refused before anything was written


def test_off_writes_no_events(manifest: Path, tmp_path: Path) -> None:
    result = train(build_settings(base=tiny_layer(manifest, tmp_path / "runs", run={"tensorboard": "off"})))
    assert not (result.run_dir / "tensorboard").exists()


def test_smoothing_follows_the_logged_values() -> None:
    assert smoothed([1.0, float("nan"), 1.0]) == pytest.approx([1.0, 1.0, 1.0])
    values = smoothed([0.0, 10.0, 10.0, 10.0])
    assert values[0] == 0.0 and 0 < values[1] < values[2] < values[3] < 10.0


def test_smoothing_is_the_decaying_mean_of_the_points_so_far() -> None:
    """Bias-corrected: point k of n weighs weight^(n-k), normalised, so on a short run the line
    is not held up by the first (high) loss."""
    losses = [2.0, 1.0, 0.9, 0.8]
    weight = 0.8
    for n in range(1, len(losses) + 1):
        weights = [weight ** (n - 1 - k) for k in range(n)]
        expected = sum(w * x for w, x in zip(weights, losses)) / sum(weights)
        assert smoothed(losses, weight)[n - 1] == pytest.approx(expected)
    assert smoothed(losses, weight)[1] < 1.5  # started at the first value it would be 1.8
    assert math.isnan(smoothed([float("nan"), 1.0])[0])


def test_mosaic_has_column_titles_and_aligned_columns() -> None:
    from allspark_cli.viz.plots import MOSAIC_GAP, MOSAIC_TITLE_PX

    palette = [(0, 0, 0), (200, 40, 40), (40, 200, 40)]
    samples = []
    for height, width in ((20, 30), (24, 12), (16, 40)):
        image = np.zeros((3, height, width), np.float32)
        samples.append((image, np.ones((height, width), np.int64), np.full((height, width), 2, np.int64)))
    mosaic = validation_mosaic(samples, palette)
    title_rows = MOSAIC_TITLE_PX + 2 * MOSAIC_GAP
    assert (mosaic[:title_rows] != 255).any()  # the titles' ink
    # Every row's prediction tile (class 2's colour) starts at the same column.
    green = (mosaic == np.array(palette[2], np.uint8)).all(axis=-1)
    starts = {int(np.argmax(green[row])) for row in range(title_rows, mosaic.shape[0]) if green[row].any()}
    assert len(starts) == 1 and starts.pop() == 40 + MOSAIC_GAP + 40 + MOSAIC_GAP  # widest image, widest truth


def test_mosaic_legend_lists_the_classes_shown() -> None:
    image = np.zeros((3, 32, 32), np.float32)
    target = np.zeros((32, 32), np.int64)
    target[:8] = 1
    prediction = np.full((32, 32), 2, np.int64)
    palette = [(0, 0, 0), (200, 40, 40), (40, 200, 40)]
    plain = validation_mosaic([(image, target, prediction)], palette)
    with_legend = validation_mosaic([(image, target, prediction)], palette, ["background", "square", "disc"])
    assert with_legend.shape[0] >= plain.shape[0] and with_legend.shape[1] > plain.shape[1]
    assert (with_legend[:plain.shape[0], :plain.shape[1]] == plain).all()
    panel = with_legend[:, plain.shape[1]:]
    for colour in palette[1:]:  # a swatch of each class shown
        assert (panel == np.array(colour, np.uint8)).all(axis=-1).any()


def test_memory_captions_fit_their_tile() -> None:
    import cv2

    from allspark_cli.viz.memory import (
        FONT,
        LABEL_PAD,
        TILE_SIZE,
        label_scale,
        label_strip,
    )

    for text in ("s10 it99 c104", "s511 it123456 c2047"):
        width = cv2.getTextSize(text, FONT, label_scale(text, TILE_SIZE), 1)[0][0]
        assert width <= TILE_SIZE - 2 * LABEL_PAD
        strip = label_strip(text, TILE_SIZE)
        assert (strip[:, -LABEL_PAD:] == 255).all()  # the right margin stays blank: no run-on into the next tile


@pytest.mark.parametrize("class_names", [
    ["background", "square", "disc", "triangle", "ring", "star", "cross"],
    ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
     "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"],
])
def test_class_charts_keep_their_title_and_readable_labels(class_names) -> None:
    """The title stays inside the picture and no two class names overlap (inspect-memory's charts)."""
    from allspark_cli.viz import memory as pictures

    figure = pictures._figure(pictures._chart_width(len(class_names)), pictures.CHART_HEIGHT_IN)
    axes = figure.add_subplot(1, 1, 1)
    axes.bar(range(len(class_names)), range(len(class_names)))
    pictures._title(axes, "Channel-wise Semantic Grouping: channels sent to each class")
    pictures._class_axis(axes, class_names)
    figure.tight_layout()
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    inside = figure.bbox
    title = axes.title.get_window_extent(renderer)
    assert inside.x0 <= title.x0 and title.x1 <= inside.x1 and title.y1 <= inside.y1
    labels = [label.get_window_extent(renderer) for label in axes.get_xticklabels()]
    assert all(label.x0 >= inside.x0 and label.y0 >= inside.y0 for label in labels)
    for left, right in zip(labels, labels[1:]):  # level labels side by side, slanted ones staggered
        assert left.x1 <= right.x1 and not (left.overlaps(right) and axes.get_xticklabels()[0].get_rotation() == 0)
    assert axes.get_xticklabels()[0].get_fontsize() >= 8
