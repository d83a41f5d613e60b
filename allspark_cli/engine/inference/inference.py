"""Inference modes: whole image, sliding window, centre crop, and horizontal-flip TTA.

DESIGN.md section 3b: pascal and coco are evaluated on the whole image at native size;
cityscapes with a sliding window of the crop size (801), stride floor(2/3 of it) (534), windows
clipped at the borders and the softmax of every window summed. The reference hard-codes 19
classes in its sliding window; here K is read from the logits, so any class count works.

Every function takes ImageNet-normalised float images (N, 3, H, W) and returns *scores*
(N, K, H', W') float32 whose argmax over dim 1 is the prediction. Their scale depends on the
mode (logits for `whole`, summed or averaged probabilities otherwise): only the argmax is
comparable across modes. The model must be per-image exact (`AllSparkSegmentor.forward` is), so a
batch gives the same scores as its images one at a time.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from allspark_cli.constants import MIN_CROP
from allspark_cli.data.manifest import EvalMode

EVAL_MODES: tuple[str, ...] = get_args(EvalMode)

# Window placement of the sliding window:
# - "clip": the reference's (and the published numbers'): windows start at 0, stride, 2*stride, ...
#   until one reaches the border; a window reaching past the border is cut there (the last
#   windows can be smaller than the crop).
# - "shift": every window has the crop size; the last one is moved back to end on the border
#   (mmsegmentation's placement). Same coverage, no undersized windows.
WindowPlacement = Literal["clip", "shift"]
DEFAULT_PLACEMENT: WindowPlacement = "clip"
# A clipped last window shorter than MIN_CROP (the backbone's smallest input) is moved back to
# full size instead (never on Cityscapes, whose last windows are 490 and 446 pixels).

# The reference's stride is floor(2/3 of the window): 534 for an 801 window (DESIGN.md 3b).
SLIDE_STRIDE_NUMERATOR = 2
SLIDE_STRIDE_DENOMINATOR = 3

CLASS_DIM = 1
WIDTH_DIM = 3


def default_stride(crop: int) -> int:
    """The reference stride for a window of `crop` pixels: floor(2/3 * crop), at least 1."""
    return max(1, crop * SLIDE_STRIDE_NUMERATOR // SLIDE_STRIDE_DENOMINATOR)


def window_starts(length: int, crop: int, stride: int, placement: WindowPlacement = DEFAULT_PLACEMENT) -> list[int]:
    """Start offsets of the windows along one axis of `length` pixels; together they cover every pixel.

    A window covers [start, min(start + crop, length)). With placement "shift" the last start is
    `length - crop` (when the axis is longer than the crop), so every window is full size.
    """
    if crop < 1 or stride < 1:
        raise ValueError(f"crop and stride must be >= 1, got crop={crop} stride={stride}")
    if stride > crop:
        raise ValueError(f"a stride ({stride}) larger than the window ({crop}) would leave gaps")
    if placement == "clip":
        # Stop once a window reaches the border. The reference keeps adding starts while they lie
        # inside the image, which only adds windows nested in the last one when a window ends
        # exactly on the border (never on Cityscapes' 1024 x 2048 with 801 / 534), and would make
        # an image of the crop size differ from its whole-image prediction.
        starts = list(range(0, max(length - crop, 0) + stride, stride))
        if len(starts) > 1 and length - starts[-1] < MIN_CROP:
            # A sliver the backbone cannot process (and that has no context): use a full window.
            starts[-1] = length - crop
        return starts
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop, stride))
    starts.append(length - crop)
    return starts


@torch.no_grad()
def predict_whole(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits (N, K, H, W) float32 of the whole images (N, 3, H, W) at native size."""
    return model(images).float()


