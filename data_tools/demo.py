"""The built-in demo dataset: procedurally drawn shapes, small enough to train on a laptop.

Layout (the same as every prepared dataset; see docs/data-pipeline.md):

    out_dir/dataset.yaml                      manifest, written last (its presence = complete)
    out_dir/demo-build.json                   the build parameters (a re-run must match them)
    out_dir/images/{train,val}/NNNNNN.jpg     RGB JPEG images, 128-256 px a side by default
    out_dir/masks/{train,val}/NNNNNN.png      8-bit palette PNG masks (class ids)
    out_dir/splits/<1-16|1-8|1-4|1-2|full>/{labeled,unlabeled}.txt, out_dir/splits/val.txt

What makes it a real segmentation problem: the class of an object is its *shape* (disc, square,
triangle, ring, star, cross). Textures (solid, stripes, gradients, noise) are drawn from the same
distribution for every class; hues come from overlapping per-class bands, so colour hints at the
class without settling it; objects vary in scale and rotation, overlap and occlude each other,
and the background carries clutter shaped like objects (ellipses, elongated bars, ring arcs,
irregular polygons, strokes) that is class 0. Objects are saturated and the background and its
clutter muted: a from-scratch model learns to find objects within a CPU demo's minutes, while
telling the classes apart needs shape where the colour bands overlap, which is where the number
of labels shows.
Train and val come from the same generator. Every image is a pure function of
(seed, split, index), so the dataset is identical for any number of workers, and an interrupted
build resumes by skipping files that exist (all files are written atomically).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np

from allspark_cli.data.manifest import FULL_SPLIT, MANIFEST_NAME, DatasetManifest, TrainSplit, write_manifest
from allspark_cli.data.splits import SplitEntry, write_split
from allspark_cli.errors import DataError, SettingsError
from allspark_cli.fileio import atomic_write_bytes, atomic_write_text, encode_palette_png
from data_tools.demo_scene import (
    SPLIT_CODES,
    UINT8_MAX,
    ColourFn,
    HueBands,
    SceneComposition,
    SceneFamily,
    SceneStyle,
    compose_scene,
    with_sensor_noise,
)
from data_tools.demo_signs import SIGNS_CLASSES, SIGNS_PALETTE, render_signs_sample

DEMO_CLASSES = ("background", "disc", "square", "triangle", "ring", "star", "cross")
DEMO_PALETTE = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180))
DEMO_TRAIN_CROP = 128
DEMO_SPLITS = {"1/16": 16, "1/8": 8, "1/4": 4, "1/2": 2}
BUILD_INFO_NAME = "demo-build.json"
# Bump when the generator changes, so an old folder is not silently mixed with new images.
GENERATOR_VERSION = 3
JPEG_QUALITY = 92
# Each split must have at least one labeled and one unlabeled image (1/2 of 2 = 1 + 1).
MIN_TRAIN = 2
MAX_CHUNK = 32
CHUNKS_PER_WORKER = 4
_LIST_SEED_CODE = 2

SHAPES_COMPOSITION = SceneComposition(objects=(3, 6), clutter=(0, 2), radius_min=12.0, radius_max_fraction=0.3)
# Strong saturation and value; bands 30 apart, +- 20: colour is a quick but ambiguous cue (a
# from-scratch model learns it within a CPU demo's budget), and shape settles the ambiguous cases,
# which is where the number of labels shows.
SHAPES_HUES = HueBands(spacing=30, offset=0, jitter=20, saturation=(140, 256), value=(110, 256))
RING_HOLE_RANGE = (0.45, 0.65)
STAR_POINTS = 5
STAR_INNER_RATIO = 0.42
CROSS_ARM_RATIO = 0.36  # arm width relative to the cross's span
CLUTTER_ELLIPSE_AXIS_RANGE = (0.2, 0.5)  # short axis / long axis: clearly not a disc
CLUTTER_BAR_ASPECT_RANGE = (2.5, 5.0)  # long side / short side: clearly not a square
# The background texture is pulled this far towards its mean colour: a softer background keeps
# objects findable; clutter keeps its full contrast.
BACKGROUND_CONTRAST = 0.5
STRIPE_PERIOD_RANGE = (4.0, 16.0)
NOISE_CELL = 8  # pixels per cell of the low-frequency noise
IMAGE_BLUR_MAX = 0.8
BLUR_VISIBLE = 0.1  # a smaller sigma is not applied
IMAGE_NOISE_RANGE = (2.0, 8.0)
# Background and clutter colours: greys with a slight tint.
MUTED_GREY_RANGE = (60.0, 200.0)
MUTED_TINT = 18.0

Progress = Callable[[int, int], None]


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    grey = rng.uniform(*MUTED_GREY_RANGE)
    return np.clip(grey + rng.uniform(-MUTED_TINT, MUTED_TINT, size=3), 0, UINT8_MAX).astype(np.float32)


def _texture(rng: np.random.Generator, height: int, width: int, colour: ColourFn) -> np.ndarray:
    """(height, width, 3) float32 fill: solid, stripes, gradient or blotchy noise of two colours."""
    first, second = colour(rng), colour(rng)
    kind = int(rng.integers(4))
    if kind == 0:
        return np.broadcast_to(first, (height, width, 3))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == 1:
        period = rng.uniform(*STRIPE_PERIOD_RANGE)
        weight = (np.sin(along * (2 * math.pi / period)) > 0).astype(np.float32)
    elif kind == 2:
        weight = (along - along.min()) / max(float(np.ptp(along)), 1.0)
    else:
        cells = rng.random((height // NOISE_CELL + 2, width // NOISE_CELL + 2)).astype(np.float32)
        weight = np.clip(cv2.resize(cells, (width, height), interpolation=cv2.INTER_CUBIC), 0, 1)
    return first + weight[..., None] * (second - first)


def _polygon(center: np.ndarray, radii: np.ndarray, angles: np.ndarray) -> np.ndarray:
    points = center + np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    return np.round(points).astype(np.int32)


def _rectangle(center: np.ndarray, half_long: float, half_short: float, angle: float) -> np.ndarray:
    signs = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    corners = signs * np.array([half_long, half_short])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return np.round(center + corners @ rotation.T).astype(np.int32)


def _draw_object(layer: np.ndarray, class_id: int, center: np.ndarray, radius: float, rng: np.random.Generator) -> None:
    """Draws the filled silhouette of class `class_id` (1..6) into `layer` (uint8, 1 = inside)."""
    angle = rng.uniform(0, 2 * math.pi)
    name = DEMO_CLASSES[class_id]
    cx, cy = int(round(center[0])), int(round(center[1]))
    if name in ("disc", "ring"):
        cv2.circle(layer, (cx, cy), int(round(radius)), 1, thickness=-1)
        if name == "ring":
            cv2.circle(layer, (cx, cy), int(round(radius * rng.uniform(*RING_HOLE_RANGE))), 0, thickness=-1)
    elif name == "square":
        cv2.fillPoly(layer, [_rectangle(center, radius / math.sqrt(2), radius / math.sqrt(2), angle)], 1)
    elif name == "triangle":
        angles = angle + np.arange(3) * (2 * math.pi / 3)
        cv2.fillPoly(layer, [_polygon(center, np.full(3, radius), angles)], 1)
    elif name == "star":
        angles = angle + np.arange(2 * STAR_POINTS) * (math.pi / STAR_POINTS)
        radii = np.where(np.arange(2 * STAR_POINTS) % 2 == 0, radius, radius * STAR_INNER_RATIO)
        cv2.fillPoly(layer, [_polygon(center, radii, angles)], 1)
    elif name == "cross":
        half_arm = radius * CROSS_ARM_RATIO
        for arm_angle in (angle, angle + math.pi / 2):
            cv2.fillPoly(layer, [_rectangle(center, radius, half_arm, arm_angle)], 1)
    else:
        raise ValueError(f"no silhouette for class {class_id}")


def _draw_clutter(layer: np.ndarray, center: np.ndarray, radius: float, rng: np.random.Generator) -> None:
    """Draws a background distractor: shaped like an object at a glance, but not one of the classes."""
    kind = int(rng.integers(5))
    cx, cy = int(round(center[0])), int(round(center[1]))
    angle = rng.uniform(0, 2 * math.pi)
    if kind == 0:
        axes = (int(round(radius)), max(1, int(round(radius * rng.uniform(*CLUTTER_ELLIPSE_AXIS_RANGE)))))
        cv2.ellipse(layer, (cx, cy), axes, math.degrees(angle), 0, 360, 1, thickness=-1)
    elif kind == 1:
        short = radius / rng.uniform(*CLUTTER_BAR_ASPECT_RANGE)
        cv2.fillPoly(layer, [_rectangle(center, radius, short, angle)], 1)
    elif kind == 2:
        thickness = max(2, int(round(radius * rng.uniform(0.15, 0.35))))
        sweep = rng.uniform(90, 240)  # degrees; a full circle would be a ring
        start = math.degrees(angle)
        cv2.ellipse(layer, (cx, cy), (int(round(radius)),) * 2, 0, start, start + sweep, 1, thickness=thickness)
    elif kind == 3:
        count = int(rng.integers(5, 10))
        angles = np.sort(rng.uniform(0, 2 * math.pi, size=count))
        cv2.fillPoly(layer, [_polygon(center, radius * rng.uniform(0.3, 1.0, size=count), angles)], 1)
    else:
        points = _polygon(center, radius * rng.uniform(0.2, 1.0, size=3), rng.uniform(0, 2 * math.pi, size=3))
        cv2.polylines(layer, [points], False, 1, thickness=max(2, int(round(radius * 0.2))))


SHAPES_STYLE = SceneStyle(SHAPES_COMPOSITION, SHAPES_HUES, _muted_colour, _texture, _draw_object, _draw_clutter)


def render_sample(seed: int, split: str, index: int, size_range: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One demo sample: (image (H, W, 3) uint8 RGB, mask (H, W) uint8 class ids 0..6).

    A pure function of its arguments; H and W are drawn independently from `size_range`.
    """
    rng = np.random.default_rng((seed, SPLIT_CODES[split], index))
    height, width = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
    background = _texture(rng, height, width, _muted_colour)
    mean = background.mean(axis=(0, 1))
    image = np.ascontiguousarray(mean + BACKGROUND_CONTRAST * (background - mean), dtype=np.float32)
    mask = np.zeros((height, width), dtype=np.uint8)
    compose_scene(rng, image, mask, SHAPES_STYLE, len(DEMO_CLASSES))
    sigma = rng.uniform(0, IMAGE_BLUR_MAX)
    if sigma > BLUR_VISIBLE:
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma)
    return with_sensor_noise(image, rng, IMAGE_NOISE_RANGE), mask


