"""`data_tools.custom`: checks of your own images and masks, splits by ratio or count, manifest."""
from __future__ import annotations

import subprocess
import sys
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


def test_builders_do_not_import_the_cli() -> None:
    code = (
        "import sys, data_tools.pascal, data_tools.cityscapes, data_tools.coco, data_tools.custom; "
        "assert 'typer' not in sys.modules and 'allspark_cli.cli' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
