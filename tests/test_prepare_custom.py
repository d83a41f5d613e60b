"""`data_tools.custom`: checks of your own images and masks, splits by ratio or count, manifest."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from allspark_cli.data.manifest import load_manifest
from allspark_cli.data.splits import read_split
from allspark_cli.errors import DataError, SettingsError
from data_tools.custom import prepare_custom

HEIGHT, WIDTH = 10, 14
CLASSES = ["background", "crack", "rust"]


def make_custom(tmp_path: Path, labeled: int = 20, unlabeled: int = 5) -> dict[str, Path]:
    folders = {key: tmp_path / key for key in ("images", "masks", "unlabeled")}
    for folder in folders.values():
        folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(labeled + unlabeled):
        pixels = rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        if index < labeled:
            Image.fromarray(pixels).save(folders["images"] / f"img{index:03d}.jpg")
            mask = rng.integers(0, len(CLASSES), (HEIGHT, WIDTH), dtype=np.uint8)
            mask[0, 0] = 255
            Image.fromarray(mask).save(folders["masks"] / f"img{index:03d}.png")
        else:
            Image.fromarray(pixels).save(folders["unlabeled"] / f"extra{index:03d}.png")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    folders["classes"] = tmp_path / "classes.txt"
    return folders


def _prepare(folders: dict[str, Path], out: Path, **kwargs) -> object:
    return prepare_custom(folders["images"], folders["masks"], folders["classes"], out,
                          unlabeled_dir=folders["unlabeled"], workers=1, **kwargs)


def test_ratio_split_and_manifest(tmp_path: Path) -> None:
    folders = make_custom(tmp_path)
    (tmp_path / "palette.txt").write_text("0 0 0\n255,0,0\n#00ff00\n")
    out = tmp_path / "out"
    summary = _prepare(folders, out, ratio="1/4", seed=1, name="plates", palette_file=tmp_path / "palette.txt")
    assert summary.samples_checked == 25
    manifest = load_manifest(out)
    assert manifest.name == "plates" and manifest.classes == CLASSES
    assert manifest.palette == [(0, 0, 0), (255, 0, 0), (0, 255, 0)]
    assert list(manifest.train_splits) == ["1/4", "full"]
    val = read_split(manifest.eval_split_file("val"), require_mask=True)
    labeled = read_split(manifest.root / manifest.train_splits["1/4"].labeled, require_mask=True)
    unlabeled = read_split(manifest.root / manifest.train_splits["1/4"].unlabeled)
    assert len(val) == 2 and len(labeled) == 5  # 1/10 of 20 for val; ceil(18 / 4) labeled
    assert len(unlabeled) == 18 - 5 + 5
    assert sum(e.mask is None for e in unlabeled) == 5  # the unlabeled folder: image column only
    assert not {e.image for e in val} & {e.image for e in labeled + unlabeled}
    full = manifest.train_splits["full"]
    assert full.unlabeled is None and len(read_split(manifest.root / full.labeled)) == 18
    for entry in labeled + unlabeled + val:
        assert (manifest.root / entry.image).is_file()


def test_count_split_and_seed(tmp_path: Path) -> None:
    folders = make_custom(tmp_path)
    _prepare(folders, tmp_path / "a", count=3, seed=4)
    _prepare(folders, tmp_path / "b", count=3, seed=4)
    manifest = load_manifest(tmp_path / "a")
    assert "3" in manifest.train_splits
    first = (tmp_path / "a" / manifest.train_splits["3"].labeled).read_bytes()
    assert first == (tmp_path / "b" / manifest.train_splits["3"].labeled).read_bytes()
    assert len(first.splitlines()) == 3


def test_ratio_and_count_together_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not both"):
        _prepare(make_custom(tmp_path), tmp_path / "out", ratio="1/2", count=2)


@pytest.mark.parametrize("case", ["rgb mask", "other size", "value outside classes", "corrupt image",
                                  "missing mask", "empty classes"])
def test_bad_input(tmp_path: Path, case: str) -> None:
    folders = make_custom(tmp_path)
    path = folders["masks"] / "img004.png"
    if case == "rgb mask":
        Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(path)
    elif case == "other size":
        Image.fromarray(np.zeros((HEIGHT, WIDTH - 1), np.uint8)).save(path)
    elif case == "value outside classes":
        Image.fromarray(np.full((HEIGHT, WIDTH), 3, np.uint8)).save(path)
    elif case == "corrupt image":
        path = folders["unlabeled"] / "extra021.png"
        path.write_bytes(path.read_bytes()[:40])
    elif case == "missing mask":
        path.unlink()
        path = folders["images"] / "img004.jpg"
    else:
        folders["classes"].write_text("\n\n")
        path = folders["classes"]
    with pytest.raises(DataError) as error:
        _prepare(folders, tmp_path / "out")
    assert path.name in str(error.value)
    assert not (tmp_path / "out").exists()


def test_every_broken_file_is_named_at_once(tmp_path: Path) -> None:
    folders = make_custom(tmp_path)
    for stem in ("img002", "img011"):
        Image.fromarray(np.full((HEIGHT, WIDTH), 9, np.uint8)).save(folders["masks"] / f"{stem}.png")
    with pytest.raises(DataError, match=r"^2 files failed: .*img002.png.*img011.png"):
        _prepare(folders, tmp_path / "out")


def _lines(out: Path, relpath: str) -> list[str]:
    return (out / relpath).read_text().splitlines()


def _move(files: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        path.rename(folder / path.name)


def test_fixed_val_folders_are_exactly_val_and_never_in_training(tmp_path: Path) -> None:
    folders = make_custom(tmp_path)
    val_stems = ["img003", "img010", "img017"]
    _move([folders["images"] / f"{stem}.jpg" for stem in val_stems], tmp_path / "val_images")
    _move([folders["masks"] / f"{stem}.png" for stem in val_stems], tmp_path / "val_masks")
    out = tmp_path / "out"
    summary = _prepare(folders, out, val_images_dir=tmp_path / "val_images", val_masks_dir=tmp_path / "val_masks", seed=2)
    manifest = load_manifest(out)
    val = read_split(manifest.eval_split_file("val"), require_mask=True)
    assert [(e.image, e.mask) for e in val] == [(f"val_images/{s}.jpg", f"val_masks/{s}.png") for s in val_stems]
    assert summary.split_sizes["full"] == (17, None)  # every other masked image trains, none is drawn away
    training = {Path(e.image).stem for name in ("1/8", "full") for relpath in
                (manifest.train_splits[name].labeled, manifest.train_splits[name].unlabeled) if relpath
                for e in read_split(out / relpath)}
    assert not training & set(val_stems)
    assert all((out / e.image).is_file() and (out / e.mask).is_file() for e in val)


def test_mmseg_layout(tmp_path: Path) -> None:
    folders = make_custom(tmp_path, unlabeled=0)
    root = tmp_path / "mmseg"
    images = sorted(folders["images"].glob("*.jpg"))
    for split, chosen in (("train", images[:15]), ("val", images[15:])):
        _move(chosen, root / "img_dir" / split)
        _move([folders["masks"] / f"{path.stem}.png" for path in chosen], root / "ann_dir" / split)
    out = tmp_path / "out"
    summary = prepare_custom(None, None, folders["classes"], out, mmseg_root=root, count=5, workers=1)
    assert summary.split_sizes["val"] == (5, None) and summary.split_sizes["full"] == (15, None)
    val = read_split(load_manifest(out).eval_split_file("val"))
    assert {Path(e.image).stem for e in val} == {path.stem for path in images[15:]}
    with pytest.raises(SettingsError, match="holds train/ and val/"):  # the same folders through --images: refused
        prepare_custom(root / "img_dir", root / "ann_dir", folders["classes"], tmp_path / "other", workers=1)


def test_train_and_val_lists(tmp_path: Path) -> None:
    folders = make_custom(tmp_path, unlabeled=0)
    (tmp_path / "val.txt").write_text("img000\nimg001.jpg\nimages/img002.jpg masks/img002.png\n")
    (tmp_path / "train.txt").write_text("\n".join(f"img{i:03d}" for i in range(3, 15)) + "\n")
    out = tmp_path / "out"
    summary = prepare_custom(folders["images"], folders["masks"], folders["classes"], out, workers=1,
                             val_list=tmp_path / "val.txt", train_list=tmp_path / "train.txt")
    val = read_split(load_manifest(out).eval_split_file("val"))
    assert [Path(e.image).stem for e in val] == ["img000", "img001", "img002"]
    assert summary.split_sizes["full"] == (12, None)
    assert any("5 images with a mask in neither" in note for note in summary.notes)
    (tmp_path / "train.txt").write_text("img001\nimg004\n")
    with pytest.raises(DataError, match=r"1 image\(s\) are in both --train-list and --val-list: img001"):
        prepare_custom(folders["images"], folders["masks"], folders["classes"], tmp_path / "b", workers=1,
                       val_list=tmp_path / "val.txt", train_list=tmp_path / "train.txt")
    (tmp_path / "val.txt").write_text("img000\nnope\n")
    with pytest.raises(DataError, match=r"val.txt: 1 line\(s\) name no image .*: nope"):
        prepare_custom(folders["images"], folders["masks"], folders["classes"], tmp_path / "c", workers=1,
                       val_list=tmp_path / "val.txt")
    with pytest.raises(SettingsError, match="one of --val-images, --val-list or --val-ratio"):
        prepare_custom(folders["images"], folders["masks"], folders["classes"], tmp_path / "d", workers=1,
                       val_list=tmp_path / "val.txt", val_ratio="1/5")


def test_unlabeled_from_images(tmp_path: Path) -> None:
    folders = make_custom(tmp_path, unlabeled=0)
    for stem in ("img005", "img006"):
        (folders["masks"] / f"{stem}.png").unlink()
    with pytest.raises(DataError, match="img005.jpg has no mask.*--unlabeled-from-images"):
        prepare_custom(folders["images"], folders["masks"], folders["classes"], tmp_path / "a", workers=1)
    out = tmp_path / "out"
    summary = prepare_custom(folders["images"], folders["masks"], folders["classes"], out, workers=1,
                             unlabeled_from_images=True, count=2)
    manifest = load_manifest(out)
    unlabeled = read_split(out / manifest.train_splits["2"].unlabeled)
    assert {e.image for e in unlabeled if e.mask is None} == {"images/img005.jpg", "images/img006.jpg"}
    assert summary.split_sizes["val"][0] + summary.split_sizes["full"][0] == 18  # only masked images are val or full
    assert len(unlabeled) == 16 - 2 + 2


def test_colour_masks_are_converted_through_the_palette(tmp_path: Path) -> None:
    folders = make_custom(tmp_path, unlabeled=0)
    colours = [(0, 0, 0), (200, 10, 10), (10, 200, 10)]
    (tmp_path / "palette.txt").write_text("\n".join(" ".join(map(str, colour)) for colour in colours) + "\n")
    expected = {}
    for mask_path in sorted(folders["masks"].glob("*.png"))[:4]:  # a mix of colour and class-id masks
        ids = np.array(Image.open(mask_path))
        ids[ids == 255] = 0  # colour masks have no ignore colour
        expected[mask_path.stem] = ids
        Image.fromarray(np.array(colours, np.uint8)[ids]).save(mask_path)
    with pytest.raises(DataError, match="colour image .*--palette"):
        prepare_custom(folders["images"], folders["masks"], folders["classes"], tmp_path / "a", workers=1)
    out = tmp_path / "out"
    summary = prepare_custom(folders["images"], folders["masks"], folders["classes"], out, workers=2,
                             palette_file=tmp_path / "palette.txt", ratio="1/2")
    assert summary.masks_written == 4
    manifest = load_manifest(out)
    lines = [e for relpath in (manifest.train_splits["full"].labeled, manifest.eval_splits["val"])
             for e in read_split(out / relpath)]
    for entry in lines:
        stem = Path(entry.image).stem
        if stem in expected:
            assert entry.mask == f"converted/masks/{stem}.png"
            np.testing.assert_array_equal(np.array(Image.open(out / entry.mask)), expected[stem])
        else:
            assert entry.mask == f"masks/{stem}.png"
    rerun = prepare_custom(folders["images"], folders["masks"], folders["classes"], out, workers=1,
                           palette_file=tmp_path / "palette.txt", ratio="1/2")
    assert rerun.masks_written == 0  # identical converted masks are not rewritten
    Image.fromarray(np.full((HEIGHT, WIDTH, 3), 77, np.uint8)).save(folders["masks"] / "img000.png")
    with pytest.raises(DataError, match=r"1 colour\(s\) that the --palette lacks: #4d4d4d: .*img000.png"):
        prepare_custom(folders["images"], folders["masks"], folders["classes"], out, workers=1,
                       palette_file=tmp_path / "palette.txt")


@pytest.mark.parametrize("case", ["unlabeled is --images", "val is --images", "unlabeled inside --images"])
def test_an_image_in_two_roles_is_refused_naming_it(tmp_path: Path, case: str) -> None:
    folders = make_custom(tmp_path, unlabeled=0)
    kwargs: dict = {}
    if case == "unlabeled is --images":
        kwargs["unlabeled_dir"] = folders["images"]
    elif case == "val is --images":
        kwargs.update(val_images_dir=folders["images"], val_masks_dir=folders["masks"])
    else:
        _move([folders["images"] / "img007.jpg"], folders["images"] / "more")
        _move([folders["masks"] / "img007.png"], folders["masks"] / "more")
        kwargs["unlabeled_dir"] = folders["images"] / "more"
    with pytest.raises(DataError, match=r"file\(s\) are in both --images and --(unlabeled|val-images): img00") as error:
        prepare_custom(folders["images"], folders["masks"], folders["classes"], tmp_path / "out", workers=1, **kwargs)
    assert "img007.jpg" in str(error.value) or case != "unlabeled inside --images"
    assert not (tmp_path / "out").exists()


def test_subfolders_are_read_with_their_paths(tmp_path: Path) -> None:
    folders = make_custom(tmp_path, unlabeled=0)
    for index in range(10):
        _move([folders["images"] / f"img{index:03d}.jpg"], folders["images"] / "site1")
        _move([folders["masks"] / f"img{index:03d}.png"], folders["masks"] / "site1")
    out = tmp_path / "out"
    summary = prepare_custom(folders["images"], folders["masks"], folders["classes"], out, workers=1)
    assert summary.samples_checked == 20
    full = read_split(out / load_manifest(out).train_splits["full"].labeled, require_mask=True)
    nested = [e for e in full if e.image.startswith("images/site1/")]
    assert nested and all(e.mask == e.image.replace("images/", "masks/", 1).replace(".jpg", ".png") for e in nested)
    assert all((out / e.mask).is_file() for e in full)


def test_blank_line_between_class_names_is_refused(tmp_path: Path) -> None:
    folders = make_custom(tmp_path)
    folders["classes"].write_text("background\n\ncrack\nrust\n\n")
    with pytest.raises(DataError, match=r"classes.txt: line\(s\) 2 are blank.*shift the class ids"):
        _prepare(folders, tmp_path / "out")


@pytest.mark.parametrize("inside", ["masks", "images/sub"])
def test_out_inside_a_source_is_refused(tmp_path: Path, inside: str) -> None:
    folders = make_custom(tmp_path)
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(SettingsError, match="inside the source folder"):
        _prepare(folders, tmp_path / inside)
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_one_broken_file_is_counted_in_the_singular(tmp_path: Path) -> None:
    folders = make_custom(tmp_path)
    Image.fromarray(np.full((HEIGHT, WIDTH), 9, np.uint8)).save(folders["masks"] / "img002.png")
    with pytest.raises(DataError, match=r"^1 file failed: .*img002.png"):
        _prepare(folders, tmp_path / "out")
