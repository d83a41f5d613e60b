"""`data_tools.coco`: 81-class style masks from polygons, RLE and crowd, splits, resumption, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from allspark_cli.data.manifest import load_manifest
from allspark_cli.data.splits import read_split
from allspark_cli.errors import DataError, SettingsError
from data_tools.coco import prepare_coco

HEIGHT, WIDTH = 20, 24
# Category ids are sparse and listed out of order on purpose: indices follow ascending id.
CATEGORIES = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
PERSON, CAR, DOG = 1, 2, 3


def _rle(region: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(region.astype(np.uint8)))
    return {"counts": rle["counts"].decode("ascii"), "size": rle["size"]}


def _box(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    region = np.zeros((HEIGHT, WIDTH), np.uint8)
    region[top:bottom, left:right] = 1
    return region


def make_coco(tmp_path: Path, train: int = 8, val: int = 2) -> tuple[Path, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A COCO root; image 0 of train carries a polygon, an RLE over it, and a crowd RLE.

    Returns the expected masks with crowd as background and with crowd ignored, per file stem.
    """
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    expected_bg, expected_ignore = {}, {}
    next_id = 0
    for image_set, count, offset in (("train2017", train, 0), ("val2017", val, 1000)):
        (root / image_set).mkdir()
        images, annotations = [], []
        for index in range(count):
            image_id = offset + index + 1
            stem = f"{image_id:012d}"
            pixels = np.random.default_rng(image_id).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / image_set / f"{stem}.jpg")
            images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": HEIGHT, "width": WIDTH})
            mask = np.zeros((HEIGHT, WIDTH), np.uint8)
            if index == 0:
                polygon = [2.0, 2.0, 14.0, 2.0, 14.0, 12.0, 2.0, 12.0]  # a box, painted first (person)
                person = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], HEIGHT, WIDTH)))
                car = _box(8, 8, 18, 20)  # overlaps the person: painted later, wins
                crowd = _box(0, 18, 6, 24)
                for category, segmentation, iscrowd in ((1, [polygon], 0), (3, _rle(car), 0), (18, _rle(crowd), 1)):
                    next_id += 1
                    annotations.append({"id": next_id, "image_id": image_id, "category_id": category,
                                        "segmentation": segmentation, "iscrowd": iscrowd, "area": 1.0, "bbox": [0, 0, 1, 1]})
                mask[person.astype(bool)] = PERSON
                mask[car.astype(bool)] = CAR
                ignore = mask.copy()
                ignore[crowd.astype(bool)] = 255
            elif index == 1:  # uncompressed RLE (counts as a list)
                region = _box(5, 5, 10, 10)
                counts, flat, current, run = [], region.flatten(order="F"), 0, 0
                for value in flat:
                    if value != current:
                        counts.append(run)
                        current, run = value, 0
                    run += 1
                counts.append(run)
                next_id += 1
                annotations.append({"id": next_id, "image_id": image_id, "category_id": 18,
                                    "segmentation": {"counts": counts, "size": [HEIGHT, WIDTH]}, "iscrowd": 0})
                mask[region.astype(bool)] = DOG
                ignore = mask
            else:
                ignore = mask  # no annotations: all background
            expected_bg[stem], expected_ignore[stem] = mask, ignore
        content = {"images": images, "annotations": annotations, "categories": CATEGORIES}
        (root / "annotations" / f"instances_{image_set}.json").write_text(json.dumps(content))
    return root, expected_bg, expected_ignore


@pytest.mark.parametrize("crowd", ["background", "ignore"])
def test_masks_pixel_by_pixel(tmp_path: Path, crowd: str) -> None:
    root, expected_bg, expected_ignore = make_coco(tmp_path)
    out = tmp_path / "out"
    summary = prepare_coco(root, out, crowd=crowd, workers=1)
    expected = expected_bg if crowd == "background" else expected_ignore
    assert summary.masks_written == len(expected)
    for stem, mask in expected.items():
        np.testing.assert_array_equal(np.array(Image.open(out / "masks" / f"{stem}.png")), mask, err_msg=stem)


def test_splits_and_manifest(tmp_path: Path) -> None:
    root, _, _ = make_coco(tmp_path, train=40, val=3)
    out = tmp_path / "out"
    summary = prepare_coco(root, out, seed=0, workers=1)
    manifest = load_manifest(out)
    assert manifest.classes == ["background", "person", "car", "dog"]
    assert list(manifest.train_splits) == ["1/512", "1/256", "1/128", "1/64", "1/32"]
    assert [summary.split_sizes[name] for name in manifest.train_splits] == [(1, 39)] * 4 + [(2, 38)]  # ceil(40 * r)
    labeled = read_split(manifest.root / manifest.train_splits["1/32"].labeled, require_mask=True)
    assert labeled[0].image.startswith("train2017/") and labeled[0].mask.startswith("masks/")
    val = read_split(manifest.eval_split_file("val"), require_mask=True)
    assert [e.image for e in val] == [f"val2017/{i:012d}.jpg" for i in (1001, 1002, 1003)]
    assert all((manifest.root / e.mask).is_file() and (manifest.root / e.image).is_file() for e in val)