@torch.no_grad()
def predict_slide(
    model: nn.Module,
    image: torch.Tensor,
    *,
    crop: int,
    stride: int,
    placement: WindowPlacement = DEFAULT_PLACEMENT,
) -> torch.Tensor:
    """Summed softmax (N, K, H, W) float32 of crop x crop windows, `stride` apart, over images (N, 3, H, W).

    Every pixel is covered by at least one window (see `window_starts`); K comes from the logits.
    """
    height, width = image.shape[-2:]
    scores: torch.Tensor | None = None
    for top in window_starts(height, crop, stride, placement):
        for left in window_starts(width, crop, stride, placement):
            bottom, right = min(top + crop, height), min(left + crop, width)
            probs = model(image[:, :, top:bottom, left:right]).float().softmax(dim=CLASS_DIM)
            if scores is None:
                num_classes = probs.shape[CLASS_DIM]
                scores = probs.new_zeros(image.shape[0], num_classes, height, width)
            scores[:, :, top:bottom, left:right] += probs
    assert scores is not None  # window_starts always yields at least one window
    return scores


def center_crop_box(height: int, width: int, crop: int) -> tuple[slice, slice]:
    """Rows and columns of the central crop x crop region (the whole axis where it is shorter)."""
    top = max(0, (height - crop) // 2)
    left = max(0, (width - crop) // 2)
    return slice(top, min(height, top + crop)), slice(left, min(width, left + crop))


@torch.no_grad()
def predict_center_crop(model: nn.Module, images: torch.Tensor, *, crop: int) -> torch.Tensor:
    """Logits (N, K, h, w) of the central crop (see `center_crop_box`) of images (N, 3, H, W).

    The caller compares them with the same region of the mask (the reference's `center_crop` mode).
    """
    rows, cols = center_crop_box(images.shape[-2], images.shape[-1], crop)
    return predict_whole(model, images[:, :, rows, cols])


def _scores(
    model: nn.Module,
    images: torch.Tensor,
    mode: EvalMode,
    crop: int | None,
    stride: int | None,
    placement: WindowPlacement,
) -> torch.Tensor:
    if mode == "whole":
        return predict_whole(model, images)
    if crop is None:
        raise ValueError(f"inference mode {mode!r} needs a crop size")
    if mode == "slide":
        return predict_slide(
            model, images, crop=crop, stride=stride or default_stride(crop), placement=placement
        )
    if mode == "center-crop":
        return predict_center_crop(model, images, crop=crop)
    raise ValueError(f"unknown inference mode {mode!r}; expected one of {', '.join(EVAL_MODES)}")


@torch.no_grad()
def segment(
    model: nn.Module,
    images: torch.Tensor,
    *,
    mode: EvalMode = "whole",
    crop: int | None = None,
    stride: int | None = None,
    tta: bool = False,
    placement: WindowPlacement = DEFAULT_PLACEMENT,
) -> torch.Tensor:
    """Scores (N, K, H', W') float32 of images (N, 3, H, W); argmax over dim 1 is the prediction.

    mode: "whole" (H' = H), "slide" (needs `crop`; `stride` defaults to floor(2/3 crop)), or
    "center-crop" (needs `crop`; H', W' is the region of `center_crop_box`).
    tta: also run the horizontally flipped images, flip their scores back, and average the
    probabilities of both views.
    """
    if mode == "center-crop":
        if crop is None:
            raise ValueError("inference mode 'center-crop' needs a crop size")
        # Crop first so that the flipped view covers exactly the same pixels.
        rows, cols = center_crop_box(images.shape[-2], images.shape[-1], crop)
        images, mode = images[:, :, rows, cols], "whole"
    scores = _scores(model, images, mode, crop, stride, placement)
    if not tta:
        return scores
    flipped = _scores(model, images.flip(WIDTH_DIM), mode, crop, stride, placement).flip(WIDTH_DIM)
    if mode == "slide":
        # Already summed probabilities: summing both views keeps one scale per pixel.
        return scores + flipped
    return (scores.softmax(dim=CLASS_DIM) + flipped.softmax(dim=CLASS_DIM)) / 2
