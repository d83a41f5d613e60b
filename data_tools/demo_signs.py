"""The second procedural family of the demo, `signs`: a check that a demo recipe is not tuned to one
dataset. `allspark prepare demo --family signs` builds it in the demo's layout.

Everything differs from the `shapes` family on purpose: four classes (hexagon, crescent, arrow,
heart) instead of six, other textures (checkerboards, dots, waves instead of stripes, gradients and
noise), tinted backgrounds of any hue with textures of their own, and other clutter (line bursts,
ellipse outlines, dull bars, class 0). As in `shapes`, the class of an object is its silhouette;
its hue is drawn from a per-class band that overlaps its neighbours, so colour hints without
settling the class. A sample is a pure function of (seed, split, index).
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from data_tools.demo_scene import (
    HUE_RANGE,
    SPLIT_CODES,
    HueBands,
    SceneComposition,
    SceneStyle,
    compose_scene,
    with_sensor_noise,
)

SIGNS_CLASSES = ("background", "hexagon", "crescent", "arrow", "heart")
SIGNS_PALETTE = ((0, 0, 0), (255, 99, 71), (65, 105, 225), (50, 205, 50), (238, 130, 238))
# Mixed into the generator's seed so that a signs image never shares its random stream with a
# shapes image of the same (seed, split, index).
FAMILY_CODE = 91

SIGNS_COMPOSITION = SceneComposition(objects=(2, 5), clutter=(1, 3), radius_min=14.0, radius_max_fraction=0.28)
SIGNS_HUES = HueBands(spacing=45, offset=10, jitter=30, saturation=(120, 256), value=(120, 256))
BACKGROUND_SATURATION_RANGE = (0, 70)
BACKGROUND_VALUE_RANGE = (50, 210)
CHECKER_CELL_RANGE = (3.0, 10.0)
DOT_CELL_RANGE = (4.0, 10.0)
DOT_RADIUS_OF_CELL = 1 / 3
WAVE_FREQUENCY_RANGE = (0.1, 0.4)  # radians per pixel
WAVE_BEND = 2.5  # amplitude of the wave's own bending, radians
CRESCENT_OFFSET_RANGE = (0.35, 0.6)  # of the radius: where the cutting disc sits
CRESCENT_CUT_RANGE = (0.8, 0.95)  # cutting disc radius / radius
ARROW_SHAFT_HALF_WIDTH = 0.22  # of the radius
ARROW_HEAD_HALF_WIDTH = 0.6
ARROW_HEAD_START = 0.2
HEART_POINTS = 40
HEART_SPAN = 17.0  # the parametric heart's half-width, to scale it to the radius
HEART_TILT = 0.6  # radians either way: a heart stays upright-ish
CLUTTER_LINES = (2, 5)
CLUTTER_THICKNESS = 0.12  # of the radius
CLUTTER_ELLIPSE_ASPECT = 0.6
CLUTTER_BAR_HALF_WIDTH = (0.3, 0.5)  # of the radius: wider than an arrow's shaft
IMAGE_NOISE_RANGE = (2.0, 8.0)


def _background_colour(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array(
        [[[rng.integers(0, HUE_RANGE), rng.integers(*BACKGROUND_SATURATION_RANGE),
           rng.integers(*BACKGROUND_VALUE_RANGE)]]],
        np.uint8,
    )
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _texture(rng: np.random.Generator, height: int, width: int, colour) -> np.ndarray:
    """(height, width, 3) float32 fill of two colours: solid, checkerboard, dots or bent waves."""
    first, second = colour(rng), colour(rng)
    kind = int(rng.integers(4))
    if kind == 0:
        return np.broadcast_to(first, (height, width, 3))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == 1:
        cell = rng.uniform(*CHECKER_CELL_RANGE)
        weight = (((xx // cell) + (yy // cell)) % 2).astype(np.float32)
    elif kind == 2:
        cell = rng.uniform(*DOT_CELL_RANGE)
        dx, dy = (xx % cell) - cell / 2, (yy % cell) - cell / 2
        weight = (dx**2 + dy**2 < (cell * DOT_RADIUS_OF_CELL) ** 2).astype(np.float32)
    else:
        frequency = rng.uniform(*WAVE_FREQUENCY_RANGE)
        weight = 0.5 + 0.5 * np.sin(frequency * xx + WAVE_BEND * np.sin(0.5 * frequency * yy))
    return first + weight[..., None] * (second - first)


def _placed(points: np.ndarray, center: np.ndarray, angle: float) -> np.ndarray:
    """Points (P, 2) around the origin, rotated by `angle` and moved to `center`, as int32 pixels."""
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return np.round(center + points @ rotation.T).astype(np.int32)


def _draw_object(layer: np.ndarray, class_id: int, center: np.ndarray, radius: float, rng: np.random.Generator) -> None:
    """The filled silhouette of class `class_id` (1..4) in `layer` (uint8, 1 = inside)."""
    angle = rng.uniform(0, 2 * math.pi)
    name = SIGNS_CLASSES[class_id]
    if name == "hexagon":
        corners = np.arange(6) * (math.pi / 3)
        cv2.fillPoly(layer, [_placed(radius * np.stack([np.cos(corners), np.sin(corners)], 1), center, angle)], 1)
    elif name == "crescent":
        cv2.circle(layer, tuple(int(v) for v in center), int(radius), 1, -1)
        offset = radius * rng.uniform(*CRESCENT_OFFSET_RANGE) * np.array([math.cos(angle), math.sin(angle)])
        cv2.circle(layer, tuple(int(v) for v in center + offset), int(radius * rng.uniform(*CRESCENT_CUT_RANGE)), 0, -1)
    elif name == "arrow":
        shaft, head, start = ARROW_SHAFT_HALF_WIDTH, ARROW_HEAD_HALF_WIDTH, ARROW_HEAD_START
        outline = np.array(
            [[-1, -shaft], [start, -shaft], [start, -head], [1, 0], [start, head], [start, shaft], [-1, shaft]]
        )
        cv2.fillPoly(layer, [_placed(radius * outline, center, angle)], 1)
    elif name == "heart":
        t = np.linspace(0, 2 * math.pi, HEART_POINTS, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        outline = np.stack([x, y], 1) * (radius / HEART_SPAN)
        cv2.fillPoly(layer, [_placed(outline, center, rng.uniform(-HEART_TILT, HEART_TILT))], 1)
    else:
        raise ValueError(f"no silhouette for class {class_id}")


def _draw_clutter(layer: np.ndarray, center: np.ndarray, radius: float, rng: np.random.Generator) -> None:
    """A background distractor (class 0): a burst of lines, an ellipse outline or a wide bar."""
    kind = int(rng.integers(3))
    thickness = max(2, int(radius * CLUTTER_THICKNESS))
    middle = tuple(int(v) for v in center)
    if kind == 0:
        for _ in range(int(rng.integers(*CLUTTER_LINES))):
            end = center + rng.uniform(-radius, radius, 2)
            cv2.line(layer, middle, tuple(int(v) for v in end), 1, thickness)
    elif kind == 1:
        axes = (int(radius), int(radius * CLUTTER_ELLIPSE_ASPECT))
        cv2.ellipse(layer, middle, axes, rng.uniform(0, 180), 0, 360, 1, thickness)
    else:
        half = radius * rng.uniform(*CLUTTER_BAR_HALF_WIDTH)
        bar = np.array([[-radius, -half], [radius, -half], [radius, half], [-radius, half]])
        cv2.fillPoly(layer, [_placed(bar, center, rng.uniform(0, 2 * math.pi))], 1)


SIGNS_STYLE = SceneStyle(SIGNS_COMPOSITION, SIGNS_HUES, _background_colour, _texture, _draw_object, _draw_clutter)


def render_signs_sample(seed: int, split: str, index: int, size_range: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One signs sample: (image (H, W, 3) uint8 RGB, mask (H, W) uint8 class ids 0..4)."""
    rng = np.random.default_rng((seed, SPLIT_CODES[split], index, FAMILY_CODE))
    height, width = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
    image = np.ascontiguousarray(_texture(rng, height, width, _background_colour), dtype=np.float32)
    mask = np.zeros((height, width), np.uint8)
    compose_scene(rng, image, mask, SIGNS_STYLE, len(SIGNS_CLASSES))
    return with_sensor_noise(image, rng, IMAGE_NOISE_RANGE), mask
