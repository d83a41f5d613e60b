"""Training augmentation and normalisation (DESIGN.md section 3, "Augmentation").

Every unit maps `(image, mask, rng) -> (image, mask)` on numpy arrays: image (H, W, 3) uint8 RGB,
mask (H, W) uint8. Geometric units move image and mask together (bilinear/area for the image,
nearest for the mask, so no new class ids appear); photometric units touch the image only.
The random generator is passed in, so one sample's augmentation depends only on the generator
the dataset seeds with `(seed, epoch, index)`.

For unlabeled images the "mask" is the padding marker: it starts as UNLABELED_VALID everywhere
and the pad unit writes UNLABELED_PADDING into the padded area, so the pseudo-label loss can
ignore pixels that were never part of the photo.

Speed (benchmarks/bench_data.py): OpenCV on uint8 throughout; colour ops run after the crop, on
lookup tables where the op is per-value; no float64 anywhere.
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from allspark_cli.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

# Recipe of the reference configs (DESIGN.md section 3).
SCALE_RANGE = (0.5, 2.0)
FLIP_PROBABILITY = 0.5
JITTER_PROBABILITY = 0.8
JITTER_BRIGHTNESS = 0.5
JITTER_CONTRAST = 0.5
JITTER_SATURATION = 0.5
JITTER_HUE = 0.25
GRAYSCALE_PROBABILITY = 0.2
BLUR_PROBABILITY = 0.5
BLUR_SIGMA_RANGE = (0.1, 2.0)
# CutMix box of the weak-to-strong recipe's strong view (UniMatch's published values): drawn with
# this probability, its area a uniform share of the crop, its aspect ratio (h / w) uniform in the range.
CUTMIX_PROBABILITY = 0.5
CUTMIX_AREA_RANGE = (0.02, 0.4)
CUTMIX_ASPECT_RANGE = (0.3, 1 / 0.3)
# Images are padded with black (0 before normalisation), as the reference does.
IMAGE_PAD_VALUE = 0
# Values of the unlabeled padding marker.
UNLABELED_VALID = 0
UNLABELED_PADDING = IGNORE_INDEX

_LEVELS = np.arange(256, dtype=np.float32)
# OpenCV's *_FULL HSV conversion maps hue to the whole 0..255 byte range.
_HUE_LEVELS = 256
_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
_STD = np.array(IMAGENET_STD, dtype=np.float32)
_UINT8_MAX = 255.0


class RandomRescale:
    """Resizes so the long side becomes a random integer in [low, high] x the current long side."""

    def __init__(self, scale_range: tuple[float, float] = SCALE_RANGE) -> None:
        self.scale_range = scale_range

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        height, width = mask.shape
        long_side = max(height, width)
        low, high = self.scale_range
        new_long = int(rng.integers(int(long_side * low), int(long_side * high) + 1))
        scale = new_long / long_side
        new_size = (max(1, round(width * scale)), max(1, round(height * scale)))  # cv2 wants (w, h)
        # Area interpolation when shrinking avoids the aliasing of plain bilinear sampling
        # (Pillow's bilinear, used by the reference, also filters when shrinking).
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        image = cv2.resize(image, new_size, interpolation=interpolation)
        # NEAREST_EXACT samples pixel centres like Pillow; masks must never be interpolated.
        mask = cv2.resize(mask, new_size, interpolation=cv2.INTER_NEAREST_EXACT)
        return image, mask


class PadToSize:
    """Pads bottom/right up to (size, size): image with IMAGE_PAD_VALUE, mask with `mask_fill`.

    `mask_fill` is IGNORE_INDEX for labeled masks and UNLABELED_PADDING for the unlabeled marker.
    """

    def __init__(self, size: int, *, mask_fill: int) -> None:
        self.size = size
        self.mask_fill = mask_fill

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        height, width = mask.shape
        pad_h, pad_w = max(0, self.size - height), max(0, self.size - width)
        if pad_h or pad_w:
            image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(IMAGE_PAD_VALUE,) * 3)
            mask = cv2.copyMakeBorder(mask, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=self.mask_fill)
        return image, mask


class RandomCrop:
    """Cuts a (size, size) window at a uniformly random position (input at least that large)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        height, width = mask.shape
        top = int(rng.integers(0, height - self.size + 1))
        left = int(rng.integers(0, width - self.size + 1))
        window = (slice(top, top + self.size), slice(left, left + self.size))
        return image[window], mask[window]


class RandomHorizontalFlip:
    """Mirrors image and mask left-right together with probability `p`."""

    def __init__(self, p: float = FLIP_PROBABILITY) -> None:
        self.p = p

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if rng.random() < self.p:
            return cv2.flip(image, 1), cv2.flip(mask, 1)
        return image, mask


def _apply_lut(image: np.ndarray, levels: np.ndarray) -> np.ndarray:
    return cv2.LUT(image, np.clip(np.rint(levels), 0, _UINT8_MAX).astype(np.uint8))