# The demo presets train on `shapes`; `signs` is the second family that checks a demo recipe is not
# tuned to one dataset (data_tools/demo_signs.py).
DEFAULT_FAMILY = "shapes"
FAMILIES = {
    "shapes": SceneFamily("shapes", DEMO_CLASSES, DEMO_PALETTE, render_sample, GENERATOR_VERSION),
    "signs": SceneFamily("signs", SIGNS_CLASSES, SIGNS_PALETTE, render_signs_sample, 1),
}


def scene_family(name: str) -> SceneFamily:
    """The family called `name`, or a SettingsError (exit 2, a bad option) listing the known ones."""
    if name not in FAMILIES:
        raise SettingsError(f"unknown demo family {name!r}; expected one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def _relpaths(split: str, index: int) -> SplitEntry:
    return SplitEntry(f"images/{split}/{index:06d}.jpg", f"masks/{split}/{index:06d}.png")


def _write_sample(job: tuple[Path, str, int, str, int, tuple[int, int]]) -> None:
    out_dir, family_name, seed, split, index, size_range = job
    family = FAMILIES[family_name]
    entry = _relpaths(split, index)
    image_path, mask_path = out_dir / entry.image, out_dir / entry.mask
    if image_path.is_file() and mask_path.is_file():
        return  # written atomically by an earlier run: complete
    image, mask = family.render(seed, split, index, size_range)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise DataError(f"could not encode demo image {image_path}")
    atomic_write_bytes(image_path, jpeg.tobytes())
    atomic_write_bytes(mask_path, encode_palette_png(mask, np.array(family.palette, dtype=np.uint8)))


def _check_build_info(out_dir: Path, info: dict) -> None:
    """Writes the build parameters, or refuses a folder holding a demo built with other ones."""
    path = out_dir / BUILD_INFO_NAME
    if path.is_file():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            existing = None
        if existing != info:
            raise DataError(
                f"{out_dir} holds a demo dataset built with other parameters ({path}); "
                "use another output folder or delete this one"
            )
        return
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"output folder {out_dir} is not empty and holds no demo dataset; choose an empty folder")
    atomic_write_text(path, json.dumps(info, indent=2, sort_keys=True) + "\n")


