"""The built-in demo dataset: layout, masks, determinism by seed, resuming, and a clean check."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from allspark_cli.data.check import check_dataset
from allspark_cli.data.datasets import build_eval_dataset, build_train_datasets
from allspark_cli.data.manifest import load_manifest
from allspark_cli.data.splits import read_split
from allspark_cli.errors import DataError, SettingsError
from data_tools.demo import DEMO_CLASSES, DEMO_TRAIN_CROP, SHAPES_HUES, build_demo, render_sample
from data_tools.demo_scene import HUE_RANGE

NUM_TRAIN, NUM_VAL, SIZE = 64, 12, (64, 96)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo")
    return build_demo(out_dir, seed=3, num_train=NUM_TRAIN, num_val=NUM_VAL, size=SIZE, workers=2)


def test_layout_and_manifest(demo):
    manifest = load_manifest(demo)
    assert demo.name == "dataset.yaml" and manifest.root == demo.parent
    assert manifest.classes == list(DEMO_CLASSES) and manifest.num_classes >= 6
    assert manifest.train_crop == DEMO_TRAIN_CROP and manifest.eval_mode == "whole"
    assert list(manifest.train_splits) == ["1/16", "1/8", "1/4", "1/2", "full"]
    expected_labeled = {"1/16": 4, "1/8": 8, "1/4": 16, "1/2": 32, "full": NUM_TRAIN}
    previous: set[str] = set()
    for name, split in manifest.train_splits.items():
        labeled = {e.image for e in read_split(manifest.split_file(split.labeled), require_mask=True)}
        assert len(labeled) == expected_labeled[name]
        assert previous <= labeled  # nested: every 1/16 image is also in 1/8, ...
        previous = labeled
        if split.unlabeled is None:
            assert name == "full"
            continue
        unlabeled = {e.image for e in read_split(manifest.split_file(split.unlabeled))}
        assert not labeled & unlabeled and len(labeled | unlabeled) == NUM_TRAIN
    assert len(read_split(manifest.split_file("val"))) == NUM_VAL


def test_masks_are_palette_pngs_matching_their_images(demo):
    manifest = load_manifest(demo)
    seen: set[int] = set()
    for entry in read_split(manifest.split_file(manifest.train_splits["full"].labeled)):
        with Image.open(manifest.root / entry.mask) as mask, Image.open(manifest.root / entry.image) as image:
            assert mask.mode == "P" and image.format == "JPEG" and image.mode == "RGB"
            assert mask.size == image.size
            assert all(SIZE[0] <= side <= SIZE[1] for side in image.size)
            seen |= set(np.unique(np.array(mask)).tolist())
    assert seen == set(range(len(DEMO_CLASSES)))  # every class occurs, no other value


def test_passes_the_full_check(demo):
    report = check_dataset(demo, workers=1)
    assert report.ok, report.problems[:5]
    share = report.stats["train"].pixel_share
    assert 0.5 < share[0] < 0.95  # background dominates but objects are a real part of the image
    assert (share[1:] > 0.005).all()


def test_same_seed_same_bytes_other_seed_other_images(demo, tmp_path):
    again = build_demo(tmp_path / "again", seed=3, num_train=NUM_TRAIN, num_val=NUM_VAL, size=SIZE, workers=1)
    files = sorted(p.relative_to(demo.parent) for p in demo.parent.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again.parent) for p in again.parent.rglob("*") if p.is_file())
    for relpath in files:  # 2 workers and 1 worker give identical bytes
        assert (again.parent / relpath).read_bytes() == (demo.parent / relpath).read_bytes(), relpath
    image_a, mask_a = render_sample(3, "train", 5, SIZE)
    image_b, mask_b = render_sample(4, "train", 5, SIZE)
    assert image_a.shape != image_b.shape or not np.array_equal(image_a, image_b)
    assert not np.array_equal(render_sample(3, "val", 5, SIZE)[1], mask_a)  # val is not a copy of train


def _object_pixels_hsv(count: int):
    """(hsv pixels, class ids) of every object pixel, and the HSV of the background pixels."""
    objects, classes, background = [], [], []
    for index in range(count):
        image, mask = render_sample(0, "train", index, (96, 96))
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        objects.append(hsv[mask > 0])
        classes.append(mask[mask > 0])
        background.append(hsv[mask == 0])
    return np.concatenate(objects), np.concatenate(classes), np.concatenate(background)


def test_objects_stand_out_but_colour_does_not_settle_the_class():
    """Objects are saturated and the background muted (findable from scratch on a CPU); the hue
    hints at the class, but the bands overlap, so colour alone misclassifies many object pixels."""
    objects, classes, background = _object_pixels_hsv(40)
    assert objects[:, 1].mean() > background[:, 1].mean() + 60  # saturation, 0..255
    hue = objects[:, 0].astype(int)
    base = np.arange(1, len(DEMO_CLASSES)) * SHAPES_HUES.spacing + SHAPES_HUES.offset
    distance = np.abs(hue[:, None] - base[None, :])
    distance = np.minimum(distance, HUE_RANGE - distance)  # hue is circular
    by_colour = distance.argmin(axis=1) + 1
    accuracy = (by_colour == classes).mean()
    assert 1 / (len(DEMO_CLASSES) - 1) < accuracy < 0.9


def test_resume_rewrites_only_missing_files(demo, tmp_path):
    out = tmp_path / "resume"
    build_demo(out, seed=1, num_train=8, num_val=2, size=SIZE, workers=1)
    victim = out / "images/train/000002.jpg"
    original = victim.read_bytes()
    untouched = out / "masks/train/000003.png"
    stamp = untouched.stat().st_mtime_ns
    victim.unlink()
    (out / "dataset.yaml").unlink()
    build_demo(out, seed=1, num_train=8, num_val=2, size=SIZE, workers=1)
    assert victim.read_bytes() == original
    assert untouched.stat().st_mtime_ns == stamp
    assert load_manifest(out).num_classes == len(DEMO_CLASSES)


def test_refuses_folders_it_did_not_build(tmp_path):
    build_demo(tmp_path / "a", seed=1, num_train=8, num_val=2, size=SIZE, workers=1)
    with pytest.raises(DataError, match="built with other parameters"):
        build_demo(tmp_path / "a", seed=2, num_train=8, num_val=2, size=SIZE, workers=1)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        build_demo(tmp_path / "b", num_train=8, num_val=2, size=SIZE)


def test_training_views_load(demo):
    manifest = load_manifest(demo)
    labeled, unlabeled = build_train_datasets(manifest, "1/16", seed=0)
    assert len(labeled) == len(unlabeled) == NUM_TRAIN - 4
    image, mask = labeled[0]
    assert image.shape == (3, DEMO_TRAIN_CROP, DEMO_TRAIN_CROP) and mask.shape == (DEMO_TRAIN_CROP,) * 2
    full_labeled, no_unlabeled = build_train_datasets(manifest, "full", crop=32, seed=0)
    assert no_unlabeled is None and len(full_labeled) == NUM_TRAIN and full_labeled[0][1].shape == (32, 32)
    image, mask, relpath = build_eval_dataset(manifest, "val")[0]
    assert image.shape[1:] == mask.shape and relpath == "images/val/000000.jpg"


def test_signs_family_is_a_different_dataset_in_the_same_layout(tmp_path):
    """`prepare demo --family signs`: the second family (4 classes, other shapes and textures) builds
    in the demo's layout, passes the check, and a shapes folder is never completed with signs images."""
    from data_tools.demo_signs import SIGNS_CLASSES, render_signs_sample

    out = build_demo(tmp_path / "signs", seed=3, num_train=48, num_val=4, size=SIZE, family="signs", workers=1)
    manifest = load_manifest(out)
    assert manifest.name == "demo-signs" and manifest.classes == list(SIGNS_CLASSES) and manifest.num_classes == 5
    assert check_dataset(out, workers=1).ok
    seen = set()
    for entry in read_split(manifest.split_file(manifest.train_splits["full"].labeled)):
        seen |= set(np.unique(np.array(Image.open(manifest.root / entry.mask))).tolist())
    assert seen == set(range(len(SIGNS_CLASSES)))
    image, mask = render_signs_sample(3, "train", 5, SIZE)
    assert not np.array_equal(mask, render_sample(3, "train", 5, SIZE)[1])
    assert np.array_equal(image, render_signs_sample(3, "train", 5, SIZE)[0])  # a pure function of its arguments
    build_demo(tmp_path / "shapes", seed=3, num_train=8, num_val=2, size=SIZE, workers=1)
    with pytest.raises(DataError, match="built with other parameters"):
        build_demo(tmp_path / "shapes", seed=3, num_train=8, num_val=2, size=SIZE, family="signs", workers=1)
    with pytest.raises(SettingsError, match="unknown demo family 'leaves'; expected one of shapes, signs"):
        build_demo(tmp_path / "other", num_train=8, num_val=2, size=SIZE, family="leaves")
    assert not (tmp_path / "other").exists()
