"""Class colour palettes and 8-bit palette PNG encoding.

The VOC palette is the bit-interleaving scheme the Pascal VOC devkit uses for its masks (class 255,
the ignore label, is light cream (224, 224, 192) as in the VOC files). Palette PNGs are written
with zlib directly because OpenCV cannot write indexed PNGs.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

from allspark_cli.constants import IGNORE_INDEX

PALETTE_SIZE = 256
VOC_IGNORE_COLOR = (224, 224, 192)

# Official Cityscapes colours of the 19 train ids (road .. bicycle).
CITYSCAPES_COLORS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)


def voc_palette(num_colors: int = PALETTE_SIZE) -> np.ndarray:
    """(num_colors, 3) uint8 RGB: the Pascal VOC colour map (class 255 set to the VOC ignore colour)."""
    palette = np.zeros((PALETTE_SIZE, 3), dtype=np.uint8)
    for index in range(PALETTE_SIZE):
        value, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (r, g, b)
    palette[IGNORE_INDEX] = VOC_IGNORE_COLOR
    return palette[:num_colors]


def cityscapes_palette() -> np.ndarray:
    """(19, 3) uint8 RGB: the official Cityscapes train-id colours."""
    return np.array(CITYSCAPES_COLORS, dtype=np.uint8)


def full_palette(colors: np.ndarray | list) -> np.ndarray:
    """Pads a (K, 3) class palette to 256 entries: unnamed ids get VOC colours, 255 the ignore colour."""
    colors = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    palette = voc_palette()
    palette[: len(colors)] = colors[:PALETTE_SIZE]
    palette[IGNORE_INDEX] = VOC_IGNORE_COLOR
    return palette


def colorize(mask: np.ndarray, colors: np.ndarray | list) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 RGB with the class palette (ignore -> ignore colour)."""
    return full_palette(colors)[mask]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_palette_png(mask: np.ndarray, colors: np.ndarray | list) -> bytes:
    """8-bit indexed PNG bytes of a (H, W) uint8 mask with the given class colours."""
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"palette PNGs take a (H, W) uint8 mask, got {mask.shape} {mask.dtype}")
    height, width = mask.shape
    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)  # 8-bit, colour type 3 (indexed)
    rows = np.concatenate([np.zeros((height, 1), dtype=np.uint8), mask], axis=1)  # filter byte 0 per row
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"PLTE", full_palette(colors).tobytes()),
            _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)),
            _png_chunk(b"IEND", b""),
        )
    )
