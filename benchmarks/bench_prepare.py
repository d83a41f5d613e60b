"""Masks per second per core of `allspark prepare coco` and `allspark prepare cityscapes`.

Builds synthetic sources in a temporary folder - COCO-style 640x480 JPEGs with an instances json
of polygons and RLE masks, Cityscapes-style 2048x1024 PNGs with labelIds masks - then runs the real
builders (image verification, mask painting / LUT mapping, PNG writing, splits) and prints
masks/s and the projected time for the full datasets (COCO 123,287 masks, Cityscapes 3,475).

    python benchmarks/bench_prepare.py [--coco 200] [--cityscapes 24] [--workers 1]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from data_tools.cityscapes import prepare_cityscapes
from data_tools.coco import prepare_coco

COCO_SIZE = (480, 640)  # (H, W), the typical COCO image
CITYSCAPES_SIZE = (1024, 2048)
COCO_TOTAL_MASKS = 118287 + 5000
CITYSCAPES_TOTAL_MASKS = 2975 + 500
ANNOTATIONS_PER_IMAGE = 7  # COCO averages ~7.3 instances per image
RLE_EVERY = 4  # one annotation in four is an RLE mask, the rest polygons
POLYGON_POINTS = 24
NUM_CATEGORIES = 80
LABEL_IDS = 34
SECONDS_PER_MINUTE = 60


def _smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photo-like image (gradients + mild noise) so JPEG/PNG sizes are realistic, not noise-sized."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * rng.uniform(100, 255, 3)
    return np.clip(base + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)


def _polygon(rng: np.random.Generator, height: int, width: int) -> list[float]:
    center = rng.uniform((0.2 * width, 0.2 * height), (0.8 * width, 0.8 * height))
    angles = np.sort(rng.uniform(0, 2 * np.pi, POLYGON_POINTS))
    radii = rng.uniform(0.05, 0.25, POLYGON_POINTS) * min(height, width)
    points = np.stack([center[0] + radii * np.cos(angles), center[1] + radii * np.sin(angles)], axis=1)
    return np.clip(points, 0, (width - 1, height - 1)).flatten().round(2).tolist()


def make_coco(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    height, width = COCO_SIZE
    for image_set in ("train2017", "val2017"):
        (root / image_set).mkdir(parents=True)
    (root / "annotations").mkdir()
    sets = {"train2017": [], "val2017": []}
    annotations = {"train2017": [], "val2017": []}
    for index in range(count):
        image_set = "val2017" if index % 10 == 0 else "train2017"
        name = f"{index + 1:012d}.jpg"
        Image.fromarray(_smooth_image(rng, height, width)).save(root / image_set / name, quality=90)
        sets[image_set].append({"id": index + 1, "file_name": name, "height": height, "width": width})
        for number in range(ANNOTATIONS_PER_IMAGE):
            polygon = _polygon(rng, height, width)
            if number % RLE_EVERY == 0:
                rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
                segmentation = {"counts": rle["counts"].decode("ascii"), "size": rle["size"]}
            else:
                segmentation = [polygon]
            annotations[image_set].append({
                "id": len(annotations[image_set]) + 1 + index * ANNOTATIONS_PER_IMAGE, "image_id": index + 1,
                "category_id": int(rng.integers(1, NUM_CATEGORIES + 1)), "segmentation": segmentation,
                "iscrowd": int(number == ANNOTATIONS_PER_IMAGE - 1 and index % 5 == 0), "area": 1.0, "bbox": [0, 0, 1, 1],
            })
    categories = [{"id": i, "name": f"class{i}"} for i in range(1, NUM_CATEGORIES + 1)]
    for image_set in sets:
        content = {"images": sets[image_set], "annotations": annotations[image_set], "categories": categories}
        (root / "annotations" / f"instances_{image_set}.json").write_text(json.dumps(content))


def make_cityscapes(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    height, width = CITYSCAPES_SIZE
    for index in range(count):
        split = "val" if index % 6 == 0 else "train"
        stem = f"city_{index:06d}_000019"
        for folder in ("leftImg8bit", "gtFine"):
            (root / folder / split / "city").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_smooth_image(rng, height, width)).save(root / "leftImg8bit" / split / "city" / f"{stem}_leftImg8bit.png")
        # Blocky label maps like real ones (large regions), not per-pixel noise.
        blocks = rng.integers(0, LABEL_IDS, (height // 64, width // 64), dtype=np.uint8)
        label_ids = np.kron(blocks, np.ones((64, 64), dtype=np.uint8))
        Image.fromarray(label_ids).save(root / "gtFine" / split / "city" / f"{stem}_gtFine_labelIds.png")


def _time(build, count: int, total: int, workers: int, label: str) -> None:
    start = time.perf_counter()
    summary = build()
    seconds = time.perf_counter() - start
    assert summary.masks_written == count, summary
    rate = count / seconds
    per_core = rate / workers
    projected = total / rate / SECONDS_PER_MINUTE
    print(f"{label:<11} {count:>6} masks in {seconds:6.1f} s  {rate:7.1f} masks/s  {per_core:7.1f} masks/s/core  "
          f"full dataset ({total:,} masks): {projected:6.1f} min at {workers} worker(s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco", type=int, default=200, help="synthetic COCO images")
    parser.add_argument("--cityscapes", type=int, default=24, help="synthetic Cityscapes images")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (1 = masks/s per core)")
    args = parser.parse_args()
    print(f"cpu cores: {os.cpu_count()}, workers: {args.workers}")
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        make_coco(base / "coco", args.coco)
        make_cityscapes(base / "cityscapes", args.cityscapes)
        _time(lambda: prepare_coco(base / "coco", base / "coco_out", workers=args.workers),
              args.coco, COCO_TOTAL_MASKS, args.workers, "coco")
        _time(lambda: prepare_cityscapes(base / "cityscapes", base / "cs_out", workers=args.workers),
              args.cityscapes, CITYSCAPES_TOTAL_MASKS, args.workers, "cityscapes")


if __name__ == "__main__":
    main()
