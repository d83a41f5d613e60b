"""Constants shared by the data pipeline, the model and the engine."""
from __future__ import annotations

# Mask value of pixels that carry no label (VOC borders, Cityscapes void, padding).
IGNORE_INDEX = 255

# ImageNet statistics the MiT weights were pretrained with (RGB, 0-1 scale).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
