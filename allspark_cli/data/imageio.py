"""Reading images and masks for training, evaluation and checks.

Images are decoded with OpenCV (fast JPEG/PNG decoding) and returned as RGB. Masks are read with
Pillow, because OpenCV expands 8-bit palette PNGs (VOC's SegmentationClass format) to BGR colours
instead of returning the class indices. Every failure is a DataError naming the file.

EXIF orientation (the Orientation tag of phone and camera JPEGs: the stored pixels are turned
or mirrored when displayed) is applied only when asked (`exif_orientation=True`): `predict`
always (its masks match the image as displayed), training and evaluation when the dataset's
manifest says so (`prepare custom` datasets, whose masks are drawn on the displayed image). The
benchmarks' masks were drawn on the stored pixels and the reference pipeline (Pillow) reads them
so, so for them the tag is ignored: honouring it would turn image and mask against each other.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from allspark_cli.errors import DataError

# OpenCV applies the EXIF Orientation tag unless told to ignore it (the same turn as Pillow's
# ImageOps.exif_transpose; tests/test_exif_orientation.py checks all eight values).
_STORED_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
_DISPLAYED_FLAGS = cv2.IMREAD_COLOR
EXIF_ORIENTATION_TAG = 0x0112
UPRIGHT = 1  # the Orientation value (and the default when there is none) of pixels shown as stored
# Orientations 5..8 turn the image by a quarter: the displayed width is the stored height.
QUARTER_TURNS = frozenset({5, 6, 7, 8})
_JPEG_START = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"
# Some writers append padding or metadata after the end-of-image marker; look for it near the end.
_JPEG_END_SEARCH_BYTES = 1024
# Pillow modes that hold one class id per pixel (palette, 8-bit grey, 1-bit, 16/32-bit grey).
_SINGLE_CHANNEL_MODES = frozenset({"P", "L", "1", "I", "I;16", "I;16B", "I;16L"})
_MAX_MASK_VALUE = 255


def _read_bytes(path: Path, kind: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{kind} not found: {path}") from None
    except OSError as error:
        raise DataError(f"cannot read {kind} {path}: {error.strerror or error}") from None


def read_image(path: str | os.PathLike, *, exif_orientation: bool = False) -> np.ndarray:
    """Decodes an image file to RGB uint8 of shape (H, W, 3); with `exif_orientation` as displayed
    (the EXIF Orientation tag applied), else as stored.

    Grey and RGBA images are converted to 3 channels. Raises DataError naming the file when it is
    missing, not a decodable image, or a JPEG cut short (OpenCV would silently return grey rows).
    """
    path = Path(path)
    data = _read_bytes(path, "image")
    if data.startswith(_JPEG_START) and _JPEG_END not in data[-_JPEG_END_SEARCH_BYTES:]:
        raise DataError(f"image is truncated (JPEG without end marker): {path}")
    flags = _DISPLAYED_FLAGS if exif_orientation else _STORED_FLAGS
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if bgr is None:
        raise DataError(f"image cannot be decoded (corrupt or unsupported format): {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Reads a class-id mask to uint8 of shape (H, W).

    Accepts palette PNGs (the indices are the class ids), 8-bit grey PNGs, and 16-bit grey images
    whose values fit in 0..255. Refuses colour (RGB/RGBA) masks, corrupt or truncated files with a
    DataError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"mask not found: {path}")
    try:
        with Image.open(path) as image:
            if image.mode not in _SINGLE_CHANNEL_MODES:
                raise DataError(
                    f"mask must be single-channel class ids (palette or grey PNG), got mode {image.mode}: {path}"
                )
            mask = np.array(image)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DataError(f"mask cannot be decoded ({error}): {path}") from None
    if mask.dtype == np.bool_:
        return mask.astype(np.uint8)
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > _MAX_MASK_VALUE):
            raise DataError(f"mask values must be 0..255, found {mask.min()}..{mask.max()}: {path}")
        mask = mask.astype(np.uint8)
    return mask


def read_size(path: str | os.PathLike, kind: str = "image", *, exif_orientation: bool = False) -> tuple[int, int, str]:
    """(width, height, Pillow mode) from the file header only, without decoding the pixels; with
    `exif_orientation` the displayed size (width and height swapped for a quarter turn)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{kind} not found: {path}")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if exif_orientation and _orientation(image) in QUARTER_TURNS:
                width, height = height, width
            return width, height, image.mode
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DataError(f"{kind} cannot be decoded ({error}): {path}") from None


def _orientation(image: Image.Image) -> int:
    return int(image.getexif().get(EXIF_ORIENTATION_TAG, UPRIGHT) or UPRIGHT)


def read_orientation(path: str | os.PathLike) -> int:
    """The EXIF Orientation tag of an image file (1..8; 1 when it has none), from its header."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            return _orientation(image)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DataError(f"image cannot be decoded ({error}): {path}") from None
