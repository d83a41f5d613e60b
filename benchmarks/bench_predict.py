"""Prediction and evaluation throughput: images/s of MiT-B0 at 512 x 512, batched vs one at a time.

Measures (random weights; speed does not depend on them):
- `Predictor.predict_arrays` with batch size 1 and with `--batch-size` (whole-image mode), the
  masks checked equal between the two;
- `evaluate_dataset` on an in-memory split of the same images (whole-image mode), batch 1 and batched;
- optionally the sliding window (`--slide`) on one 1024 x 2048 image with a 512 window.
Run: `python benchmarks/bench_predict.py [--images 8] [--batch-size 4] [--threads 2] [--device cpu]`.
Prints one JSON object per measurement.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch.utils.data import Dataset

from allspark_cli.data.transforms import normalize
from allspark_cli.engine.inference.evaluate import evaluate_dataset
from allspark_cli.engine.inference.inference import segment
from allspark_cli.engine.inference.predict import Predictor
from allspark_cli.model.config import ModelConfig, build_model, tokens_for_crop

SIZE = 512
NUM_CLASSES = 21
HEAD_DIM = 256  # SegFormer-B0's decoder width
TRAIN_CROP = 513
SLIDE_IMAGE = (1024, 2048)


class InMemorySplit(Dataset):
    """Pre-normalised images and random masks, so the loop measures the model, not JPEG decoding."""

    def __init__(self, images: list[np.ndarray]) -> None:
        rng = np.random.default_rng(0)
        self.samples = [
            (normalize(image), torch.from_numpy(rng.integers(0, NUM_CLASSES, image.shape[:2]).astype(np.int64)), f"{i}")
            for i, image in enumerate(images)
        ]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        return self.samples[index]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _report(name: str, images: int, seconds: float, **extra) -> None:
    print(json.dumps({"measure": name, "images": images, "seconds": round(seconds, 3),
                      "images_per_s": round(images / seconds, 3), **extra}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--slide", action="store_true", help="also time the sliding window on a 1024 x 2048 image")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = ModelConfig(backbone="b0", method="allspark", num_classes=NUM_CLASSES, head_dim=HEAD_DIM,
                         memory_tokens=tokens_for_crop(TRAIN_CROP))
    model = build_model(config).to(device).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(args.images)]
    common = {"device": str(device), "threads": args.threads, "size": SIZE}

    Predictor(model, device=device).predict_arrays(images[:1])  # warm-up (allocator, kernels)
    masks = {}
    for batch_size in (1, args.batch_size):
        predictor = Predictor(model, device=device, mode="whole", batch_size=batch_size)
        _sync(device)
        start = time.perf_counter()
        masks[batch_size] = predictor.predict_arrays(images)
        _sync(device)
        _report("predict", len(images), time.perf_counter() - start, batch_size=batch_size, **common)
    # Kernels may round differently per batch size; count the pixels whose argmax that flips.
    differing = sum(int((a != b).sum()) for a, b in zip(masks[1], masks[args.batch_size]))
    print(json.dumps({"measure": "predict_batched_vs_single", "differing_pixels": differing,
                      "pixels": len(images) * SIZE * SIZE}))

    split = InMemorySplit(images)
    for batch_size in (1, args.batch_size):
        result = evaluate_dataset(model, split, batch_size=batch_size, device=device, num_classes=NUM_CLASSES)
        _report("evaluate", result.num_images, result.seconds, batch_size=batch_size, miou=round(result.metrics.miou, 4),
                **common)

    if args.slide:
        image = normalize(rng.integers(0, 256, (*SLIDE_IMAGE, 3), dtype=np.uint8))[None].to(device)
        _sync(device)
        start = time.perf_counter()
        segment(model, image, mode="slide", crop=SIZE)
        _sync(device)
        _report("slide_1024x2048_window512", 1, time.perf_counter() - start, **common)


if __name__ == "__main__":
    main()
