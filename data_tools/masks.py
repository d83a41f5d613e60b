"""The per-sample checks and writes of the dataset builders: an image decodes, a mask covers it
and holds class values only, a class map is written as PNG, an output is already complete.

Every check raises DataError naming the file and the rule it breaks; the builders' conversion
tasks (`common.convert_all`) are made of these.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from allspark_cli.errors import DataError
from allspark_cli.fileio import encode_png
from data_tools.common import MAX_REPORTED_ERRORS, write_output

# JPEGs are verified at 1/8 scale: the decoder still walks the whole entropy-coded stream (so a
# truncated or corrupt file fails) but skips the inverse DCT of full-size blocks.
JPEG_DRAFT_SCALE = 8


def is_complete(path: Path) -> bool:
    """An output exists under its final name; atomic writes guarantee it is whole."""
    return path.is_file() and path.stat().st_size > 0


def verify_image(path: Path) -> tuple[int, int]:
    """(height, width) of an image after decoding it completely; DataError naming the file otherwise.

    Catches missing files, non-images, corrupt and truncated files (Pillow refuses a JPEG or PNG
    cut short).
    """
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.format == "JPEG":
                image.draft("RGB", (max(1, width // JPEG_DRAFT_SCALE), max(1, height // JPEG_DRAFT_SCALE)))
            image.load()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DataError(f"image is corrupt or unreadable ({error}): {path}") from None
    return height, width


def check_same_size(mask_shape: tuple[int, ...], image_size: tuple[int, int], mask_path: Path, image_path: Path) -> None:
    """DataError when a (H, W) mask does not cover its image pixel for pixel."""
    if tuple(mask_shape[:2]) != tuple(image_size):
        raise DataError(
            f"mask size {mask_shape[1]}x{mask_shape[0]} differs from its image {image_path.name} "
            f"({image_size[1]}x{image_size[0]}): {mask_path}"
        )


def check_values(mask: np.ndarray, allowed_max: int, ignore_index: int, path: Path) -> None:
    """DataError when a mask holds values other than 0..allowed_max and `ignore_index`."""
    values = np.unique(mask)
    bad = values[(values > allowed_max) & (values != ignore_index)]
    if bad.size:
        raise DataError(
            f"mask values {bad.tolist()[:MAX_REPORTED_ERRORS]} are outside the classes "
            f"(0..{allowed_max} or {ignore_index} ignore): {path}"
        )


def write_mask(path: Path, mask: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Writes a (H, W) uint8 class map as PNG (a palette PNG with `palette`), see `write_output`."""
    write_output(path, encode_png(mask, palette))
