"""check_dataset: a clean dataset passes with correct statistics; each kind of damage is reported."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from allspark_cli.data.check import check_dataset, raise_if_problems
from allspark_cli.data.manifest import DatasetManifest, TrainSplit, write_manifest
from allspark_cli.data.splits import SplitEntry, write_split
from allspark_cli.errors import DataError
from allspark_cli.fileio import write_png

NUM_TRAIN, NUM_VAL, HEIGHT, WIDTH = 6, 2, 24, 32
PALETTE = np.array([(0, 0, 0), (200, 0, 0), (0, 200, 0)], dtype=np.uint8)


def entry(split: str, index: int) -> SplitEntry:
    return SplitEntry(f"img/{split}{index}.jpg", f"ann/{split}{index}.png")


def make_dataset(root: Path) -> Path:
    """6 train + 2 val JPEG/palette-PNG pairs, 3 classes; split '1/2' and 'full'; returns the yaml."""
    for split, count in (("t", NUM_TRAIN), ("v", NUM_VAL)):
        for index in range(count):
            mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
            mask[:, : WIDTH // 2] = 1 + index % 2
            mask[0, :] = 255
            image = np.full((HEIGHT, WIDTH, 3), 40 * index, dtype=np.uint8)
            (root / "img").mkdir(exist_ok=True)
            cv2.imwrite(str(root / entry(split, index).image), image)
            write_png(root / entry(split, index).mask, mask, palette=PALETTE)
    train = [entry("t", i) for i in range(NUM_TRAIN)]
    write_split(root / "lists/l.txt", train[:3])
    write_split(root / "lists/u.txt", [SplitEntry(e.image, None) for e in train[3:]])
    write_split(root / "lists/full.txt", train)
    write_split(root / "lists/val.txt", [entry("v", i) for i in range(NUM_VAL)])
    manifest = DatasetManifest(
        name="tiny",
        root=root,
        classes=["background", "a", "b"],
        palette=[tuple(c) for c in PALETTE.tolist()],
        train_splits={
            "1/2": TrainSplit(labeled="lists/l.txt", unlabeled="lists/u.txt"),
            "full": TrainSplit(labeled="lists/full.txt"),
        },
        eval_splits={"val": "lists/val.txt"},
        train_crop=16,
    )
    write_manifest(manifest, root / "dataset.yaml")
    return root / "dataset.yaml"


def test_clean_dataset_passes_with_statistics(tmp_path):
    report = check_dataset(make_dataset(tmp_path), workers=1)
    assert report.ok, report.problems
    raise_if_problems(report)  # no-op
    assert report.split_sizes == {"1/2": (3, 3), "full": (6, 0), "val": (2, 0)}
    assert report.images_checked == NUM_TRAIN + NUM_VAL and report.masks_checked == NUM_TRAIN + NUM_VAL
    train = report.stats["train"]
    labeled_pixels = (HEIGHT - 1) * WIDTH // 2
    np.testing.assert_array_equal(train.pixels, [NUM_TRAIN * labeled_pixels, 3 * labeled_pixels, 3 * labeled_pixels])
    np.testing.assert_array_equal(train.images, [6, 3, 3])
    assert train.ignored_pixels == NUM_TRAIN * WIDTH
    np.testing.assert_allclose(train.pixel_share, [0.5, 0.25, 0.25])
    np.testing.assert_array_equal(report.stats["val"].images, [2, 1, 1])


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + line + "\n")


def _rgb_mask(root: Path) -> None:
    cv2.imwrite(str(root / entry("t", 1).mask), np.zeros((HEIGHT, WIDTH, 3), np.uint8))


DAMAGE = {
    "missing image": (lambda r: (r / entry("t", 0).image).unlink(), entry("t", 0).image, "missing"),
    "missing mask": (lambda r: (r / entry("v", 1).mask).unlink(), entry("v", 1).mask, "missing"),
    "corrupt jpeg": (
        lambda r: (r / entry("t", 2).image).write_bytes(b"\xff\xd8garbage\xff\xd9"),
        entry("t", 2).image,
        "unreadable",
    ),
    "truncated jpeg": (
        lambda r: (r / entry("t", 4).image).write_bytes((r / entry("t", 4).image).read_bytes()[:300]),
        entry("t", 4).image,
        "unreadable",
    ),
    "truncated png": (
        lambda r: (r / entry("t", 1).mask).write_bytes((r / entry("t", 1).mask).read_bytes()[:60]),
        entry("t", 1).mask,
        "unreadable",
    ),
    "rgb mask": (_rgb_mask, entry("t", 1).mask, "mask-not-single-channel"),
    "size mismatch": (
        lambda r: write_png(r / entry("t", 5).mask, np.zeros((HEIGHT, WIDTH + 1), np.uint8)),
        entry("t", 5).mask,
        "size-mismatch",
    ),
    "out of range": (
        lambda r: write_png(r / entry("v", 0).mask, np.full((HEIGHT, WIDTH), 3, np.uint8)),
        entry("v", 0).mask,
        "mask-values",
    ),
    "labeled and unlabeled": (
        lambda r: _append(r / "lists/u.txt", entry("t", 0).image),
        entry("t", 0).image,
        "labeled-and-unlabeled",
    ),
    "train in val": (
        lambda r: _append(r / "lists/val.txt", " ".join(entry("t", 5))),
        entry("t", 5).image,
        "train-in-eval",
    ),
    "missing split file": (lambda r: (r / "lists/u.txt").unlink(), "lists/u.txt", "split-file"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_each_problem_is_reported(tmp_path, damage):
    path = make_dataset(tmp_path)
    apply, file, rule = DAMAGE[damage]
    apply(tmp_path)
    report = check_dataset(path, workers=1)
    assert [(p.file, p.rule) for p in report.problems] == [(file, rule)]
    with pytest.raises(DataError) as error:
        raise_if_problems(report)
    assert f"{file} ({rule})" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("damage", ["missing image", "rgb mask", "size mismatch", "out of range", "train in val"])
def test_fast_check_catches_header_level_problems(tmp_path, damage):
    path = make_dataset(tmp_path)
    apply, file, rule = DAMAGE[damage]
    apply(tmp_path)
    report = check_dataset(path, fast=True, workers=1)
    assert (file, rule) in [(p.file, p.rule) for p in report.problems]


def test_summary_names_the_first_files_and_counts_the_rest(tmp_path):
    path = make_dataset(tmp_path)
    for index in range(NUM_TRAIN):
        (tmp_path / entry("t", index).image).unlink()
    report = check_dataset(path, workers=1)
    assert report.rule_counts() == {"missing": NUM_TRAIN}
    with pytest.raises(DataError, match=r"has 6 problems: img/t0.jpg \(missing\); .*; and 3 more"):
        raise_if_problems(report)


def test_parallel_check_matches_serial(tmp_path):
    path = make_dataset(tmp_path)
    DAMAGE["out of range"][0](tmp_path)
    calls = []
    serial = check_dataset(path, workers=1)
    parallel = check_dataset(path, workers=2, progress=lambda done, total: calls.append((done, total)))
    assert parallel.problems == serial.problems
    np.testing.assert_array_equal(parallel.stats["train"].pixels, serial.stats["train"].pixels)
    assert calls[-1] == (NUM_TRAIN + NUM_VAL, NUM_TRAIN + NUM_VAL)
