"""What every procedural family of the demo provides (data_tools/demo.py builds any of them)."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial
from typing import NamedTuple

import cv2
import numpy as np

# Mixed into each sample's seed: train and val images of one index never share a random stream.
SPLIT_CODES = {"train": 0, "val": 1}
HUE_RANGE = 180  # OpenCV's 8-bit hue: 0-179
UINT8_MAX = 255

# (seed, split, index, (min side, max side)) -> (image (H, W, 3) uint8 RGB, mask (H, W) uint8 class ids)
RenderFn = Callable[[int, str, int, tuple[int, int]], tuple[np.ndarray, np.ndarray]]


class SceneFamily(NamedTuple):
    """One procedural dataset family: its classes (0 = background), palette and sample renderer.
    `version` is bumped when the renderer changes, so an old folder is not mixed with new images."""

    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    render: RenderFn
    version: int


class SceneComposition(NamedTuple):
    """How many things one image holds and how large they are (inclusive count ranges)."""

    objects: tuple[int, int]
    clutter: tuple[int, int]
    radius_min: float  # pixels
    radius_max_fraction: float  # of the short image side


class HueBands(NamedTuple):
    """Object colours (OpenCV HSV, hue 0-179): the hue band of class c is centred on
    c * spacing + offset, +- jitter; with a jitter over half the spacing, neighbouring bands overlap,
    so colour hints at the class without settling it."""

    spacing: int
    offset: int
    jitter: int
    saturation: tuple[int, int]  # [low, high)
    value: tuple[int, int]  # [low, high)


class Placement(NamedTuple):
    class_id: int  # 0: clutter (background), else an object of that class
    center: np.ndarray  # (x, y) pixels
    radius: float  # pixels


# Texture painter: (height, width) -> (height, width, 3) float32 RGB.
TextureFn = Callable[[int, int], np.ndarray]


def object_colour(rng: np.random.Generator, class_id: int, bands: HueBands) -> np.ndarray:
    """An RGB float32 (3,) colour from the hue band of `class_id`."""
    jitter = rng.integers(-bands.jitter, bands.jitter + 1)
    hue = (class_id * bands.spacing + bands.offset + jitter) % HUE_RANGE
    hsv = np.array([[[hue, rng.integers(*bands.saturation), rng.integers(*bands.value)]]], dtype=np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def placements(
    rng: np.random.Generator, composition: SceneComposition, height: int, width: int, num_classes: int
) -> Iterator[Placement]:
    """The objects and clutter of one image, in drawing order (a random interleaving: either may
    occlude the other). Lazy: the caller draws each one from the same `rng` before the next is placed."""
    num_objects = int(rng.integers(composition.objects[0], composition.objects[1] + 1))
    num_clutter = int(rng.integers(composition.clutter[0], composition.clutter[1] + 1))
    order = rng.permutation(np.r_[np.ones(num_objects, dtype=int), np.zeros(num_clutter, dtype=int)])
    radius_max = max(composition.radius_min + 1, composition.radius_max_fraction * min(height, width))
    for is_object in order:
        # Log-uniform radius: as many small things as large ones; centres may lie near the border.
        radius = math.exp(rng.uniform(math.log(composition.radius_min), math.log(radius_max)))
        center = rng.uniform([0, 0], [width, height])
        class_id = int(rng.integers(1, num_classes)) if is_object else 0
        yield Placement(class_id, center, radius)


def paint_layer(image: np.ndarray, mask: np.ndarray, layer: np.ndarray, class_id: int, texture: TextureFn) -> None:
    """Fills the pixels of `layer` (uint8, 1 = inside) with a fresh texture and writes `class_id`
    into the mask there."""
    x, y, width, height = cv2.boundingRect(layer)
    if width == 0 or height == 0:
        return
    inside = layer[y : y + height, x : x + width].astype(bool)
    image[y : y + height, x : x + width][inside] = texture(height, width)[inside]
    mask[y : y + height, x : x + width][inside] = class_id


def with_sensor_noise(image: np.ndarray, rng: np.random.Generator, sigma_range: tuple[float, float]) -> np.ndarray:
    """Gaussian pixel noise of a random strength, then rounding to uint8 (H, W, 3)."""
    image = image + rng.normal(0, rng.uniform(*sigma_range), size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, UINT8_MAX).astype(np.uint8)


# (layer, class_id, center, radius, rng): draws the silhouette of class_id (>= 1) into layer.
DrawObjectFn = Callable[[np.ndarray, int, np.ndarray, float, np.random.Generator], None]
# (layer, center, radius, rng): draws a background distractor into layer.
DrawClutterFn = Callable[[np.ndarray, np.ndarray, float, np.random.Generator], None]
# rng -> an RGB float32 (3,) colour.
ColourFn = Callable[[np.random.Generator], np.ndarray]
# (rng, height, width, colour) -> (height, width, 3) float32: a random texture of colours drawn by colour.
FamilyTextureFn = Callable[[np.random.Generator, int, int, ColourFn], np.ndarray]


class SceneStyle(NamedTuple):
    """How one family fills its images: what they hold, its silhouettes, textures and colours."""

    composition: SceneComposition
    hues: HueBands  # of the objects
    clutter_colour: ColourFn
    texture: FamilyTextureFn
    draw_object: DrawObjectFn
    draw_clutter: DrawClutterFn


def compose_scene(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, style: SceneStyle, num_classes: int) -> None:
    """Places, draws and paints the objects and clutter of one image into `image` ((H, W, 3)
    float32) and `mask` ((H, W) uint8 class ids); objects get colours of their class's hue band."""
    layer = np.zeros(mask.shape, dtype=np.uint8)
    for thing in placements(rng, style.composition, mask.shape[0], mask.shape[1], num_classes):
        layer[:] = 0
        if thing.class_id:
            style.draw_object(layer, thing.class_id, thing.center, thing.radius, rng)
            colour = partial(object_colour, class_id=thing.class_id, bands=style.hues)
        else:
            style.draw_clutter(layer, thing.center, thing.radius, rng)
            colour = style.clutter_colour
        paint_layer(image, mask, layer, thing.class_id, partial(style.texture, rng, colour=colour))
