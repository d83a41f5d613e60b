"""evaluate_dataset: batched == one image at a time, modes, mode restore, center-crop masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from allspark_cli.engine.inference.evaluate import evaluate_dataset
from allspark_cli.engine.inference.metrics import ConfusionMatrix

NUM_CLASSES = 4
SIZES = [(24, 32), (24, 32), (40, 28), (24, 32), (33, 33), (40, 28), (24, 32)]


class ContextModel(nn.Module):
    """3x3 convs: a pixel's logits depend on its neighbours, so padding or mixing sizes would show."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, NUM_CLASSES, 3, padding=1))
        self.dropout = nn.Dropout(0.5)  # active only in train mode: eval must switch it off

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.dropout(images))


class ToyDataset(Dataset):
    def __init__(self, sizes: list[tuple[int, int]]) -> None:
        generator = torch.Generator().manual_seed(1)
        self.samples = []
        for index, (h, w) in enumerate(sizes):
            image = torch.randn(3, h, w, generator=generator)
            mask = torch.randint(0, NUM_CLASSES, (h, w), generator=generator)
            mask[0, :] = 255  # a row of ignore pixels
            self.samples.append((image, mask, f"img{index}.png"))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        return self.samples[index]


def _reference_matrix(model: nn.Module, dataset: ToyDataset) -> np.ndarray:
    cm = ConfusionMatrix(NUM_CLASSES)
    with torch.no_grad():
        for image, mask, _ in dataset.samples:
            cm.update(mask, model(image[None])[0].argmax(0))
    return cm.to_numpy()


@pytest.mark.parametrize("batch_size", [2, 3, 7])
def test_batched_equals_one_at_a_time(batch_size: int) -> None:
    model, dataset = ContextModel().eval(), ToyDataset(SIZES)
    single = evaluate_dataset(model, dataset, batch_size=1, num_classes=NUM_CLASSES)
    batched = evaluate_dataset(model, dataset, batch_size=batch_size, num_classes=NUM_CLASSES)
    np.testing.assert_array_equal(single.confusion, _reference_matrix(model, dataset))
    np.testing.assert_array_equal(batched.confusion, single.confusion)
    assert batched.metrics.to_dict() == single.metrics.to_dict()
    assert batched.num_images == len(SIZES)


def test_model_mode_is_restored_and_eval_mode_used() -> None:
    model, dataset = ContextModel().train(), ToyDataset(SIZES[:3])
    result = evaluate_dataset(model, dataset, num_classes=NUM_CLASSES)
    assert model.training  # restored
    np.testing.assert_array_equal(result.confusion, _reference_matrix(model.eval(), dataset))


def test_k_is_taken_from_the_logits_and_progress_is_reported() -> None:
    calls = []
    result = evaluate_dataset(
        ContextModel(), ToyDataset(SIZES), batch_size=3, progress=lambda done, total: calls.append((done, total))
    )
    assert result.confusion.shape == (NUM_CLASSES, NUM_CLASSES)
    assert calls == [(3, 7), (6, 7), (7, 7)]
    labelled = sum(int((m != 255).sum()) for _, m, _ in ToyDataset(SIZES).samples)
    assert result.confusion.sum() == labelled  # every labelled pixel counted once, ignore rows skipped


def test_slide_and_center_crop_modes() -> None:
    model, dataset = ContextModel().eval(), ToyDataset(SIZES)
    slide = evaluate_dataset(model, dataset, mode="slide", crop=20, stride=13, batch_size=4)
    slide_single = evaluate_dataset(model, dataset, mode="slide", crop=20, stride=13, batch_size=1)
    np.testing.assert_array_equal(slide.confusion, slide_single.confusion)
    crop = evaluate_dataset(model, dataset, mode="center-crop", crop=16, batch_size=2)
    assert crop.confusion.sum() < slide.confusion.sum()  # only the central 16x16 (minus ignore) counts
    assert crop.confusion.sum() <= 16 * 16 * len(SIZES)
