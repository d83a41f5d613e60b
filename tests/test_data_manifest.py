"""dataset.yaml and split lists: round trips, path resolution, and one-line errors naming the file."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from allspark_cli.data.manifest import DatasetManifest, TrainSplit, load_manifest, write_manifest
from allspark_cli.data.splits import SplitEntry, format_split, read_split, write_split
from allspark_cli.errors import DataError


def make_manifest(root: Path, **changes) -> DatasetManifest:
    fields = dict(
        name="toy",
        root=root,
        classes=["background", "thing"],
        palette=[(0, 0, 0), (128, 0, 0)],
        train_splits={
            "1/2": TrainSplit(labeled="splits/l.txt", unlabeled="splits/u.txt"),
            "full": TrainSplit(labeled="splits/all.txt"),
        },
        eval_splits={"val": "splits/val.txt"},
        train_crop=64,
    )
    fields.update(changes)
    return DatasetManifest(**fields)


def test_round_trip_stores_root_relative_and_loads_it_absolute(tmp_path):
    manifest = make_manifest(tmp_path)
    write_manifest(manifest, tmp_path / "dataset.yaml")
    raw = yaml.safe_load((tmp_path / "dataset.yaml").read_text())
    assert raw["root"] == "."
    loaded = load_manifest(tmp_path)  # the folder works as well as the file
    assert loaded == manifest
    assert loaded.num_classes == 2
    assert loaded.split_file("val") == tmp_path / "splits/val.txt"
    assert loaded.split_file("splits/l.txt") == tmp_path / "splits/l.txt"
    assert loaded.train_split("full").unlabeled is None


def test_moved_dataset_folder_still_loads(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    write_manifest(make_manifest(data / "images"), data / "dataset.yaml")
    assert yaml.safe_load((data / "dataset.yaml").read_text())["root"] == "images"
    moved = tmp_path / "moved"
    data.rename(moved)
    assert load_manifest(moved / "dataset.yaml").root == moved / "images"


def test_root_outside_the_yaml_folder_is_stored_absolute(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    write_manifest(make_manifest(tmp_path / "elsewhere"), tmp_path / "out" / "dataset.yaml")
    raw = yaml.safe_load((tmp_path / "out" / "dataset.yaml").read_text())
    assert raw["root"] == (tmp_path / "elsewhere").as_posix()
    assert load_manifest(tmp_path / "out").root == tmp_path / "elsewhere"


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"palette": [[0, 0, 0]]}, "palette: expected one colour per class"),
        ({"palette": [[0, 0, 0], [0, 0, 300]]}, "palette"),
        ({"eval_splits": {"test": "t.txt"}}, "eval_splits: a 'val' split is required"),
        ({"eval_mode": "slide", "eval_crop": 64}, "eval_stride: required"),
        ({"eval_mode": "fancy"}, "eval_mode"),
        ({"ignore_index": 1}, "ignore_index: must not be a class id"),
        ({"train_crop": 0}, "train_crop"),
        ({"classes": ["a", "a"], "palette": [[0, 0, 0], [1, 1, 1]]}, "classes: class names must be unique"),
        ({"colour": "red"}, "unknown key 'colour'"),
        ({"root": "missing-folder"}, "root: dataset root folder does not exist"),
    ],
)
def test_invalid_manifest_names_file_and_field(tmp_path, change, fragment):
    raw = make_manifest(tmp_path).model_dump(mode="json") | {"root": "."}
    raw.update(change)
    path = tmp_path / "dataset.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(DataError) as error:
        load_manifest(path)
    assert str(path) in str(error.value)
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("name: [unclosed", "not a readable YAML file"), ("- a\n- b\n", "expected a mapping")],
)
def test_unreadable_manifest(tmp_path, text, fragment):
    path = tmp_path / "dataset.yaml"
    path.write_text(text)
    with pytest.raises(DataError, match=fragment):
        load_manifest(path)


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match="dataset manifest not found"):
        load_manifest(tmp_path)


def test_unknown_split_names_list_the_available_ones(tmp_path):
    manifest = make_manifest(tmp_path)
    with pytest.raises(DataError, match=r"no training split '1/8'; available: 1/2, full"):
        manifest.train_split("1/8")
    with pytest.raises(DataError, match=r"no evaluation split 'test'; available: val"):
        manifest.eval_split_file("test")


def test_read_split_two_and_one_columns(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("a/1.jpg m/1.png\n\n  b/2.jpg   m/2.png  \nc/3.jpg\n")
    assert read_split(path) == [
        SplitEntry("a/1.jpg", "m/1.png"),
        SplitEntry("b/2.jpg", "m/2.png"),
        SplitEntry("c/3.jpg", None),
    ]


def test_write_split_round_trip(tmp_path):
    entries = [SplitEntry("a.jpg", "a.png"), SplitEntry("b.jpg", None)]
    write_split(tmp_path / "s" / "list.txt", entries)
    assert read_split(tmp_path / "s" / "list.txt") == entries
    with pytest.raises(DataError, match="white space"):
        format_split([SplitEntry("my image.jpg", None)])


@pytest.mark.parametrize(
    ("text", "require_mask", "fragment"),
    [
        ("", False, "split file is empty"),
        ("\n  \n", False, "split file is empty"),
        ("a.jpg a.png\nb.jpg b.png extra\n", False, ":2: expected 'image_path [mask_path]', got 3 columns"),
        ("a.jpg a.png\n/abs/b.jpg b.png\n", False, ":2: paths must be relative"),
        ("a.jpg a.png\nb.jpg\n", True, ":2: this split needs a mask column"),
    ],
)
def test_bad_split_files_name_file_and_line(tmp_path, text, require_mask, fragment):
    path = tmp_path / "list.txt"
    path.write_text(text)
    with pytest.raises(DataError) as error:
        read_split(path, require_mask=require_mask)
    assert str(path) in str(error.value)
    assert fragment in str(error.value)


def test_missing_split_file(tmp_path):
    with pytest.raises(DataError, match="split file not found"):
        read_split(tmp_path / "nope.txt")

