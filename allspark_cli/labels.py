"""Label metadata of the datasets: class names (index = class id) and class colour palettes.

Used by the dataset builders, manifests, checkpoints (reference checkpoints carry neither) and the
pictures. The VOC palette is the bit-interleaving scheme the Pascal VOC devkit uses for its masks
(class 255, the ignore label, is light cream (224, 224, 192) as in the VOC files).
"""
from __future__ import annotations

import numpy as np

from allspark_cli.constants import IGNORE_INDEX

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
)

# 0 background + the 80 COCO thing classes in ascending category-id order.
COCO_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)


def default_class_names(num_classes: int) -> list[str]:
    """Names for a checkpoint that carries none: the benchmark whose class count matches, else class_<i>."""
    for names in (VOC_CLASSES, CITYSCAPES_CLASSES, COCO_CLASSES):
        if len(names) == num_classes:
            return list(names)
    return [f"class_{i}" for i in range(num_classes)]


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
