"""Constants shared by the data pipeline, the model and the engine."""
from __future__ import annotations

from typing import Literal

# Mask value of pixels that carry no label (VOC borders, Cityscapes void, padding).
IGNORE_INDEX = 255

# ImageNet statistics the MiT weights were pretrained with (RGB, 0-1 scale).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# How the labeled branch's attention is computed (model/attention_paths.py): one of the paths, or
# `auto`, which a model resolves once (CPU: frugal; CUDA: eager when its maps fit in the device's
# free memory, else frugal).
ChosenAttentionPath = Literal["eager", "frugal", "sdpa"]
AttentionPath = Literal["auto", ChosenAttentionPath]

# The folder of a run that holds its checkpoints (RUN_DIR/weights/last.pt, best.pt).
WEIGHTS_DIR = "weights"

# The coarsest stride of any backbone (MiT's last stage; DINOv2's patches are 14): a training crop
# is at least one such cell.
CROP_STRIDE = 32
# The smallest square the backbone processes (its first spatial reduction, 8 x 8 at stride 4, needs
# as much): the one bound of every crop, window and image side (settings, CLI options, inference).
MIN_CROP = CROP_STRIDE

# File suffixes of `allspark export` (engine/inference/export.py), also recognised when an exported
# model is handed to a command that takes a checkpoint (model/weights.py).
EXPORT_SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
