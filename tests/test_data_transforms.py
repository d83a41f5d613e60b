"""Augmentation units and the training/eval datasets: shapes, mask integrity, padding, determinism."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from allspark_cli.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from allspark_cli.data import transforms as T
from allspark_cli.data.datasets import EvalDataset, LabeledDataset, UnlabeledDataset
from allspark_cli.data.splits import SplitEntry
from allspark_cli.errors import DataError
from allspark_cli.fileio import write_png

PAD_VALUE = (-np.array(IMAGENET_MEAN) / np.array(IMAGENET_STD)).astype(np.float32)
WHITE_VALUE = ((1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).astype(np.float32)


def striped_pair(height: int = 30, width: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Mask of vertical class stripes (values 0, 3, 7) and an image whose red channel encodes it."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, width // 3 : 2 * width // 3] = 3
    mask[:, 2 * width // 3 :] = 7
    image = np.stack([mask * 30, np.full_like(mask, 100), np.full_like(mask, 200)], axis=-1)
    return image, mask


def write_dataset(root, count: int = 3, size: tuple[int, int] = (30, 40), white: bool = False) -> list[SplitEntry]:
    entries = []
    for index in range(count):
        image, mask = striped_pair(*size)
        if white:
            image = np.full_like(image, 255)
        cv2.imwrite(str(root / f"{index}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        write_png(root / f"{index}_mask.png", mask, palette=np.zeros((8, 3), dtype=np.uint8))
        entries.append(SplitEntry(f"{index}.png", f"{index}_mask.png"))
    return entries


def test_rescale_keeps_aspect_and_mask_values():
    image, mask = striped_pair(30, 40)
    for seed in range(20):
        out_image, out_mask = T.RandomRescale()(image, mask, np.random.default_rng(seed))
        height, width = out_mask.shape
        assert out_image.shape == (height, width, 3)
        assert 20 <= width <= 80
        assert abs(height / width - 30 / 40) < 0.05
        assert set(np.unique(out_mask)) <= {0, 3, 7}


def test_pad_fills_image_black_and_mask_with_the_given_value():
    image, mask = striped_pair(30, 40)
    out_image, out_mask = T.PadToSize(50, mask_fill=IGNORE_INDEX)(image, mask, np.random.default_rng(0))
    assert out_mask.shape == (50, 50)
    assert (out_mask[30:, :] == IGNORE_INDEX).all() and (out_mask[:, 40:] == IGNORE_INDEX).all()
    assert (out_image[30:, :] == 0).all() and (out_image[:, 40:] == 0).all()
    np.testing.assert_array_equal(out_mask[:30, :40], mask)


def test_geometry_moves_image_and_mask_together():
    """After rescale/pad/crop/flip the image's red channel still encodes the mask pixel by pixel."""
    image, mask = striped_pair(60, 90)
    pipeline = T.Compose(T.geometric_units(48, mask_fill=IGNORE_INDEX))
    flipped = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        out_image, out_mask = pipeline(image, mask, rng)
        assert out_mask.shape == (48, 48) and out_image.shape == (48, 48, 3)
        valid = out_mask != IGNORE_INDEX
        # Interpolated image edges may blend two stripes; stripe interiors must match exactly.
        interior = valid & (cv2.erode(valid.astype(np.uint8), np.ones((3, 3))) > 0)
        same = out_image[..., 0][interior] == out_mask[interior].astype(np.int32) * 30
        assert same.mean() > 0.9
        assert (out_image[~valid] == 0).all()
        left, right = out_mask[:, 0][valid[:, 0]], out_mask[:, -1][valid[:, -1]]
        flipped += int(left.size > 0 and right.size > 0 and left.max() > right.min())
    assert flipped > 0  # the flip happened for some seeds (stripes ascend left to right otherwise)


def test_labeled_recipe_never_invents_mask_values():
    image, mask = striped_pair(50, 70)
    pipeline = T.labeled_transform(crop=64)
    for seed in range(20):
        _, out_mask = pipeline(image, mask, np.random.default_rng(seed))
        assert set(np.unique(out_mask)) <= {0, 3, 7, IGNORE_INDEX}


def test_colour_ops_limits():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(T.adjust_brightness(image, 1.0), image)
    np.testing.assert_array_equal(T.adjust_contrast(image, 1.0), image)
    np.testing.assert_array_equal(T.adjust_saturation(image, 1.0), image)
    grey = T.adjust_saturation(image, 0.0)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert np.abs(T.adjust_hue(image, 0.0).astype(int) - image).max() <= 8  # uint8 HSV round trip
    assert T.adjust_brightness(image, 0.0).max() == 0
    assert T.adjust_contrast(image, 0.0).std() < 1


