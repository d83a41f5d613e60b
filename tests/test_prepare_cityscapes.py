"""`data_tools.cityscapes`: labelIds -> labelTrainIds, splits, resumption, source untouched, bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from allspark_cli.data.manifest import load_manifest
from allspark_cli.data.splits import read_split
from allspark_cli.errors import DataError, SettingsError
from data_tools.cityscapes import prepare_cityscapes

# The official table, typed in from DESIGN.md section 4 (cityscapesscripts is not installed).
OFFICIAL = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
            26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
HEIGHT, WIDTH = 8, 16
CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt",)}
PER_CITY = {"train": 8, "val": 2}


def make_cityscapes(tmp_path: Path) -> tuple[Path, dict[Path, np.ndarray]]:
    """A Cityscapes root with every labelId 0..33 (and 255 for -1) in its masks; returns labelIds per file."""
    root = tmp_path / "cityscapes"
    labels = {}
    counter = 0
    for split, cities in CITIES.items():
        for city in cities:
            (root / "leftImg8bit" / split / city).mkdir(parents=True)
            (root / "gtFine" / split / city).mkdir(parents=True)
            for index in range(PER_CITY[split]):
                stem = f"{city}_{index:06d}_000019"
                rng = np.random.default_rng(counter)
                counter += 1
                pixels = rng.integers(0, 255, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
                label_ids = rng.integers(0, 34, size=(HEIGHT, WIDTH), dtype=np.uint8)
                label_ids[0, 0] = 255  # id -1 (license plate) as stored in uint8 files
                path = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
                Image.fromarray(label_ids).save(path)
                labels[path] = label_ids
    return root, labels


def _sources(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_train_ids_splits_and_manifest(tmp_path: Path) -> None:
    root, labels = make_cityscapes(tmp_path)
    before = _sources(root)
    out = tmp_path / "out"
    summary = prepare_cityscapes(root, out, seed=0, workers=1)
    assert summary.masks_written == len(labels)
    for path, label_ids in labels.items():
        train_ids = np.array(Image.open(path.with_name(path.name.replace("labelIds", "labelTrainIds"))))
        expected = np.vectorize(lambda value: OFFICIAL.get(int(value), 255))(label_ids)
        np.testing.assert_array_equal(train_ids, expected)
    after = _sources(root)  # only additions, no source file changed
    assert {k: after[k] for k in before} == before
    assert all(k.endswith("_gtFine_labelTrainIds.png") for k in set(after) - set(before))

    manifest = load_manifest(out)
    assert (manifest.eval_mode, manifest.eval_crop, manifest.eval_stride, manifest.train_crop) == ("slide", 801, 534, 801)
    assert list(manifest.train_splits) == ["1/30", "1/16", "1/8", "1/4", "1/2"]
    train_total = 2 * PER_CITY["train"]
    assert [summary.split_sizes[n][0] for n in manifest.train_splits] == [1, 1, 2, 4, 8]
    for name, split in manifest.train_splits.items():
        labeled = read_split(manifest.root / split.labeled, require_mask=True)
        unlabeled = read_split(manifest.root / split.unlabeled)
        assert len(labeled) + len(unlabeled) == train_total
        for entry in labeled:
            assert entry.image.startswith("leftImg8bit/train/") and entry.mask.endswith("_gtFine_labelTrainIds.png")
            assert (manifest.root / entry.image).is_file() and (manifest.root / entry.mask).is_file()
    val = read_split(manifest.eval_split_file("val"), require_mask=True)
    assert len(val) == PER_CITY["val"] and all("/val/frankfurt/" in e.image for e in val)


def test_resume_skips_existing_and_ignores_stale_temp(tmp_path: Path) -> None:
    root, labels = make_cityscapes(tmp_path)
    prepare_cityscapes(root, tmp_path / "out", workers=1)
    first = next(iter(labels)).with_name(next(iter(labels)).name.replace("labelIds", "labelTrainIds"))
    content = first.read_bytes()
    first.unlink()
    stale = first.with_name(f".{first.name}.x1y2.tmp.png")
    stale.write_bytes(b"partial")
    summary = prepare_cityscapes(root, tmp_path / "out", workers=2)
    assert (summary.masks_written, summary.masks_skipped) == (1, len(labels) - 1)
    assert first.read_bytes() == content and not stale.exists()


@pytest.mark.parametrize("case", ["rgb labelIds", "other size", "truncated png", "missing image", "no masks"])
def test_bad_input(tmp_path: Path, case: str) -> None:
    root, labels = make_cityscapes(tmp_path)
    path = sorted(labels)[3]
    if case == "rgb labelIds":
        Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(path)
    elif case == "other size":
        Image.fromarray(np.zeros((HEIGHT, WIDTH + 2), np.uint8)).save(path)
    elif case == "truncated png":
        path.write_bytes(path.read_bytes()[:50])
    elif case == "missing image":
        image = root / "leftImg8bit" / path.relative_to(root / "gtFine").parent / path.name.replace("gtFine_labelIds", "leftImg8bit")
        image.unlink()
    else:
        for label in (root / "gtFine" / "val").rglob("*.png"):
            label.unlink()
        path = root / "gtFine" / "val"
    before = _sources(root)
    with pytest.raises(DataError) as error:
        prepare_cityscapes(root, tmp_path / "out", workers=1)
    assert path.name in str(error.value)
    assert not (tmp_path / "out").exists()
    after = _sources(root)  # the trainIds converted correctly stay (the rerun skips them); nothing else changed
    assert {name: after[name] for name in before} == before
    added = set(after) - set(before)
    assert all(name.endswith("_gtFine_labelTrainIds.png") for name in added)
    if case in ("missing image", "no masks"):  # layout checks: before any conversion
        assert not added
    else:
        assert len(added) == len(labels) - 1


def test_missing_root_and_out_inside_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="Cityscapes root .*does not exist"):
        prepare_cityscapes(tmp_path / "nope", tmp_path / "out")
    root, _ = make_cityscapes(tmp_path)
    before = _sources(root)
    with pytest.raises(SettingsError, match="inside the source folder --root"):
        prepare_cityscapes(root, root / "prepared")
    assert _sources(root) == before


@pytest.mark.parametrize("case", ["truncated", "value 77", "other size", "colour"])
def test_invalid_existing_train_ids_are_rebuilt_not_trusted(tmp_path: Path, case: str) -> None:
    root, labels = make_cityscapes(tmp_path)
    prepare_cityscapes(root, tmp_path / "out", workers=1)
    label_path = sorted(labels)[5]
    train_ids = label_path.with_name(label_path.name.replace("labelIds", "labelTrainIds"))
    good = train_ids.read_bytes()
    if case == "truncated":
        train_ids.write_bytes(good[: len(good) // 2])
    elif case == "value 77":
        Image.fromarray(np.full((HEIGHT, WIDTH), 77, np.uint8)).save(train_ids)
    elif case == "other size":
        Image.fromarray(np.zeros((HEIGHT, WIDTH + 1), np.uint8)).save(train_ids)
    else:
        Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(train_ids)
    summary = prepare_cityscapes(root, tmp_path / "out", workers=1)
    assert (summary.masks_written, summary.masks_skipped) == (1, len(labels) - 1)
    assert train_ids.read_bytes() == good
    assert any("1 existing _gtFine_labelTrainIds.png files were invalid and were rebuilt" in note and train_ids.name in note
               for note in summary.notes)
