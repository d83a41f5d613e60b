"""What `eval` and `predict` share: the checkpoint opened for inference with its names, palette and
saved recipe, the check of an output folder, and the progress callback's type.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from allspark_cli.engine.inference.protocol import SavedRecipe
from allspark_cli.errors import SettingsError, WriteError
from allspark_cli.labels import default_class_names, voc_palette


class InferenceCheckpoint(NamedTuple):
    """What eval and predict need from a checkpoint: the eval-mode model and its metadata."""

    model: nn.Module
    class_names: list[str]
    palette: np.ndarray  # (K, 3) uint8 RGB
    saved: SavedRecipe  # what its training settings say about inference
    source: str


def load_inference_checkpoint(path: str | os.PathLike, device: torch.device) -> InferenceCheckpoint:
    """Reads a checkpoint of this toolkit or of the reference code for eval/predict.

    DataError (exit 3) when the file is missing or is not a checkpoint. Reference checkpoints carry
    no names or palette: the benchmark names matching K (21 VOC, 19 Cityscapes, 81 COCO, else
    class_<i>) and the VOC palette are used.
    """
    from allspark_cli.model.checkpoint import load_for_inference

    checkpoint, model = load_for_inference(path, device)
    num_classes = checkpoint.model_config.num_classes
    names = list(checkpoint.class_names or default_class_names(num_classes))
    palette = voc_palette(num_classes)
    if checkpoint.palette:
        palette = np.asarray(checkpoint.palette, dtype=np.uint8).reshape(-1, 3)
    if len(palette) < num_classes:
        palette = np.concatenate([palette, voc_palette(num_classes)[len(palette):]])
    return InferenceCheckpoint(model.eval(), names, palette, SavedRecipe.from_settings(checkpoint.settings), checkpoint.source)


ProgressCallback = Callable[[int, int], None]


def check_out_dir(out_dir: Path) -> None:
    """Checked before any work, so that a long evaluation is not lost to its last step: SettingsError
    when the output folder, or a folder above it, exists as a file; WriteError (exit 6) when the
    nearest existing folder of its path cannot be written (permissions, a read-only file system).
    Nothing is left behind: the probe is an anonymous temporary file."""
    for parent in (out_dir, *out_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise SettingsError(f"output folder {out_dir}: {parent} exists and is a file")
    existing = next(parent for parent in (out_dir, *out_dir.parents) if parent.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        cause = error.strerror or type(error).__name__
        raise WriteError(f"output folder {out_dir} cannot be written ({existing}: {cause}); "
                         "choose another with --out") from None