def _grey(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    return _apply_lut(image, _LEVELS * factor)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Blends with the mean grey level, as torchvision's contrast adjustment does."""
    mean = float(_grey(image).mean())
    return _apply_lut(image, _LEVELS * factor + mean * (1 - factor))


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """Blends with the grey version of the image (factor 0 = grey, 1 = unchanged)."""
    grey = cv2.cvtColor(_grey(image), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(image, factor, grey, 1 - factor, 0.0)


def adjust_hue(image: np.ndarray, shift: float) -> np.ndarray:
    """Rotates the hue by `shift` turns (-0.5..0.5) in HSV space."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)
    offset = round(shift * _HUE_LEVELS)
    hue_lut = ((np.arange(_HUE_LEVELS) + offset) % _HUE_LEVELS).astype(np.uint8)
    hsv[..., 0] = cv2.LUT(hsv[..., 0], hue_lut)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


class ColorJitter:
    """With probability `p`, brightness/contrast/saturation/hue changes in a random order.

    Factors are uniform in [1 - x, 1 + x] (hue shift uniform in [-hue, hue]), as torchvision's
    ColorJitter draws them.
    """

    def __init__(
        self,
        *,
        brightness: float = JITTER_BRIGHTNESS,
        contrast: float = JITTER_CONTRAST,
        saturation: float = JITTER_SATURATION,
        hue: float = JITTER_HUE,
        p: float = JITTER_PROBABILITY,
    ) -> None:
        self.brightness, self.contrast, self.saturation, self.hue, self.p = brightness, contrast, saturation, hue, p

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if rng.random() >= self.p:
            return image, mask
        ops = (
            (adjust_brightness, rng.uniform(1 - self.brightness, 1 + self.brightness)),
            (adjust_contrast, rng.uniform(1 - self.contrast, 1 + self.contrast)),
            (adjust_saturation, rng.uniform(1 - self.saturation, 1 + self.saturation)),
            (adjust_hue, rng.uniform(-self.hue, self.hue)),
        )
        for position in rng.permutation(len(ops)):
            op, factor = ops[position]
            image = op(image, float(factor))
        return image, mask


class RandomGrayscale:
    """With probability `p`, replaces the image by its grey version (still 3 channels)."""

    def __init__(self, p: float = GRAYSCALE_PROBABILITY) -> None:
        self.p = p

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if rng.random() < self.p:
            image = cv2.cvtColor(_grey(image), cv2.COLOR_GRAY2RGB)
        return image, mask


class RandomGaussianBlur:
    """With probability `p`, blurs the image with a Gaussian of sigma uniform in `sigma_range`."""

    def __init__(self, p: float = BLUR_PROBABILITY, sigma_range: tuple[float, float] = BLUR_SIGMA_RANGE) -> None:
        self.p = p
        self.sigma_range = sigma_range

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if rng.random() < self.p:
            sigma = float(rng.uniform(*self.sigma_range))
            # Kernel size (0, 0): OpenCV derives it from sigma (about 3 sigma on each side).
            image = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma)
        return image, mask


class Compose:
    """Applies units in order with the same generator."""

    def __init__(self, units: Sequence) -> None:
        self.units = list(units)

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        for unit in self.units:
            image, mask = unit(image, mask, rng)
        return image, mask


def geometric_units(crop: int, *, mask_fill: int) -> list:
    """Rescale, pad (mask with `mask_fill`), random crop, flip: the part shared by both views."""
    return [RandomRescale(), PadToSize(crop, mask_fill=mask_fill), RandomCrop(crop), RandomHorizontalFlip()]


def photometric_units() -> list:
    """Colour jitter, grayscale, blur: the labeled view's photometric part, and the strong view's."""
    return [ColorJitter(), RandomGrayscale(), RandomGaussianBlur()]


def labeled_transform(*, crop: int, ignore_index: int = IGNORE_INDEX) -> Compose:
    """Full recipe for labeled images: geometry, then colour jitter, grayscale and blur."""
    return Compose([*geometric_units(crop, mask_fill=ignore_index), *photometric_units()])


def strong_photometric_transform() -> Compose:
    """The strong view of an unlabeled crop (weak-to-strong recipe): the photometric units drawn
    again, on the weak view's pixels; the geometry is the weak view's."""
    return Compose(photometric_units())


def cutmix_box(size: int, rng: np.random.Generator, probability: float = CUTMIX_PROBABILITY) -> np.ndarray:
    """(size, size) uint8: 1 inside a random box (where the strong view takes its partner's pixels),
    drawn with `probability`, else all 0. Area and aspect ratio as CUTMIX_*; the ratio is drawn again
    until the box fits, then its corner is uniform over the positions where it fits. The coin is
    drawn whatever the probability, so the draws after it do not depend on it."""
    box = np.zeros((size, size), dtype=np.uint8)
    if rng.random() >= probability:
        return box
    area = rng.uniform(*CUTMIX_AREA_RANGE) * size * size
    while True:
        ratio = rng.uniform(*CUTMIX_ASPECT_RANGE)
        width, height = int(np.sqrt(area / ratio)), int(np.sqrt(area * ratio))
        if width <= size and height <= size:
            break
    top = int(rng.integers(0, size - height + 1))
    left = int(rng.integers(0, size - width + 1))
    box[top:top + height, left:left + width] = 1
    return box


def unlabeled_transform(*, crop: int) -> Compose:
    """Geometry only; the mask argument is the padding marker (UNLABELED_VALID at the start)."""
    return Compose(geometric_units(crop, mask_fill=UNLABELED_PADDING))


def normalize(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 tensor, (x / 255 - ImageNet mean) / ImageNet std."""
    # Transpose while still one byte per value, then one fused multiply-add in float32.
    chw = np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32)
    scale = (1.0 / (_UINT8_MAX * _STD)).astype(np.float32)[:, None, None]
    offset = (-_MEAN / _STD).astype(np.float32)[:, None, None]
    chw *= scale
    chw += offset
    return torch.from_numpy(chw)


def mask_to_tensor(mask: np.ndarray) -> torch.Tensor:
    """(H, W) uint8 -> (H, W) int64 tensor (the dtype cross-entropy expects)."""
    return torch.from_numpy(mask.astype(np.int64))
