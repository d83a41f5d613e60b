"""Torch datasets over split lists: labeled and unlabeled training views, and evaluation.

Reproducibility: a training sample's augmentation is drawn from
`np.random.default_rng((seed, epoch, index, view))`, so it depends neither on the number of loader
workers nor on which worker loads it, and a resumed run sees exactly the augmentations it would
have seen. `view` (0 labeled, 1 unlabeled) keeps labeled sample i and unlabeled sample i
from drawing the same crop and flip. Call `set_epoch(epoch)` before building each epoch's loader
iterator; loader workers copy the dataset when the iterator starts, so do not use
`persistent_workers=True`.

An epoch is one pass over the unlabeled list with the labeled list repeated to the same length
(DESIGN.md section 3): `LabeledDataset(length=len(unlabeled))` maps index i to entry i % len.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from allspark_cli.constants import IGNORE_INDEX
from allspark_cli.data.imageio import read_image, read_mask
from allspark_cli.data.manifest import DatasetManifest
from allspark_cli.data.splits import SplitEntry, read_split
from allspark_cli.data.transforms import (
    CUTMIX_PROBABILITY,
    UNLABELED_VALID,
    cutmix_box,
    labeled_transform,
    mask_to_tensor,
    normalize,
    strong_photometric_transform,
    unlabeled_transform,
)
from allspark_cli.errors import DataError


def _check_sizes(image: np.ndarray, mask: np.ndarray, entry: SplitEntry) -> None:
    if image.shape[:2] != mask.shape:
        raise DataError(
            f"image {entry.image} is {image.shape[1]}x{image.shape[0]} but its mask {entry.mask} is "
            f"{mask.shape[1]}x{mask.shape[0]}"
        )


class _TrainDataset(Dataset):
    """Shared seeding and epoch handling of the two training views."""

    view: int = 0

    def __init__(self, root: str | os.PathLike, entries: list[SplitEntry], *, crop: int, seed: int,
                 exif_orientation: bool = False) -> None:
        if not entries:
            raise DataError(f"empty sample list for dataset root {root}")
        self.root = Path(root)
        self.entries = list(entries)
        self.crop = crop
        self.seed = seed
        self.epoch = 0
        self.exif_orientation = exif_orientation  # the manifest's: images as displayed, or as stored

    def read_image(self, relpath: str) -> np.ndarray:
        return read_image(self.root / relpath, exif_orientation=self.exif_orientation)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose augmentations `__getitem__` draws (see the module docstring)."""
        self.epoch = epoch

    def rng(self, index: int) -> np.random.Generator:
        """The generator of sample `index` in the current epoch (independent of workers and order)."""
        return np.random.default_rng((self.seed, self.epoch, index, self.view))


