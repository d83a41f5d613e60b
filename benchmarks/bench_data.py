"""Data-loading speed per CPU core: samples/s of LabeledDataset and UnlabeledDataset (weak view
alone, and with the weak-to-strong recipe's strong view and CutMix box).

Generates Pascal-sized JPEG images (about 500x375, quality 90) with palette-PNG masks in a
temporary folder, then times `dataset[i]` in this single process with OpenCV and torch limited to
one thread, at the Pascal training crop (513). Reports the median rate over windows of samples,
so a hiccup of the shared machine does not decide the number.

Reference point (measured on this project's development machine): the reference pipeline
(Pillow + torchvision transforms) reaches about 39 labeled and 140 unlabeled samples/s per core.

Usage: python benchmarks/bench_data.py [--samples 300] [--crop 513] [--images 64]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from allspark_cli.data.datasets import LabeledDataset, UnlabeledDataset
from allspark_cli.data.splits import SplitEntry
from allspark_cli.fileio import write_png
from allspark_cli.labels import voc_palette

PASCAL_SIZES = ((500, 375), (375, 500), (500, 333), (500, 400))  # typical VOC (width, height)
JPEG_QUALITY = 90
NUM_CLASSES = 21
WINDOW = 25  # samples per timing window
REFERENCE_RATES = {"labeled": 39.0, "unlabeled": 140.0}


def make_images(folder: Path, count: int, seed: int = 0) -> list[SplitEntry]:
    """Writes `count` photo-like JPEGs (smooth gradients + blobs + noise) and palette masks."""
    rng = np.random.default_rng(seed)
    entries = []
    for index in range(count):
        width, height = PASCAL_SIZES[index % len(PASCAL_SIZES)]
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        base = rng.uniform(0, 255, size=3).astype(np.float32)
        image = base + 60 * np.sin(xx[..., None] / rng.uniform(20, 80) + rng.uniform(0, 6, size=3))
        image += rng.normal(0, 12, size=image.shape).astype(np.float32)
        mask = np.zeros((height, width), dtype=np.uint8)
        for _ in range(4):
            cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(30, 120)
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            mask[inside] = rng.integers(1, NUM_CLASSES)
            image[inside] = image[inside] * 0.5 + rng.uniform(0, 255, size=3) * 0.5
        image_path = folder / f"JPEGImages/{index:05d}.jpg"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        bgr = cv2.cvtColor(np.clip(image, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(image_path), bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        write_png(folder / f"SegmentationClass/{index:05d}.png", mask, palette=voc_palette())
        entries.append(SplitEntry(f"JPEGImages/{index:05d}.jpg", f"SegmentationClass/{index:05d}.png"))
    return entries


def median_rate(dataset, samples: int) -> float:
    """Median samples/s over windows of WINDOW consecutive samples (after one warm-up window)."""
    for index in range(WINDOW):
        dataset[index % len(dataset)]
    rates = []
    for start in range(0, samples, WINDOW):
        began = time.perf_counter()
        for index in range(start, start + WINDOW):
            dataset[index % len(dataset)]
        rates.append(WINDOW / (time.perf_counter() - began))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--crop", type=int, default=513)
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        entries = make_images(root, args.images)
        labeled = LabeledDataset(root, entries, crop=args.crop, seed=0, length=args.samples + WINDOW)
        unlabeled = UnlabeledDataset(root, entries, crop=args.crop, seed=0)
        strong = UnlabeledDataset(root, entries, crop=args.crop, seed=0, strong_view=True)
        rates = {"labeled": median_rate(labeled, args.samples), "unlabeled": median_rate(unlabeled, args.samples),
                 "unlabeled+strong": median_rate(strong, args.samples)}
    print(f"data loading, one process, cv2/torch threads 1, crop {args.crop}, {args.samples} samples")
    print(f"{'view':<16} {'samples/s':>10} {'reference':>10} {'speed-up':>9}")
    for view, rate in rates.items():
        reference = REFERENCE_RATES.get(view)  # the reference has no strong view
        if reference is None:
            print(f"{view:<16} {rate:>10.1f} {'-':>10} {'-':>9}")
        else:
            print(f"{view:<16} {rate:>10.1f} {reference:>10.1f} {rate / reference:>8.2f}x")


if __name__ == "__main__":
    main()
