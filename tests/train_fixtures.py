"""Tiny datasets and settings for the training tests (built in tmp_path; no data_tools needed).

The dataset: 64x64 images of noise with a bright square (class 1) and/or disc (class 2) on a
background (class 0), palette-PNG masks, split lists and a dataset.yaml written with the data
developer's write_manifest. Split "half": 4 labeled + 4 unlabeled; "full": all 8 labeled.
"""
from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from allspark_cli.data.manifest import DatasetManifest, TrainSplit, write_manifest
from allspark_cli.fileio import write_png

# One thread: the suite shares 2 cores with other jobs, where OpenMP threads stall each other.
torch.set_num_threads(1)

CLASSES = ["background", "square", "disc"]
PALETTE = [(0, 0, 0), (200, 40, 40), (40, 200, 40)]
SIZE = 64
TINY_CROP = 64


def _sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    image = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), dtype=np.uint8)
    x, y = rng.integers(4, size // 2, 2)
    side = int(rng.integers(10, size // 3))
    image[y:y + side, x:x + side] = (220, 220, 60)
    mask[y:y + side, x:x + side] = 1
    center = (int(rng.integers(size // 2, size - 10)), int(rng.integers(size // 2, size - 10)))
    cv2.circle(image, center, 8, (60, 220, 220), -1)
    cv2.circle(mask, center, 8, 2, -1)
    return image, mask


def make_dataset(root: Path, *, num_train: int = 8, num_val: int = 3, seed: int = 0, name: str = "tiny") -> Path:
    """Writes the tiny dataset under `root`; returns the path of its dataset.yaml."""
    rng = np.random.default_rng(seed)
    lines: dict[str, list[str]] = {"train": [], "val": []}
    for split, count in (("train", num_train), ("val", num_val)):
        for index in range(count):
            image, mask = _sample(rng, SIZE)
            image_rel, mask_rel = f"images/{split}_{index}.png", f"masks/{split}_{index}.png"
            write_png(root / image_rel, image)
            write_png(root / mask_rel, mask, np.array(PALETTE, dtype=np.uint8))
            lines[split].append(f"{image_rel} {mask_rel}")
    half = num_train // 2
    files = {"splits/half/labeled.txt": lines["train"][:half], "splits/half/unlabeled.txt": lines["train"][half:],
             "splits/full/labeled.txt": lines["train"], "splits/val.txt": lines["val"]}
    for relpath, content in files.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_text("\n".join(content) + "\n")
    manifest = DatasetManifest(
        name=name, root=root, classes=CLASSES, palette=PALETTE,
        train_splits={"half": TrainSplit(labeled="splits/half/labeled.txt", unlabeled="splits/half/unlabeled.txt"),
                      "full": TrainSplit(labeled="splits/full/labeled.txt", unlabeled=None)},
        eval_splits={"val": "splits/val.txt"}, eval_mode="whole", train_crop=TINY_CROP,
    )
    path = root / "dataset.yaml"
    write_manifest(manifest, path)
    return path


def tiny_layer(manifest: Path, run_root: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A complete settings layer for a 1-2 iteration CPU run (MiT-B0, E = 32, crop 64)."""
    layer: dict[str, Any] = {
        "preset": "tiny",
        "data": {"manifest": str(manifest), "split": "half", "crop": TINY_CROP, "workers": 0},
        "model": {"backbone": "b0", "method": "allspark", "head_dim": 32, "pretrained": None},
        "optim": {"lr": 0.01},
        "train": {"epochs": 1, "batch_size": 2, "warmup_epochs": 0, "device": "cpu", "log_every": 1, "seed": 0},
        "eval": {"mosaic_images": 1},
        "run": {"root": str(run_root)},
    }
    for section, values in sections.items():
        layer[section] = {**layer.get(section, {}), **values}
    return layer


def stop_training_at(monkeypatch, iteration: int, stop: signal.Signals = signal.SIGTERM) -> None:
    """Sends this process `stop` during the training step of `iteration` (0-based), as a scheduler
    (SIGTERM) or Ctrl-C (SIGINT) would: the run saves last.pt and raises Interrupted."""
    from allspark_cli.engine.training import epoch as epoch_module

    real_step = epoch_module.train_step

    def step(*args, **kwargs):
        if kwargs["iteration"] == iteration:
            os.kill(os.getpid(), stop)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(epoch_module, "train_step", step)


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on (for a DDP rendezvous in a test)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