def test_resume_is_identical(tmp_path: Path) -> None:
    root, _, _ = make_coco(tmp_path)
    out = tmp_path / "out"
    prepare_coco(root, out, workers=1)
    files = {p: p.read_bytes() for p in sorted((out / "masks").glob("*.png"))}
    summary = prepare_coco(root, out, workers=2)
    assert (summary.masks_written, summary.masks_skipped) == (0, len(files))
    assert {p: p.read_bytes() for p in files} == files


@pytest.mark.parametrize("case", ["corrupt jpeg", "size mismatch", "bad segmentation", "bad json", "missing json"])
def test_bad_input(tmp_path: Path, case: str) -> None:
    root, _, _ = make_coco(tmp_path)
    json_path = root / "annotations" / "instances_train2017.json"
    content = json.loads(json_path.read_text())
    name = "000000000003.jpg"
    if case == "corrupt jpeg":
        (root / "train2017" / name).write_bytes(b"\xff\xd8 not a jpeg")
    elif case == "size mismatch":
        content["images"][2]["height"] = HEIGHT + 4
        json_path.write_text(json.dumps(content))
    elif case == "bad segmentation":
        content["annotations"][0]["segmentation"] = [[1.0, "x"]]
        json_path.write_text(json.dumps(content))
        name = "000000000001.jpg"
    elif case == "bad json":
        json_path.write_text("{not json")
        name = json_path.name
    else:
        json_path.unlink()
        name = json_path.name
    with pytest.raises(DataError) as error:
        prepare_coco(root, tmp_path / "out", workers=1)
    assert name in str(error.value)
    assert not (tmp_path / "out" / "dataset.yaml").exists() and not (tmp_path / "out" / "splits").exists()
    masks = sorted((tmp_path / "out" / "masks").glob("*.png")) if (tmp_path / "out").exists() else []
    if case in ("bad json", "missing json"):  # found before any conversion
        assert not (tmp_path / "out").exists()
    else:  # every other mask was converted correctly and is kept
        assert len(masks) == 8 + 2 - 1 and name.replace(".jpg", ".png") not in {mask.name for mask in masks}


def test_rerun_with_another_crowd_mode_is_refused_or_rebuilt(tmp_path: Path) -> None:
    root, _, expected_ignore = make_coco(tmp_path)
    out = tmp_path / "out"
    prepare_coco(root, out, workers=1)
    assert load_manifest(out).mask_options == {"crowd": "background"}
    before = {p.name: p.read_bytes() for p in (out / "masks").glob("*.png")}
    with pytest.raises(SettingsError, match=r"10 masks in .*masks were made with other options \(crowd 'background' -> 'ignore'\).*--overwrite"):
        prepare_coco(root, out, crowd="ignore", workers=1)
    assert {p.name: p.read_bytes() for p in (out / "masks").glob("*.png")} == before  # nothing touched
    summary = prepare_coco(root, out, crowd="ignore", overwrite=True, workers=1)
    assert summary.masks_written == len(expected_ignore)
    for stem, mask in expected_ignore.items():
        np.testing.assert_array_equal(np.array(Image.open(out / "masks" / f"{stem}.png")), mask)
    assert load_manifest(out).mask_options == {"crowd": "ignore"}
    assert prepare_coco(root, out, crowd="ignore", workers=1).masks_skipped == len(expected_ignore)


def test_masks_without_a_record_are_not_trusted(tmp_path: Path) -> None:
    root, _, _ = make_coco(tmp_path)
    out = tmp_path / "out"
    prepare_coco(root, out, workers=1)
    (out / "masks" / ".allspark-masks.json").unlink()  # as built by a version that recorded nothing
    with pytest.raises(SettingsError, match="have no record of the options"):
        prepare_coco(root, out, workers=1)


@pytest.mark.parametrize("inside", ["", "prepared", "train2017/sub"])
def test_out_inside_the_coco_root_is_refused(tmp_path: Path, inside: str) -> None:
    root, _, _ = make_coco(tmp_path)
    before = sorted(root.rglob("*"))
    with pytest.raises(SettingsError, match="inside the source folder --root"):
        prepare_coco(root, root / inside, workers=1)
    assert sorted(root.rglob("*")) == before


def test_unknown_image_id_and_shared_file_names_are_named(tmp_path: Path) -> None:
    root, _, _ = make_coco(tmp_path)
    json_path = root / "annotations" / "instances_train2017.json"
    content = json.loads(json_path.read_text())
    content["annotations"][0]["image_id"] = 999
    json_path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=r"annotation 1 has image_id 999, which no entry"):
        prepare_coco(root, tmp_path / "out", workers=1)
    content["annotations"][0]["image_id"] = 1
    content["images"][0]["file_name"] = "000000001001.jpg"  # the name of the first val image
    (root / "train2017" / "000000000001.jpg").rename(root / "train2017" / "000000001001.jpg")
    json_path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=r"share a file name stem.*train2017/000000001001.jpg and val2017/000000001001.jpg"):
        prepare_coco(root, tmp_path / "out", workers=1)
