"""Inference modes: whole vs slide, window coverage, any K, centre crop, TTA, batch invariance."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from allspark_cli.engine.inference.inference import (
    center_crop_box,
    default_stride,
    predict_slide,
    predict_whole,
    segment,
    window_starts,
)


class PixelModel(nn.Module):
    """Per-pixel 1x1 conv with a position-independent, batch-invariant output (N, K, H, W)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images)


class ConstantModel(nn.Module):
    """Zero logits: each window adds 1/K to every class, so the class-sum counts windows per pixel."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.calls: list[tuple[int, int]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        self.calls.append((h, w))
        return torch.zeros(n, self.num_classes, h, w)


def test_reference_stride_and_window_placement() -> None:
    assert default_stride(801) == 534  # cityscapes (DESIGN.md 3b)
    assert window_starts(1024, 801, 534) == [0, 534]  # reference: clipped last window
    assert window_starts(2048, 801, 534) == [0, 534, 1068, 1602]
    assert window_starts(1024, 801, 534, "shift") == [0, 223]  # last window ends on the border
    assert window_starts(500, 801, 534) == [0] == window_starts(500, 801, 534, "shift")
    with pytest.raises(ValueError, match="gaps"):
        window_starts(100, 10, 20)


def test_slide_equals_whole_on_an_image_of_the_crop_size() -> None:
    model = PixelModel(5).eval()
    images = torch.randn(2, 3, 32, 32)
    slide = predict_slide(model, images, crop=32, stride=21)
    torch.testing.assert_close(slide, predict_whole(model, images).softmax(dim=1))
    assert torch.equal(slide.argmax(1), segment(model, images, mode="whole").argmax(1))


# Window starts written out by hand: (length, crop, stride, placement) -> starts.
HAND_WINDOWS = [
    (100, 64, 32, "clip", [0, 32, 64]),  # the last window [64, 100) is cut at the border
    (100, 64, 32, "shift", [0, 32, 36]),  # the last window moved back to [36, 100)
    (130, 64, 32, "clip", [0, 32, 64, 96]),
    (130, 64, 32, "shift", [0, 32, 64, 66]),
    (64, 64, 42, "clip", [0]),  # an image of the crop size is one window, no nested second one
    (80, 64, 60, "clip", [0, 16]),  # [60, 80) would be a 20-pixel sliver: moved back to full size
    (96, 64, 32, "clip", [0, 32]),  # [32, 96) ends on the border: the reference would add [64, 96) too
]


@pytest.mark.parametrize(("length", "crop", "stride", "placement", "starts"), HAND_WINDOWS)
def test_window_starts_by_hand(length: int, crop: int, stride: int, placement: str, starts: list[int]) -> None:
    assert window_starts(length, crop, stride, placement) == starts


def _counts(runs: list[tuple[int, int]]) -> torch.Tensor:
    """A 1-D coverage count from (pixels, windows covering them) runs."""
    return torch.cat([torch.full((pixels,), float(windows)) for pixels, windows in runs])


# Windows covering each row / column of a 96 x 130 image, crop 64, stride 32 (from HAND_WINDOWS):
# rows [0, 64) and [32, 96) in both placements (the second ends on the border: no third window).
HAND_COVERAGE = {
    "clip": ([(32, 1), (32, 2), (32, 1)], [(32, 1), (96, 2), (2, 1)]),
    "shift": ([(32, 1), (32, 2), (32, 1)], [(32, 1), (34, 2), (30, 3), (32, 2), (2, 1)]),
}


@pytest.mark.parametrize("placement", ["clip", "shift"])
@pytest.mark.parametrize("num_classes", [2, 19, 33])
def test_slide_windows_cover_every_pixel_for_any_k(placement: str, num_classes: int) -> None:
    """Each window adds 1 (its softmax) to every pixel it covers, so the class-sum counts windows."""
    model = ConstantModel(num_classes)
    height, width, crop, stride = 96, 130, 64, 32
    scores = predict_slide(model, torch.zeros(1, 3, height, width), crop=crop, stride=stride, placement=placement)
    assert scores.shape == (1, num_classes, height, width)
    rows, columns = HAND_COVERAGE[placement]
    expected = _counts(rows)[:, None] * _counts(columns)[None, :]
    torch.testing.assert_close(scores.sum(dim=1)[0], expected)
    assert all(h <= crop and w <= crop for h, w in model.calls)
    if placement == "shift":
        assert set(model.calls) == {(crop, crop)}


def test_slide_on_a_per_pixel_model_matches_whole_argmax() -> None:
    model = PixelModel(4).eval()
    images = torch.randn(1, 3, 45, 61)
    slide = segment(model, images, mode="slide", crop=20)  # stride defaults to 13
    assert torch.equal(slide.argmax(1), segment(model, images).argmax(1))


def test_center_crop_region() -> None:
    assert center_crop_box(100, 60, 50) == (slice(25, 75), slice(5, 55))
    assert center_crop_box(30, 60, 50) == (slice(0, 30), slice(5, 55))  # short axis kept whole
    model = PixelModel(3).eval()
    images = torch.randn(1, 3, 40, 41)
    scores = segment(model, images, mode="center-crop", crop=21)
    rows, cols = center_crop_box(40, 41, 21)
    torch.testing.assert_close(scores, model(images[:, :, rows, cols]))


@pytest.mark.parametrize("mode", ["whole", "slide", "center-crop"])
def test_tta_of_a_flip_equivariant_model_keeps_the_prediction(mode: str) -> None:
    model = PixelModel(6).eval()  # a 1x1 conv commutes with the flip
    images = torch.randn(1, 3, 33, 47)
    plain = segment(model, images, mode=mode, crop=20)
    tta = segment(model, images, mode=mode, crop=20, tta=True)
    assert plain.shape == tta.shape
    assert torch.equal(plain.argmax(1), tta.argmax(1))


def test_tta_averages_the_flipped_view() -> None:
    class LeftBiased(nn.Module):  # predicts class 1 on the left half, class 0 on the right
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            n, _, h, w = images.shape
            logits = torch.zeros(n, 2, h, w)
            logits[:, 1, :, : w // 2] = 10.0
            logits[:, 0, :, w // 2 :] = 10.0
            return logits

    scores = segment(LeftBiased(), torch.zeros(1, 3, 4, 8), tta=True)
    torch.testing.assert_close(scores.sum(1), torch.ones(1, 4, 8))
    # each half is class 1 in exactly one of the two views: probabilities average to ~0.5
    assert torch.allclose(scores[:, 1], torch.full((1, 4, 8), 0.5), atol=1e-4)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_batch_gives_the_same_scores_as_single_images(mode: str) -> None:
    model = PixelModel(4).eval()
    images = torch.randn(3, 3, 30, 35)
    batched = segment(model, images, mode=mode, crop=16, tta=True)
    single = torch.cat([segment(model, images[i : i + 1], mode=mode, crop=16, tta=True) for i in range(3)])
    torch.testing.assert_close(batched, single)


def test_modes_needing_a_crop_refuse_none() -> None:
    with pytest.raises(ValueError, match="crop"):
        segment(PixelModel(2), torch.zeros(1, 3, 8, 8), mode="slide")
    with pytest.raises(ValueError, match="unknown"):
        segment(PixelModel(2), torch.zeros(1, 3, 8, 8), mode="tiles", crop=4)  # type: ignore[arg-type]
