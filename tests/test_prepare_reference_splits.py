"""`--splits-from` with the reference's published split folders (../shared/splits, as published):
their folder names (`u2pl_1_16`), a subset of the splits, COCO's empty unlabeled lists, leaks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import require_shared
from PIL import Image

from allspark_cli.data.manifest import load_manifest
from allspark_cli.data.splits import read_split
from allspark_cli.errors import DataError
from data_tools.cityscapes import prepare_cityscapes
from data_tools.coco import prepare_coco
from data_tools.pascal import prepare_pascal

PUBLISHED = Path(__file__).resolve().parents[2] / "shared" / "splits"
SIZE = (6, 8)  # (H, W) of every fake image: only names matter here
LABELED, UNLABELED = 3, 4  # lines taken from each published list



@pytest.fixture(autouse=True)
def _published_splits() -> None:
    require_shared(PUBLISHED)  # skipped outside CI when absent, a failure under CI=true


def _head(path: Path, count: int) -> bytes:
    """The first `count` lines of a published list, bytes as they are (its last line has no newline)."""
    lines = path.read_bytes().splitlines(keepends=True)[:count]
    return b"".join(lines)


def _subset_reference(tmp_path: Path, dataset: str, folders: dict[str, tuple[int, int]]) -> Path:
    """A --splits-from folder with the published folder names and the first lines of their lists."""
    reference = tmp_path / "published" / dataset
    for folder, (labeled, unlabeled) in folders.items():
        (reference / folder).mkdir(parents=True)
        (reference / folder / "labeled.txt").write_bytes(_head(PUBLISHED / dataset / folder / "labeled.txt", labeled))
        (reference / folder / "unlabeled.txt").write_bytes(_head(PUBLISHED / dataset / folder / "unlabeled.txt", unlabeled))
    return reference


def _named(reference: Path) -> list[str]:
    return sorted({line.split()[0] for path in reference.rglob("*.txt") for line in path.read_text().splitlines() if line})


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*SIZE, 3), dtype=np.uint8)).save(path)


def _fake_voc(tmp_path: Path, train: list[str], val: list[str], aug: list[str]) -> tuple[Path, Path]:
    """VOC2012 with `train` + `val` (VOC masks) and a SegmentationClassAug folder for `aug`."""
    voc, aug_dir = tmp_path / "VOC2012", tmp_path / "SegmentationClassAug"
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    for folder in (voc / "SegmentationClass", aug_dir):
        folder.mkdir(parents=True)
    for index, sample in enumerate(sorted(set(train + val + aug))):
        _image(voc / "JPEGImages" / f"{sample}.jpg", index)
        mask = np.full(SIZE, index % 21, np.uint8)
        Image.fromarray(mask).save((voc / "SegmentationClass" if sample in train + val else aug_dir) / f"{sample}.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(train) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(val) + "\n")
    return voc, aug_dir


def test_pascal_published_folder_names_and_a_subset(tmp_path: Path) -> None:
    reference = _subset_reference(tmp_path, "pascal", {"92": (LABELED, UNLABELED), "u2pl_1_16": (LABELED, UNLABELED),
                                                       "1_8": (LABELED, UNLABELED)})
    (reference / "val.txt").write_bytes(_head(PUBLISHED / "pascal/val.txt", 2))
    ids = [Path(image).stem for image in _named(reference)]
    voc_train = [Path(line.split()[0]).stem for line in (reference / "92/labeled.txt").read_text().splitlines()]
    val = [Path(line.split()[0]).stem for line in (reference / "val.txt").read_text().splitlines()]
    voc, aug = _fake_voc(tmp_path, voc_train, val, [i for i in ids if i not in voc_train + val])
    out = tmp_path / "out"
    summary = prepare_pascal(voc, out, aug_masks=aug, splits_from=reference.parent, workers=1)
    for name, folder in (("92", "92"), ("u2pl-1/16", "u2pl/1_16"), ("aug-1/8", "1_8")):
        split = load_manifest(out).train_splits[name]
        assert split.labeled == f"splits/{folder}/labeled.txt"
        published = "u2pl_1_16" if folder == "u2pl/1_16" else folder
        for kind in ("labeled", "unlabeled"):
            assert (out / f"splits/{folder}/{kind}.txt").read_bytes() == (reference / published / f"{kind}.txt").read_bytes()
    assert (out / "splits/val.txt").read_bytes() == (reference / "val.txt").read_bytes()
    assert list(load_manifest(out).train_splits) == ["92", "aug-1/8", "u2pl-1/16"]
    assert any("left out: 183, 366, 732, 1464, aug-1/16, aug-1/4, aug-1/2, u2pl-1/8, u2pl-1/4" in note for note in summary.notes)


def test_cityscapes_published_folder_without_1_30(tmp_path: Path) -> None:
    reference = _subset_reference(tmp_path, "cityscapes", {"1_16": (LABELED, UNLABELED)})
    (reference / "val.txt").write_bytes(_head(PUBLISHED / "cityscapes/val.txt", 2))
    root = tmp_path / "cityscapes"
    for index, image in enumerate(_named(reference)):
        _image(root / image, index)
        label = root / image.replace("leftImg8bit/", "gtFine/", 1).replace("_leftImg8bit.png", "_gtFine_labelIds.png")
        label.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full(SIZE, 7, np.uint8)).save(label)
    out = tmp_path / "out"
    summary = prepare_cityscapes(root, out, splits_from=reference.parent, workers=1)
    assert list(load_manifest(out).train_splits) == ["1/16"]
    for relpath in ("1_16/labeled.txt", "1_16/unlabeled.txt", "val.txt"):
        assert (out / "splits" / relpath).read_bytes() == (reference / relpath).read_bytes()
    assert any("left out: 1/30, 1/8, 1/4, 1/2" in note for note in summary.notes)


def test_coco_published_empty_unlabeled_list_means_the_rest_of_train(tmp_path: Path) -> None:
    reference = _subset_reference(tmp_path, "coco", {"1_512": (LABELED, 0)})
    assert (reference / "1_512/unlabeled.txt").read_bytes() == (PUBLISHED / "coco/1_512/unlabeled.txt").read_bytes() == b""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    labeled = [Path(image).name for image in _named(reference)]
    names = {"train2017": labeled + ["000000000009.jpg", "000000000010.jpg"], "val2017": ["000000000001.jpg"]}
    for image_set, files in names.items():
        images = [{"id": index + 1, "file_name": name, "height": SIZE[0], "width": SIZE[1]} for index, name in enumerate(files)]
        for index, name in enumerate(files):
            _image(root / image_set / name, index)
        content = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "person"}]}
        (root / "annotations" / f"instances_{image_set}.json").write_text(json.dumps(content))
    out = tmp_path / "out"
    summary = prepare_coco(root, out, splits_from=reference.parent, workers=1)
    assert (out / "splits/1_512/labeled.txt").read_bytes() == (reference / "1_512/labeled.txt").read_bytes()
    unlabeled = read_split(out / "splits/1_512/unlabeled.txt", require_mask=True)
    assert [e.image for e in unlabeled] == ["train2017/000000000009.jpg", "train2017/000000000010.jpg"]
    assert any("unlabeled = the other 2 training samples" in note for note in summary.notes)


def test_a_reference_list_leaking_val_into_training_is_refused(tmp_path: Path) -> None:
    reference = _subset_reference(tmp_path, "pascal", {"92": (LABELED, UNLABELED)})
    val_line = (reference / "92/unlabeled.txt").read_text().splitlines()[0]
    (reference / "val.txt").write_text(val_line + "\n")
    ids = [Path(image).stem for image in _named(reference)]
    voc_train = [Path(line.split()[0]).stem for line in (reference / "92/labeled.txt").read_text().splitlines()]
    val = [Path(val_line.split()[0]).stem]
    voc, aug = _fake_voc(tmp_path, voc_train, val, [i for i in ids if i not in voc_train + val])
    with pytest.raises(DataError, match=rf"leak into training: val and training split 92 share 1 sample\(s\): JPEGImages/{val[0]}.jpg"):
        prepare_pascal(voc, tmp_path / "out", aug_masks=aug, splits_from=reference.parent, workers=1)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_every_published_pascal_list_is_reproduced_exactly(tmp_path: Path) -> None:
    """All 24 lists (+ val.txt) of the published pascal folder on a fake VOC holding every id they name."""
    published = PUBLISHED / "pascal"
    stems = lambda path: [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line]  # noqa: E731
    train, val, aug = stems(published / "1464/labeled.txt"), stems(published / "val.txt"), stems(published / "train_aug.txt")
    voc, aug_dir = _fake_voc(tmp_path, train, val, [i for i in aug if i not in set(train)])
    out = tmp_path / "out"
    prepare_pascal(voc, out, aug_masks=aug_dir, splits_from=PUBLISHED, workers=2)
    lists = [path for path in published.glob("*/*.txt")]
    assert len(lists) == 24
    for path in lists:
        folder = path.parent.name.replace("u2pl_", "u2pl/")
        assert (out / "splits" / folder / path.name).read_bytes() == path.read_bytes(), path
    assert (out / "splits/val.txt").read_bytes() == (published / "val.txt").read_bytes()
