"""Your own data as a user brings it: `prepare custom` -> `train --data` with
no preset (crop and split from the dataset, run folder named after it), `--exist-ok` that never
mixes two runs, manifest typos and missing lists named, and phone photos with an EXIF
Orientation tag read as displayed by `prepare custom`, training and `predict`."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageOps
from typer.testing import CliRunner

from allspark_cli.cli.app import app
from allspark_cli.data.datasets import build_eval_dataset, build_train_datasets
from allspark_cli.data.imageio import read_image
from allspark_cli.data.manifest import load_manifest
from allspark_cli.errors import DataError
from allspark_cli.model.checkpoint import save_checkpoint
from allspark_cli.model.config import ModelConfig, build_model, tokens_for_crop
from data_tools.custom import prepare_custom
from train_fixtures import make_dataset, tiny_layer

torch.set_num_threads(1)
runner = CliRunner()
CLASSES = ["background", "leaf"]
PHONE_H, PHONE_W = 96, 128  # small phone-like photos: landscape 4:3
ORIENTATION_TAG = 0x0112
TURNED = 6  # EXIF: the stored pixels are shown turned a quarter clockwise


def _jpeg(pixels: np.ndarray, orientation: int | None = None) -> bytes:
    image = Image.fromarray(pixels)
    exif = image.getexif()
    if orientation is not None:
        exif[ORIENTATION_TAG] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def make_photos(root: Path, count: int = 20, *, turned: int = 0, mask_as_stored: bool = False) -> dict[str, Path]:
    """`count` 96x128 photos with masks; the first `turned` carry EXIF orientation 6 and their masks
    are drawn on the image as displayed (128x96) unless `mask_as_stored`."""
    folders = {key: root / key for key in ("images", "masks")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 120, (PHONE_H, PHONE_W, 3), dtype=np.uint8)
        mask = np.zeros((PHONE_H, PHONE_W), dtype=np.uint8)
        mask[10:40, 20:90] = 1
        pixels[mask == 1] = (40, 200, 40)
        tagged = index < turned
        (folders["images"] / f"p{index:02d}.jpg").write_bytes(_jpeg(pixels, TURNED if tagged else None))
        if tagged and not mask_as_stored:
            mask = np.rot90(mask, -1)  # the mask as the user drew it on the image as shown
        Image.fromarray(np.ascontiguousarray(mask)).save(folders["masks"] / f"p{index:02d}.png")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    folders["classes"] = root / "classes.txt"
    return folders


def _ok(argv: list[str]) -> str:
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, f"{argv}: {result.output}"
    return result.output


# --- 1. prepare custom -> train --data, no preset -------------------------------------------------

@pytest.mark.parametrize(("shorter_sides", "crop"), [([96, 96, 100], 96), ([700, 800, 900], 513), ([20, 24, 30], 32),
                                                     ([300, 330, 1000], 320)])
def test_the_crop_follows_the_images(shorter_sides: list[int], crop: int) -> None:
    from data_tools.custom import train_crop_for

    assert train_crop_for(shorter_sides) == crop


def test_prepare_custom_records_a_crop_from_the_image_sizes(tmp_path: Path) -> None:
    photos = make_photos(tmp_path)
    prepare_custom(photos["images"], photos["masks"], photos["classes"], tmp_path / "mine", workers=1)
    assert load_manifest(tmp_path / "mine").train_crop == 96  # not 513 for 96x128 images


@pytest.mark.parametrize("ratios", [["1/8", "1/4"], ["1/8,1/4"]])
def test_prepare_custom_writes_every_ratio_asked_for_nested(tmp_path: Path, ratios: list[str]) -> None:
    photos = make_photos(tmp_path)
    argv = ["prepare", "custom", "--images", str(photos["images"]), "--masks", str(photos["masks"]),
            "--classes", str(photos["classes"]), "--out", str(tmp_path / "mine"), "--workers", "1"]
    output = _ok([*argv, *[arg for ratio in ratios for arg in ("--ratio", ratio)]])
    manifest = load_manifest(tmp_path / "mine")
    assert list(manifest.train_splits) == ["1/8", "1/4", "full"]
    eighth, quarter = (set((manifest.root / manifest.train_splits[name].labeled).read_text().splitlines())
                       for name in ("1/8", "1/4"))
    assert len(eighth) == 3 and len(quarter) == 5 and eighth < quarter  # ceil(18/8), ceil(18/4); nested
    assert f"next: allspark train --data {tmp_path / 'mine'} --split 1/8" in output
    assert f"next: allspark train --data {tmp_path / 'mine'} --split 1/4" in output


def test_train_with_data_alone_uses_the_custom_recipe_and_the_datasets_crop_and_split(tmp_path: Path) -> None:
    photos = make_photos(tmp_path)
    output = _ok(["prepare", "custom", "--images", str(photos["images"]), "--masks", str(photos["masks"]),
                  "--classes", str(photos["classes"]), "--out", str(tmp_path / "mine"), "--workers", "1"])
    assert f"next: allspark train --data {tmp_path / 'mine'} --split 1/8" in output
    _ok(["train", "--data", str(tmp_path / "mine"), "--epochs", "1", "--device", "cpu", "--workers", "0",
         "--set", "train.epoch_iterations=1", "--set", f"run.root={tmp_path / 'runs'}", "--set", "run.tensorboard='off'"])
    run = tmp_path / "runs" / "mine-1_8" / "exp"  # named after the dataset and its split
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["preset"] is None and saved["model"]["backbone"] == "b0"  # the demo's CPU-sized recipe
    assert (saved["data"]["split"], saved["data"]["crop"]) == ("1/8", 96)
    assert (run / "weights" / "best.pt").is_file()


def test_several_splits_need_a_choice_listed_in_the_error(tmp_path: Path) -> None:
    photos = make_photos(tmp_path)
    prepare_custom(photos["images"], photos["masks"], photos["classes"], tmp_path / "mine", ratio=["1/8", "1/4"],
                   workers=1)
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "mine"), "--set", f"run.root={tmp_path / 'runs'}"])
    assert result.exit_code == 2, result.output
    assert "several training splits (1/8, 1/4, full)" in result.output and "--split" in result.output
    assert not (tmp_path / "runs").exists()


def test_nothing_to_train_names_data_first() -> None:
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 2 and "give --data DATASET" in result.output


# --- 2. run folders named after the dataset as well as the recipe ----------------------------------

@pytest.mark.parametrize(("preset", "dataset", "split", "group"), [
    (None, "mine", "1/8", "mine-1_8"),
    ("pascal-1/8", "pascal", "183", "pascal-1_8"),
    ("pascal-aug-1/16", "pascal", "aug-1/16", "pascal-aug-1_16"),
    ("demo-1/16", "demo", "1/16", "demo-1_16"),
    ("demo-1/16", "mine", "1/8", "mine-1_8-demo-1_16"),
    ("demo-1/16", "demo-signs", "1/16", "demo-signs-1_16-demo-1_16"),
])
def test_run_group_rule(preset: str | None, dataset: str, split: str, group: str) -> None:
    from allspark_cli.engine.training.rundir import run_group

    assert run_group(preset, dataset, split) == group


# --- 3. --exist-ok never mixes two runs ------------------------------------------------------------

def test_exist_ok_starts_from_a_clean_folder_and_keeps_your_files(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path / "data")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_layer(manifest, tmp_path / "runs", run={"tensorboard": "auto"})))
    argv = ["train", "--config", str(config), "--name", "again", "--exist-ok"]
    _ok(argv)
    run = tmp_path / "runs" / "tiny" / "again"
    (run / "notes.txt").write_text("mine")
    _ok([*argv, "--seed", "1"])
    log = (run / "train.log").read_text()
    assert log.count("seed 0") == 0 and "removed" in log  # only the second run's lines
    iterations = [yaml.safe_load(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert iterations == sorted(set(iterations))
    assert len((run / "results.csv").read_text().splitlines()) == 2  # header + the one evaluation
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) <= 1
    assert (run / "notes.txt").read_text() == "mine"


# --- 4. a manifest's typo and a missing list are named ---------------------------------------------

def test_unknown_manifest_key_suggests_the_field(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path / "data")
    manifest.write_text(manifest.read_text().replace("classes:", "clases:"))
    with pytest.raises(DataError, match=r"unknown key 'clases' \(did you mean 'classes'\?\)"):
        load_manifest(manifest)


def test_a_missing_split_list_names_the_field_the_path_and_prepare_check(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path / "data")
    (tmp_path / "data" / "splits" / "half" / "labeled.txt").unlink()
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_layer(manifest, tmp_path / "runs")))
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 3, result.output
    line = " ".join(result.output.split())
    assert "train_splits.half.labeled" in line and "allspark prepare check" in line
    assert f"not found: {tmp_path / 'data' / 'splits' / 'half' / 'labeled.txt'}" in line


# --- 5. phone photos: EXIF orientation ------------------------------------------------------------

@pytest.mark.parametrize("orientation", range(1, 9))
def test_read_image_as_displayed_matches_pillows_exif_transpose(tmp_path: Path, orientation: int) -> None:
    pixels = np.random.default_rng(orientation).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    path = tmp_path / "photo.jpg"
    path.write_bytes(_jpeg(pixels, orientation))
    displayed = np.array(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert np.array_equal(read_image(path, exif_orientation=True), displayed)
    assert read_image(path).shape == (16, 24, 3)  # benchmark datasets: the stored pixels


def test_prepare_custom_reads_phone_photos_as_displayed(tmp_path: Path) -> None:
    photos = make_photos(tmp_path, turned=20)
    summary = prepare_custom(photos["images"], photos["masks"], photos["classes"], tmp_path / "mine", workers=1)
    assert any("EXIF orientation" in note for note in summary.notes)
    manifest = load_manifest(tmp_path / "mine")
    image, mask, _ = build_eval_dataset(manifest)[0]
    assert tuple(image.shape[1:]) == tuple(mask.shape) == (PHONE_W, PHONE_H)  # as displayed, and aligned
    labeled = build_train_datasets(manifest, "1/8", seed=0).labeled
    image, mask = labeled[0]
    assert mask[mask != 255].sum() > 0  # the leaf survives the crop: image and mask were read alike


def test_a_mask_in_the_stored_orientation_of_a_turned_photo_is_named(tmp_path: Path) -> None:
    photos = make_photos(tmp_path, turned=1, mask_as_stored=True)
    with pytest.raises(DataError, match="p00.jpg has EXIF orientation 6") as error:
        prepare_custom(photos["images"], photos["masks"], photos["classes"], tmp_path / "mine", workers=1)
    assert "stored size 128x96" in str(error.value)


def test_predict_writes_masks_in_the_displayed_orientation(tmp_path: Path) -> None:
    config = ModelConfig(backbone="b0", method="sup", num_classes=2, head_dim=16, memory_tokens=tokens_for_crop(64))
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, build_model(config), class_names=CLASSES, palette=[(0, 0, 0), (0, 200, 0)],
                    settings={"data": {"crop": 64}})
    (tmp_path / "in").mkdir()
    pixels = np.zeros((PHONE_H, PHONE_W, 3), dtype=np.uint8)
    (tmp_path / "in" / "phone.jpg").write_bytes(_jpeg(pixels, TURNED))
    _ok(["predict", str(checkpoint), str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--workers", "0",
         "--save", "mask"])
    with Image.open(tmp_path / "out" / "masks" / "phone.png") as mask:
        assert mask.size == (PHONE_H, PHONE_W)  # width x height of the photo as shown: portrait
