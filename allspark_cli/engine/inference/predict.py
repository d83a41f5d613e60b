"""Prediction: the `Predictor` Python API (folders of files: engine/inference/predict_folder.py).

Masks come out at the image's original size, one class id per pixel (uint8). Batching never
changes a mask: images are grouped by size and each group runs as one tensor (no padding); the
model is per-image exact.

Inference mode when none is asked for: the checkpoint's evaluation mode when it was trained with a
sliding window (cityscapes), else per image: sliding window of the checkpoint's crop when the
image's longer side exceeds AUTO_SLIDE_FACTOR x crop, whole image otherwise. The model was trained
on crops, so a very large photo (e.g. 4000 px with a 513 crop) is better read window by window,
and its whole-image forward would need many times the memory.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from allspark_cli.data.imageio import read_image
from allspark_cli.data.transforms import normalize
from allspark_cli.engine.distributed import resolve_device
from allspark_cli.engine.inference.inference import default_stride, segment
from allspark_cli.engine.inference.protocol import SavedRecipe
from allspark_cli.engine.inference.shared import (
    InferenceCheckpoint,
    load_inference_checkpoint,
)
from allspark_cli.engine.precision import autocast_factory, check_amp
from allspark_cli.engine.settings import AmpMode
from allspark_cli.errors import DataError, SettingsError
from allspark_cli.labels import default_class_names, voc_palette

PredictMode = Literal["whole", "slide"]




# Whole-image inference up to this multiple of the training crop (longer side), windows beyond.
AUTO_SLIDE_FACTOR = 2


# Prediction places every sliding window at full crop size (the last one moved back to the border):
# arbitrary photos would otherwise end in thin clipped windows with little context. Evaluation
# keeps the reference's clipped windows (engine.inference), which the published numbers use.
PREDICT_PLACEMENT = "shift"


# The stride-32 MiT cannot process an image side shorter than this (one floor for every backbone).
MIN_IMAGE_SIDE = 32


# A mask stores class ids in one byte.
MAX_MASK_CLASSES = 256


CLASS_DIM = 1


RGB_CHANNELS = 3


RGBA_CHANNELS = 4


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA uint8 -> (H, W, 3) uint8 RGB."""
    if image.dtype != np.uint8:
        raise DataError(f"images must be uint8 arrays, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], RGB_CHANNELS, axis=2)
    if image.ndim == 3 and image.shape[2] in (RGB_CHANNELS, RGBA_CHANNELS):
        return np.ascontiguousarray(image[:, :, :RGB_CHANNELS])
    raise DataError(f"images must be (H, W), (H, W, 3) or (H, W, 4) arrays, got shape {image.shape}")


def check_image_size(image: np.ndarray, name: str = "image") -> None:
    """DataError for an image with a side shorter than MIN_IMAGE_SIDE (the backbone needs it)."""
    height, width = image.shape[:2]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise DataError(f"{name} is {width}x{height}; images need at least {MIN_IMAGE_SIDE} pixels per side")


class Predictor:
    """Segments images with a checkpoint (or an eval-mode model) into (H, W) uint8 class-id masks.

    `Predictor("best.pt").predict(["a.jpg", rgb_array])` -> [mask_a, mask_b]. Arrays are RGB uint8.
    mode: "whole", "slide", or None (automatic, see the module docstring). crop/stride: sliding
    window size (default: the checkpoint's crop) and step (default floor(2/3 crop)).
    tta: average with the horizontally flipped image. batch_size: images per forward (equal sizes).
    amp: autocast dtype of the forward ("off", "bf16", "fp16"; fp16 needs CUDA).
    """

    def __init__(
        self,
        checkpoint_or_model: str | os.PathLike | nn.Module,
        *,
        device: str | torch.device = "auto",
        mode: PredictMode | None = None,
        crop: int | None = None,
        stride: int | None = None,
        tta: bool = False,
        batch_size: int = 1,
        class_names: Sequence[str] | None = None,
        palette: np.ndarray | Sequence | None = None,
        amp: AmpMode = "off",
    ) -> None:
        if batch_size < 1:
            raise SettingsError(f"batch size must be >= 1, got {batch_size}")
        self.device = device if isinstance(device, torch.device) else resolve_device(str(device))
        check_amp(amp, self.device)
        self.autocast = autocast_factory(amp, self.device)
        if isinstance(checkpoint_or_model, nn.Module):
            model = checkpoint_or_model.to(self.device).eval()
            num_classes = getattr(getattr(model, "config", None), "num_classes", None)
            loaded = InferenceCheckpoint(model, default_class_names(num_classes or 0), voc_palette(), SavedRecipe(), "model")
        else:
            loaded = load_inference_checkpoint(checkpoint_or_model, self.device)
        self.model = loaded.model
        self.saved = loaded.saved
        self.class_names = list(class_names) if class_names is not None else loaded.class_names
        self.palette = np.asarray(palette if palette is not None else loaded.palette, dtype=np.uint8).reshape(-1, 3)
        if len(self.class_names) > MAX_MASK_CLASSES:
            raise SettingsError(
                f"{len(self.class_names)} classes do not fit in 8-bit masks (at most {MAX_MASK_CLASSES})"
            )
        self.mode = mode
        self.crop = crop or self.saved.window
        self.stride = stride or default_stride(self.crop)
        if self.stride > self.crop:
            raise SettingsError(
                f"--stride {self.stride} is larger than the window (--crop {self.crop}): pixels would be skipped"
            )
        self.tta = tta
        self.batch_size = batch_size

    def mode_for(self, height: int, width: int) -> PredictMode:
        """The inference mode used for an image of this size."""
        if self.mode is not None:
            return self.mode
        trained_with_slide = self.saved.eval_mode == "slide"
        if trained_with_slide or max(height, width) > AUTO_SLIDE_FACTOR * self.crop:
            return "slide"
        return "whole"

    def predict(self, images: Sequence[np.ndarray | str | os.PathLike]) -> list[np.ndarray]:
        """(H, W) uint8 class-id masks at each input's size, in input order (paths are read as RGB, as
        displayed: the EXIF Orientation tag applied)."""
        arrays = [to_rgb(item) if isinstance(item, np.ndarray) else read_image(item, exif_orientation=True) for item in images]
        return self.predict_arrays(arrays)

    def predict_arrays(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Like `predict` for (H, W, 3) uint8 RGB arrays; equal sizes are batched together."""
        masks: list[np.ndarray | None] = [None] * len(images)
        for indices, batch_masks in self.predict_batches(images):
            for index, mask in zip(indices, batch_masks):
                masks[index] = mask
        return masks  # type: ignore[return-value]

    @torch.no_grad()
    def predict_batches(self, images: Sequence[np.ndarray]) -> Iterator[tuple[list[int], list[np.ndarray]]]:
        """The masks of `images` one batch at a time, as (positions in `images`, their masks): images
        of equal size are batched together, so a caller can stop or write between two batches."""
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            check_image_size(image)
            groups.setdefault(image.shape[:2], []).append(index)
        for (height, width), indices in groups.items():
            mode = self.mode_for(height, width)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch = torch.stack([normalize(images[i]) for i in chunk]).to(self.device)
                with self.autocast():
                    scores = segment(
                        self.model, batch, mode=mode, crop=self.crop, stride=self.stride, tta=self.tta,
                        placement=PREDICT_PLACEMENT,
                    )
                labels = scores.argmax(dim=CLASS_DIM).to(torch.uint8).cpu().numpy()
                yield chunk, list(labels)
