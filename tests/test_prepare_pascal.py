"""`data_tools.pascal`: VOC + SBD masks, reference split names, --splits-from import, resumption, bad input."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from allspark_cli.data.manifest import load_manifest
from allspark_cli.data.splits import read_split
from allspark_cli.errors import DataError, SettingsError
from allspark_cli.labels import voc_palette
from data_tools.pascal import AUG_RATIOS, ORIGINAL_SIZES, U2PL_RATIOS, prepare_pascal

HEIGHT, WIDTH = 12, 16
VOC_TRAIN = [f"2007_{i:06d}" for i in range(6)]
VOC_VAL = [f"2008_{i:06d}" for i in range(3)]
SBD_ONLY = [f"2009_{i:06d}" for i in range(10)]
SBD_TRAIN = SBD_ONLY[:6] + VOC_TRAIN[:2]  # SBD overlaps VOC train ...
SBD_VAL = SBD_ONLY[6:] + VOC_VAL[:1]  # ... and VOC val (those must be left out of the aug set)


def _mask(seed: int, with_border: bool) -> np.ndarray:
    mask = np.random.default_rng(seed).integers(0, 21, size=(HEIGHT, WIDTH), dtype=np.uint8)
    if with_border:
        mask[0, :] = 255
    return mask


def _write_jpeg(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def _write_palette_png(path: Path, mask: np.ndarray) -> None:
    image = Image.fromarray(mask, mode="P")
    image.putpalette(voc_palette().flatten().tolist())
    image.save(path)


def make_voc(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """VOCdevkit/VOC2012 and benchmark_RELEASE with tiny images; returns the expected mask of every id."""
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    expected = {}
    for index, sample in enumerate(VOC_TRAIN + VOC_VAL + SBD_ONLY):
        _write_jpeg(voc / "JPEGImages" / f"{sample}.jpg", index)
        if sample in VOC_TRAIN or sample in VOC_VAL:
            expected[sample] = _mask(index, with_border=True)
            _write_palette_png(voc / "SegmentationClass" / f"{sample}.png", expected[sample])
    for index, sample in enumerate(SBD_TRAIN + SBD_VAL):
        sbd_mask = _mask(100 + index, with_border=False)
        scipy.io.savemat(sbd / "cls" / f"{sample}.mat", {"GTcls": {"Segmentation": sbd_mask, "Boundaries": 0}})
        expected.setdefault(sample, sbd_mask)  # VOC masks win over SBD ones
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(VOC_VAL) + "\n")
    (sbd / "train.txt").write_text("\n".join(SBD_TRAIN) + "\n")
    (sbd / "val.txt").write_text("\n".join(SBD_VAL) + "\n")
    return voc, tmp_path / "benchmark_RELEASE", expected


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_masks_splits_and_manifest(tmp_path: Path) -> None:
    voc, sbd, expected = make_voc(tmp_path)
    sources = {**_tree(voc), **_tree(sbd)}
    out = tmp_path / "out"
    summary = prepare_pascal(voc, out, sbd_root=sbd, seed=3, workers=1)
    assert {**_tree(voc), **_tree(sbd)} == sources  # never modifies (or adds to) a source folder
    aug = sorted(set(SBD_ONLY) | set(VOC_TRAIN))
    assert summary.masks_written == len(aug) + len(VOC_VAL)
    for sample in aug + VOC_VAL:
        with Image.open(out / "SegmentationClass" / f"{sample}.png") as image:
            assert image.mode == "P"
            np.testing.assert_array_equal(np.array(image), expected[sample])
    for sample in VOC_TRAIN + VOC_VAL:  # VOC masks are copied as they are
        assert (out / "SegmentationClass" / f"{sample}.png").read_bytes() == (
            voc / "SegmentationClass" / f"{sample}.png"
        ).read_bytes()
    assert (out / "JPEGImages").resolve() == (voc / "JPEGImages").resolve()

    manifest = load_manifest(out / "dataset.yaml")
    assert manifest.num_classes == 21 and manifest.train_crop == 513 and manifest.eval_mode == "whole"
    expected_names = [str(s) for s in ORIGINAL_SIZES]
    expected_names += [f"aug-1/{r.denominator}" for r in AUG_RATIOS] + [f"u2pl-1/{r.denominator}" for r in U2PL_RATIOS]
    assert list(manifest.train_splits) == expected_names
    val = read_split(manifest.eval_split_file("val"), require_mask=True)
    assert [e.image for e in val] == [f"JPEGImages/{s}.jpg" for s in VOC_VAL]
    for name, split in manifest.train_splits.items():
        labeled = read_split(manifest.root / split.labeled, require_mask=True)
        unlabeled = read_split(manifest.root / split.unlabeled)
        ids_l = {Path(e.image).stem for e in labeled}
        ids_u = {Path(e.image).stem for e in unlabeled}
        assert not ids_l & ids_u and ids_l | ids_u == set(aug), name
        assert all(e.mask == f"SegmentationClass/{Path(e.image).stem}.png" for e in labeled)
        if name.isdigit():  # original splits draw labels from VOC train only
            assert ids_l <= set(VOC_TRAIN)
    assert (out / "splits/1_16/labeled.txt").is_file() and (out / "splits/u2pl/1_4/unlabeled.txt").is_file()
    # 6 VOC train images: 92/183/366/732 are scaled down (and said so); 1464 is all of VOC train
    sizes = [summary.split_sizes[str(s)][0] for s in ORIGINAL_SIZES]
    assert sizes == [1, 1, 2, 3, 6]
    assert any("scaled" in note for note in summary.notes)
    assert summary.split_sizes["aug-1/2"] == (8, 8)  # ceil(16 / 2)


def test_seeded_splits_are_reproducible_and_nested(tmp_path: Path) -> None:
    voc, sbd, _ = make_voc(tmp_path)
    prepare_pascal(voc, tmp_path / "a", sbd_root=sbd, seed=1, workers=1)
    prepare_pascal(voc, tmp_path / "b", sbd_root=sbd, seed=1, workers=1)
    prepare_pascal(voc, tmp_path / "c", sbd_root=sbd, seed=2, workers=1)
    split = "splits/1_4/labeled.txt"
    assert (tmp_path / "a" / split).read_bytes() == (tmp_path / "b" / split).read_bytes()
    assert (tmp_path / "a" / split).read_bytes() != (tmp_path / "c" / split).read_bytes()
    small = set((tmp_path / "a/splits/1_16/labeled.txt").read_text().splitlines())
    large = set((tmp_path / "a/splits/1_2/labeled.txt").read_text().splitlines())
    assert small < large


def test_aug_masks_folder_and_parallel_workers(tmp_path: Path) -> None:
    voc, sbd, expected = make_voc(tmp_path)
    aug_dir = tmp_path / "SegmentationClassAug"
    aug_dir.mkdir()
    for mat in (sbd / "dataset/cls").glob("*.mat"):
        mask = scipy.io.loadmat(mat)["GTcls"]["Segmentation"][0][0]
        Image.fromarray(mask).save(aug_dir / f"{mat.stem}.png")
    out = tmp_path / "out"
    summary = prepare_pascal(voc, out, aug_masks=aug_dir, workers=2)
    assert summary.masks_written == len(set(SBD_ONLY) | set(VOC_TRAIN)) + len(VOC_VAL)
    for sample in SBD_ONLY:
        np.testing.assert_array_equal(np.array(Image.open(out / "SegmentationClass" / f"{sample}.png")), expected[sample])


def _write_reference(folder: Path, out: Path) -> None:
    """A reference split folder (`pascal/<name>/labeled.txt`) made from our own drawn splits."""
    for split_dir in (out / "splits").rglob("labeled.txt"):
        target = folder / "pascal" / split_dir.parent.relative_to(out / "splits")
        target.mkdir(parents=True, exist_ok=True)
        # reversed order: the import must keep the file byte for byte, not re-sort it
        target.joinpath("labeled.txt").write_text("".join(reversed(split_dir.read_text().splitlines(True))))
        target.joinpath("unlabeled.txt").write_bytes(split_dir.with_name("unlabeled.txt").read_bytes())


def test_splits_from_imports_byte_identical(tmp_path: Path) -> None:
    voc, sbd, _ = make_voc(tmp_path)
    prepare_pascal(voc, tmp_path / "drawn", sbd_root=sbd, seed=5, workers=1)
    _write_reference(tmp_path / "reference", tmp_path / "drawn")
    out = tmp_path / "out"
    prepare_pascal(voc, out, sbd_root=sbd, splits_from=tmp_path / "reference", workers=1)
    for reference in (tmp_path / "reference/pascal").rglob("*.txt"):
        assert (out / "splits" / reference.relative_to(tmp_path / "reference/pascal")).read_bytes() == reference.read_bytes()


def test_splits_from_lists_every_incomplete_split(tmp_path: Path) -> None:
    voc, sbd, _ = make_voc(tmp_path)
    line = "JPEGImages/2007_000000.jpg SegmentationClass/2007_000000.png\n"
    for folder, filename in (("92", "labeled.txt"), ("u2pl_1_4", "unlabeled.txt")):
        (tmp_path / "reference/pascal" / folder).mkdir(parents=True)
        (tmp_path / "reference/pascal" / folder / filename).write_text(line)
    with pytest.raises(DataError, match=r"lacks 2 file\(s\): 92/unlabeled.txt, u2pl_1_4/labeled.txt"):
        prepare_pascal(voc, tmp_path / "out", sbd_root=sbd, splits_from=tmp_path / "reference", workers=1)
    assert not (tmp_path / "out").exists()


def test_split_lines_pointing_nowhere_are_all_named_before_any_conversion(tmp_path: Path) -> None:
    voc, sbd, _ = make_voc(tmp_path)
    prepare_pascal(voc, tmp_path / "drawn", sbd_root=sbd, workers=1)
    _write_reference(tmp_path / "reference", tmp_path / "drawn")
    for folder, missing in (("1_8", "missing_a"), ("u2pl/1_4", "missing_b"), ("92", "missing_a")):
        bad = tmp_path / "reference/pascal" / folder / "unlabeled.txt"
        bad.write_text(bad.read_text() + f"JPEGImages/{missing}.jpg SegmentationClass/{missing}.png\n")
    with pytest.raises(DataError) as error:
        prepare_pascal(voc, tmp_path / "out", sbd_root=sbd, splits_from=tmp_path / "reference", workers=1)
    message = str(error.value)
    assert "name 4 file(s) that the dataset lacks" in message  # each missing path once, with where it is first named
    assert re.search(r"JPEGImages/missing_a.jpg \(92/unlabeled.txt:\d+\)", message)
    assert re.search(r"SegmentationClass/missing_b.png \(u2pl/1_4/unlabeled.txt:\d+\)", message)
    assert not (tmp_path / "out").exists()  # refused before converting any mask


def test_resume_skips_and_output_is_identical(tmp_path: Path) -> None:
    voc, sbd, _ = make_voc(tmp_path)
    out = tmp_path / "out"
    prepare_pascal(voc, out, sbd_root=sbd, workers=1)
    before = _tree(out)
    victim = out / "SegmentationClass" / f"{SBD_ONLY[0]}.png"
    victim.unlink()  # as if the run had been killed while writing it ...
    (victim.parent / f".{victim.name}.abc123.tmp.png").write_bytes(b"half")  # ... leaving a temp file
    summary = prepare_pascal(voc, out, sbd_root=sbd, workers=1)
    assert summary.masks_written == 1
    assert summary.masks_skipped == len(set(SBD_ONLY) | set(VOC_TRAIN)) + len(VOC_VAL) - 1
    assert not list(victim.parent.glob(".*.tmp*"))
    assert _tree(out) == before


def _corrupt(voc: Path, sbd: Path, case: str) -> Path:
    """Breaks one source file; returns the file the error must name."""
    if case == "corrupt jpeg":
        path = voc / "JPEGImages" / f"{SBD_ONLY[1]}.jpg"
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif case == "truncated png":
        path = voc / "SegmentationClass" / f"{VOC_TRAIN[2]}.png"
        path.write_bytes(path.read_bytes()[:60])
    elif case == "truncated mat":
        path = sbd / "dataset/cls" / f"{SBD_ONLY[2]}.mat"
        path.write_bytes(path.read_bytes()[:100])
    elif case == "rgb mask":
        path = voc / "SegmentationClass" / f"{VOC_VAL[0]}.png"
        Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(path)
    elif case == "other size":
        path = voc / "SegmentationClass" / f"{VOC_TRAIN[3]}.png"
        _write_palette_png(path, np.zeros((HEIGHT + 1, WIDTH), np.uint8))
    elif case == "value outside classes":
        path = voc / "SegmentationClass" / f"{VOC_TRAIN[4]}.png"
        _write_palette_png(path, np.full((HEIGHT, WIDTH), 21, np.uint8))
    elif case == "missing mat":
        path = sbd / "dataset/cls" / f"{SBD_ONLY[3]}.mat"
        path.unlink()
    else:
        path = voc / "ImageSets/Segmentation/val.txt"
        path.write_text("\n")
    return path


@pytest.mark.parametrize(
    "case",
    ["corrupt jpeg", "truncated png", "truncated mat", "rgb mask", "other size", "value outside classes",
     "missing mat", "empty list"],
)
def test_bad_input_names_the_file_and_keeps_only_correct_masks(tmp_path: Path, case: str) -> None:
    voc, sbd, expected = make_voc(tmp_path)
    path = _corrupt(voc, sbd, case)
    out = tmp_path / "out"
    with pytest.raises(DataError) as error:
        prepare_pascal(voc, out, sbd_root=sbd, workers=1)
    assert path.name in str(error.value)
    if case in ("missing mat", "empty list"):  # found by the layout checks: nothing is written
        assert not out.exists()
        return
    kept = sorted((out / "SegmentationClass").glob("*.png"))
    assert f"{len(kept)} masks complete and kept" in str(error.value)
    assert len(kept) == len(set(SBD_ONLY) | set(VOC_TRAIN)) + len(VOC_VAL) - 1  # all but the bad one
    for mask in kept:
        np.testing.assert_array_equal(np.array(Image.open(mask)), expected[mask.stem])
    assert not (out / "dataset.yaml").exists() and not (out / "splits").exists() and not (out / "JPEGImages").exists()


def test_wrong_layout_and_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="VOC root .*does not exist"):
        prepare_pascal(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "VOC2012").mkdir()
    with pytest.raises(DataError, match="JPEGImages"):
        prepare_pascal(tmp_path / "VOC2012", tmp_path / "out")


def test_failed_rerun_keeps_earlier_complete_output(tmp_path: Path) -> None:
    voc, sbd, _ = make_voc(tmp_path)
    out = tmp_path / "out"
    prepare_pascal(voc, out, sbd_root=sbd, workers=1)
    before = _tree(out)
    (out / "SegmentationClass" / f"{SBD_ONLY[1]}.png").unlink()
    _corrupt(voc, sbd, "corrupt jpeg")
    with pytest.raises(DataError):
        prepare_pascal(voc, out, sbd_root=sbd, workers=1)
    after = _tree(out)
    assert set(after) == set(before) - {f"SegmentationClass/{SBD_ONLY[1]}.png"}
    assert os.path.islink(out / "JPEGImages")


def test_partial_keep_then_the_rerun_converts_only_the_fixed_files(tmp_path: Path) -> None:
    voc, sbd, expected = make_voc(tmp_path)
    broken = [_corrupt(voc, sbd, "corrupt jpeg"), _corrupt(voc, sbd, "truncated mat")]
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"^2 masks failed: .*") as error:
        prepare_pascal(voc, out, sbd_root=sbd, workers=2)
    assert all(path.name in str(error.value) for path in broken)  # every bad file at once
    make_voc(tmp_path / "fixed")  # the same sources, unbroken
    for path in broken:
        path.write_bytes((tmp_path / "fixed" / path.relative_to(tmp_path)).read_bytes())
    summary = prepare_pascal(voc, out, sbd_root=sbd, workers=1)
    assert summary.masks_written == 2
    assert summary.masks_skipped == len(set(SBD_ONLY) | set(VOC_TRAIN)) + len(VOC_VAL) - 2
    for mask in (out / "SegmentationClass").glob("*.png"):
        np.testing.assert_array_equal(np.array(Image.open(mask)), expected[mask.stem])


@pytest.mark.parametrize("inside", ["voc", "sbd"])
def test_out_inside_a_source_is_refused_and_the_source_untouched(tmp_path: Path, inside: str) -> None:
    voc, sbd, _ = make_voc(tmp_path)
    before = {**_tree(voc), **_tree(sbd)}
    out = (voc if inside == "voc" else sbd) / "prepared"
    with pytest.raises(SettingsError, match="inside the source folder --(voc|sbd)-root"):
        prepare_pascal(voc, out, sbd_root=sbd, workers=1)
    assert {**_tree(voc), **_tree(sbd)} == before and not out.exists()


def test_rerun_with_another_mask_source_is_refused(tmp_path: Path) -> None:
    voc, sbd, _ = make_voc(tmp_path)
    out = tmp_path / "out"
    prepare_pascal(voc, out, sbd_root=sbd, workers=1)
    assert load_manifest(out).mask_options == {"augmented_masks": "sbd"}
    with pytest.raises(SettingsError, match=r"augmented_masks 'sbd' -> 'none'"):
        prepare_pascal(voc, out, workers=1)