class LabeledDataset(_TrainDataset):
    """Labeled training view: index -> (image float32 (3, crop, crop), mask int64 (crop, crop)).

    Masks keep class ids 0..K-1 and `ignore_index`; padding is `ignore_index`. With `length`, the
    entry list is repeated (index i reads entry i % len(entries)); each position gets its own
    augmentation.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        entries: list[SplitEntry],
        *,
        crop: int,
        seed: int,
        length: int | None = None,
        ignore_index: int = IGNORE_INDEX,
        exif_orientation: bool = False,
    ) -> None:
        super().__init__(root, entries, crop=crop, seed=seed, exif_orientation=exif_orientation)
        missing = [entry.image for entry in self.entries if entry.mask is None]
        if missing:
            raise DataError(f"labeled samples need a mask column; first without one: {missing[0]}")
        self.length = len(self.entries) if length is None else length
        self.transform = labeled_transform(crop=crop, ignore_index=ignore_index)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        entry = self.entries[index % len(self.entries)]
        image = self.read_image(entry.image)
        mask = read_mask(self.root / entry.mask)
        _check_sizes(image, mask, entry)
        image, mask = self.transform(image, mask, self.rng(index))
        return normalize(image), mask_to_tensor(mask)


class UnlabeledDataset(_TrainDataset):
    """Unlabeled training view: index -> (image (3, crop, crop), pad_mask int64 (crop, crop), index),
    and with `strong_view` also (strong image (3, crop, crop), cutmix box int64 (crop, crop)).

    `pad_mask` is UNLABELED_PADDING (255) where the crop is padding and UNLABELED_VALID (0)
    elsewhere; the returned index is the position in the unlabeled list (memory provenance). The
    strong view (weak-to-strong recipe) is the same crop with the photometric units drawn anew; the
    box marks where the step pastes its group partner's strong pixels (CutMix). Its draws follow the
    weak view's on the sample's generator, so the weak view is the reference's, draw for draw.
    """

    view = 1

    def __init__(self, root: str | os.PathLike, entries: list[SplitEntry], *, crop: int, seed: int,
                 strong_view: bool = False, cutmix_probability: float = CUTMIX_PROBABILITY,
                 exif_orientation: bool = False) -> None:
        super().__init__(root, entries, crop=crop, seed=seed, exif_orientation=exif_orientation)
        self.transform = unlabeled_transform(crop=crop)
        self.strong = strong_photometric_transform() if strong_view else None
        self.cutmix_probability = cutmix_probability

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple:
        if not 0 <= index < len(self.entries):
            raise IndexError(index)
        image = self.read_image(self.entries[index].image)
        marker = np.full(image.shape[:2], UNLABELED_VALID, dtype=np.uint8)
        rng = self.rng(index)
        image, marker = self.transform(image, marker, rng)
        if self.strong is None:
            return normalize(image), mask_to_tensor(marker), index
        strong, _ = self.strong(image, marker, rng)
        box = cutmix_box(marker.shape[0], rng, self.cutmix_probability)
        return normalize(image), mask_to_tensor(marker), index, normalize(strong), mask_to_tensor(box)


class EvalDataset(Dataset):
    """Evaluation view at native size, no augmentation.

    index -> (image float32 (3, H, W) normalised, mask int64 (H, W), image relpath str).
    """

    def __init__(self, root: str | os.PathLike, entries: list[SplitEntry], *, exif_orientation: bool = False) -> None:
        if not entries:
            raise DataError(f"empty evaluation list for dataset root {root}")
        missing = [entry.image for entry in entries if entry.mask is None]
        if missing:
            raise DataError(f"evaluation samples need a mask column; first without one: {missing[0]}")
        self.root = Path(root)
        self.entries = list(entries)
        self.exif_orientation = exif_orientation

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        entry = self.entries[index]
        image = read_image(self.root / entry.image, exif_orientation=self.exif_orientation)
        mask = read_mask(self.root / entry.mask)
        _check_sizes(image, mask, entry)
        return normalize(image), mask_to_tensor(mask), entry.image


class TrainDatasets(NamedTuple):
    """The two training views of a split; `unlabeled` is None for a fully labeled split."""

    labeled: LabeledDataset
    unlabeled: UnlabeledDataset | None


def build_train_datasets(
    manifest: DatasetManifest, split_name: str, *, crop: int | None = None, seed: int, repeat_labeled: bool = True,
    strong_view: bool = False, cutmix_probability: float = CUTMIX_PROBABILITY,
) -> TrainDatasets:
    """Datasets of training split `split_name`; `crop` defaults to the manifest's `train_crop`.

    The labeled list is repeated to the unlabeled list's length (never shortened), as the
    reference does, so zipping the two loaders gives one pass over the unlabeled images. With
    `repeat_labeled=False` it is not (an epoch is then one pass over the labeled list, as the
    reference's supervised baseline trains).
    """
    split = manifest.train_split(split_name)
    crop = manifest.train_crop if crop is None else crop
    labeled_entries = read_split(manifest.split_file(split.labeled), require_mask=True)
    unlabeled = None
    length = len(labeled_entries)
    if split.unlabeled is not None:
        unlabeled_entries = read_split(manifest.split_file(split.unlabeled))
        unlabeled = UnlabeledDataset(manifest.root, unlabeled_entries, crop=crop, seed=seed, strong_view=strong_view,
                                     cutmix_probability=cutmix_probability, exif_orientation=manifest.exif_orientation)
        length = max(length, len(unlabeled_entries)) if repeat_labeled else length
    labeled = LabeledDataset(
        manifest.root, labeled_entries, crop=crop, seed=seed, length=length, ignore_index=manifest.ignore_index,
        exif_orientation=manifest.exif_orientation,
    )
    return TrainDatasets(labeled, unlabeled)


def build_eval_dataset(manifest: DatasetManifest, split_name: str = "val") -> EvalDataset:
    """Evaluation dataset of the manifest's eval split `split_name`."""
    entries = read_split(manifest.eval_split_file(split_name), require_mask=True)
    return EvalDataset(manifest.root, entries, exif_orientation=manifest.exif_orientation)