def test_normalize_layout_and_values():
    image = np.zeros((5, 7, 3), dtype=np.uint8)
    image[0, 0] = 255
    tensor = T.normalize(image)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 5, 7)
    np.testing.assert_allclose(tensor[:, 0, 0].numpy(), WHITE_VALUE, rtol=1e-6)
    np.testing.assert_allclose(tensor[:, 1, 1].numpy(), PAD_VALUE, rtol=1e-6)


def test_labeled_dataset_shapes_repeat_and_padding(tmp_path):
    entries = write_dataset(tmp_path, count=3, size=(20, 24), white=True)
    dataset = LabeledDataset(tmp_path, entries, crop=64, seed=0, length=10)
    assert len(dataset) == 10
    for index in range(10):
        image, mask = dataset[index]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert mask.shape == (64, 64) and mask.dtype == torch.int64
        # 24 px scaled by at most 2 is < 64: every crop is padded, and the padding is ignored.
        # (Colour jitter runs after padding, as in the reference, so the image's pad is not black.)
        assert (mask == IGNORE_INDEX).any()
        assert set(mask.unique().tolist()) <= {0, 3, 7, IGNORE_INDEX}
    with pytest.raises(IndexError):
        dataset[10]


def test_unlabeled_dataset_marks_padding(tmp_path):
    entries = [SplitEntry(e.image, None) for e in write_dataset(tmp_path, count=2, size=(20, 24), white=True)]
    dataset = UnlabeledDataset(tmp_path, entries, crop=64, seed=0)
    image, pad_mask, index = dataset[1]
    assert index == 1
    assert image.shape == (3, 64, 64) and pad_mask.dtype == torch.int64
    assert set(pad_mask.unique().tolist()) == {T.UNLABELED_VALID, T.UNLABELED_PADDING}
    black = torch.isclose(image, torch.from_numpy(PAD_VALUE)[:, None, None], atol=1e-4).all(dim=0)
    assert torch.equal(black, pad_mask == T.UNLABELED_PADDING)


def test_augmentation_is_a_function_of_seed_epoch_index(tmp_path):
    entries = write_dataset(tmp_path, count=4, size=(50, 60))
    dataset = LabeledDataset(tmp_path, entries, crop=32, seed=7)
    first = [dataset[i] for i in range(4)]
    again = [dataset[i] for i in reversed(range(4))][::-1]  # order does not matter
    for (image_a, mask_a), (image_b, mask_b) in zip(first, again):
        assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b)
    dataset.set_epoch(1)
    assert not all(torch.equal(a[0], dataset[i][0]) for i, a in enumerate(first))
    other_seed = LabeledDataset(tmp_path, entries, crop=32, seed=8)
    assert not all(torch.equal(a[0], other_seed[i][0]) for i, a in enumerate(first))
    # Loader workers draw the same augmentations as the main process.
    dataset.set_epoch(0)
    images, masks = next(iter(DataLoader(dataset, batch_size=4, num_workers=2)))
    assert torch.equal(images, torch.stack([image for image, _ in first]))
    assert torch.equal(masks, torch.stack([mask for _, mask in first]))


def test_labeled_and_unlabeled_views_use_different_streams(tmp_path):
    entries = write_dataset(tmp_path, count=1, size=(60, 80))
    labeled = LabeledDataset(tmp_path, entries, crop=32, seed=0, length=8)
    unlabeled = UnlabeledDataset(tmp_path, entries * 8, crop=32, seed=0)
    assert all(labeled.rng(i).random() != unlabeled.rng(i).random() for i in range(8))


def test_eval_dataset_native_size(tmp_path):
    entries = write_dataset(tmp_path, count=2, size=(30, 40))
    image, mask, relpath = EvalDataset(tmp_path, entries)[1]
    assert image.shape == (3, 30, 40) and mask.shape == (30, 40) and relpath == "1.png"
    assert set(mask.unique().tolist()) == {0, 3, 7}


def test_datasets_refuse_bad_inputs(tmp_path):
    entries = write_dataset(tmp_path, count=1, size=(30, 40))
    with pytest.raises(DataError, match="need a mask column"):
        LabeledDataset(tmp_path, [SplitEntry("0.png", None)], crop=32, seed=0)
    with pytest.raises(DataError, match="need a mask column"):
        EvalDataset(tmp_path, [SplitEntry("0.png", None)])
    write_png(tmp_path / "small.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError, match="is 40x30 but its mask small.png is 10x10"):
        EvalDataset(tmp_path, [SplitEntry(entries[0].image, "small.png")])[0]
