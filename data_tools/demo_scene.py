"""What every procedural family of the demo provides (data_tools/demo.py builds any of them)."""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

# Mixed into each sample's seed: train and val images of one index never share a random stream.
SPLIT_CODES = {"train": 0, "val": 1}

# (seed, split, index, (min side, max side)) -> (image (H, W, 3) uint8 RGB, mask (H, W) uint8 class ids)
RenderFn = Callable[[int, str, int, tuple[int, int]], tuple[np.ndarray, np.ndarray]]


class SceneFamily(NamedTuple):
    """One procedural dataset family: its classes (0 = background), palette and sample renderer.
    `version` is bumped when the renderer changes, so an old folder is not mixed with new images."""

    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    render: RenderFn
    version: int