def _write_splits(out_dir: Path, seed: int, num_train: int, num_val: int) -> tuple[dict[str, TrainSplit], str]:
    train = [_relpaths("train", index) for index in range(num_train)]
    order = np.random.default_rng((seed, _LIST_SEED_CODE)).permutation(num_train)
    splits = {}
    for name, denominator in DEMO_SPLITS.items():
        # Labeled sets are nested (1/16 inside 1/8 ...): prefixes of one seeded permutation.
        chosen = set(order[: max(1, num_train // denominator)].tolist())
        folder = f"splits/{name.replace('/', '-')}"
        write_split(out_dir / folder / "labeled.txt", [train[i] for i in sorted(chosen)])
        write_split(out_dir / folder / "unlabeled.txt", [train[i] for i in range(num_train) if i not in chosen])
        splits[name] = TrainSplit(labeled=f"{folder}/labeled.txt", unlabeled=f"{folder}/unlabeled.txt")
    write_split(out_dir / "splits/full/labeled.txt", train)
    splits[FULL_SPLIT] = TrainSplit(labeled="splits/full/labeled.txt", unlabeled=None)
    write_split(out_dir / "splits/val.txt", [_relpaths("val", index) for index in range(num_val)])
    return splits, "splits/val.txt"


def build_demo(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    num_train: int = 2000,
    num_val: int = 200,
    size: tuple[int, int] = (128, 256),
    family: str = DEFAULT_FAMILY,
    workers: int | None = None,
    progress: Progress | None = None,
) -> Path:
    """Builds (or completes) the demo dataset in `out_dir`; returns the path of its dataset.yaml.

    `size` is the (min, max) side length in pixels; `family` the procedural family (FAMILIES); `workers` processes draw the images (None:
    one per CPU core); `progress(done, total)` is called as images are finished. Raises
    DataError when `out_dir` holds something else or a demo built with other parameters.
    """
    if num_train < MIN_TRAIN or num_val < 1:
        raise DataError(f"the demo needs at least {MIN_TRAIN} training images and 1 validation image")
    low, high = int(size[0]), int(size[1])
    if not 0 < low <= high:
        raise DataError(f"demo image size range must satisfy 0 < min <= max, got {size}")
    scenes = scene_family(family)
    out_dir = Path(out_dir).absolute()
    info = {"generator": scenes.version, "seed": seed, "num_train": num_train, "num_val": num_val, "size": [low, high]}
    if scenes.name != DEFAULT_FAMILY:  # a shapes folder built before families existed keeps its record
        info["family"] = scenes.name
    _check_build_info(out_dir, info)
    jobs = [(out_dir, scenes.name, seed, "train", i, (low, high)) for i in range(num_train)]
    jobs += [(out_dir, scenes.name, seed, "val", i, (low, high)) for i in range(num_val)]
    workers = (os.cpu_count() or 1) if workers is None else max(1, workers)
    if workers == 1:
        results = map(_write_sample, jobs)
        for done, _ in enumerate(results, start=1):
            if progress is not None:
                progress(done, len(jobs))
    else:
        # The jobs are plain tuples and _write_sample is top-level: works with fork and spawn.
        with get_context().Pool(workers) as pool:
            chunksize = max(1, min(MAX_CHUNK, len(jobs) // (workers * CHUNKS_PER_WORKER)))
            for done, _ in enumerate(pool.imap_unordered(_write_sample, jobs, chunksize=chunksize), start=1):
                if progress is not None:
                    progress(done, len(jobs))
    train_splits, val_list = _write_splits(out_dir, seed, num_train, num_val)
    manifest = DatasetManifest(
        name="demo" if scenes.name == DEFAULT_FAMILY else f"demo-{scenes.name}",
        root=out_dir,
        classes=list(scenes.classes),
        palette=[tuple(colour) for colour in scenes.palette],
        train_splits=train_splits,
        eval_splits={"val": val_list},
        eval_mode="whole",
        train_crop=DEMO_TRAIN_CROP,
    )
    manifest_path = out_dir / MANIFEST_NAME
    write_manifest(manifest, manifest_path)
    return manifest_path
