"""Masks as colour pictures, with the datasets' class palettes (allspark_cli/labels.py)."""
from __future__ import annotations

import numpy as np

from allspark_cli.labels import full_palette


def colorize(mask: np.ndarray, colors: np.ndarray | list) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 RGB with the class palette (ignore -> ignore colour)."""
    return full_palette(colors)[mask]
