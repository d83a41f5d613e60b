"""Predictor and predict_folder: mixed formats and sizes, corrupt files, resume, batching, palette."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from allspark_cli.engine.inference.predict import Predictor
from allspark_cli.engine.inference.predict_folder import predict_folder
from allspark_cli.engine.inference.sources import collect_images, output_stems
from allspark_cli.errors import DataError, SettingsError
from allspark_cli.model.checkpoint import save_checkpoint
from allspark_cli.model.config import ModelConfig, build_model, tokens_for_crop

CLASSES = ["background", "road", "tree"]
PALETTE = [(10, 20, 30), (200, 0, 0), (0, 200, 0)]
CROP = 64

torch.set_num_threads(1)


def make_checkpoint(path: Path, settings: dict | None = None) -> Path:
    config = ModelConfig(backbone="b0", method="allspark", num_classes=3, head_dim=32, memory_tokens=tokens_for_crop(CROP))
    torch.manual_seed(0)
    save_checkpoint(path, build_model(config), class_names=CLASSES, palette=PALETTE,
                    settings=settings if settings is not None else {"data": {"crop": CROP}})
    return path


def _image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def make_tree(root: Path) -> dict[str, tuple[int, int]]:
    """Images in nested folders, five formats, three sizes, plus a corrupt JPEG and a text file."""
    rng = np.random.default_rng(0)
    files = {
        "a.jpg": (40, 56), "b.png": (40, 56), "sub/c.bmp": (40, 56),
        "sub/deep/d.tiff": (64, 48), "sub/e.webp": (64, 48), "f.png": (33, 90),
    }
    for relpath, (height, width) in files.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        _image(rng, height, width).save(root / relpath)
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole jpeg")
    (root / "notes.txt").write_text("not an image, not collected")
    return files


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


def test_folder_tree_outputs_shapes_palette_and_counts(checkpoint, tmp_path) -> None:
    files = make_tree(tmp_path / "in")
    before = _digest(tmp_path / "in")
    predictor = Predictor(checkpoint, device="cpu", batch_size=2)
    summary = predict_folder(predictor, [str(tmp_path / "in")], tmp_path / "out")
    assert (summary.found, summary.predicted, summary.skipped) == (7, 6, 0)
    assert [Path(path).name for path, _ in summary.failed] == ["broken.jpg"]
    assert summary.images_per_second > 0
    for relpath, (height, width) in files.items():
        stem = str(Path(relpath).with_suffix(""))
        mask = np.array(Image.open(tmp_path / "out" / "masks" / f"{stem}.png"))
        assert mask.shape == (height, width) and mask.dtype == np.uint8 and mask.max() < len(CLASSES)
        color = Image.open(tmp_path / "out" / "color" / f"{stem}.png")
        assert color.mode == "P"
        np.testing.assert_array_equal(np.array(color), mask)  # palette indices are the class ids
        assert color.getpalette()[:9] == [v for rgb in PALETTE for v in rgb]
        overlay = Image.open(tmp_path / "out" / "overlay" / f"{stem}.jpg")
        assert overlay.size == (width, height) and overlay.mode == "RGB"
    assert _digest(tmp_path / "in") == before  # inputs untouched
    assert not list((tmp_path / "out").rglob(".*tmp*"))


def test_masks_match_the_python_api_and_batching_changes_nothing(checkpoint, tmp_path) -> None:
    make_tree(tmp_path / "in")
    paths = [p for p in sorted((tmp_path / "in").rglob("*")) if p.suffix in {".jpg", ".png", ".bmp", ".tiff", ".webp"}
             and p.name != "broken.jpg"]
    single = Predictor(checkpoint, device="cpu", batch_size=1).predict(paths)
    batched = Predictor(checkpoint, device="cpu", batch_size=4).predict(paths)
    for one, many in zip(single, batched):
        np.testing.assert_array_equal(one, many)
    predict_folder(Predictor(checkpoint, device="cpu", batch_size=3), [str(tmp_path / "in")], tmp_path / "out",
                   save=["mask"])
    for path, mask in zip(paths, single):
        stem = path.relative_to(tmp_path / "in").with_suffix("")
        np.testing.assert_array_equal(np.array(Image.open(tmp_path / "out" / "masks" / f"{stem}.png")), mask)


def test_resume_skips_finished_images_and_overwrite_redoes_them(checkpoint, tmp_path) -> None:
    make_tree(tmp_path / "in")
    predictor = Predictor(checkpoint, device="cpu")
    predict_folder(predictor, [str(tmp_path / "in")], tmp_path / "out", save=["mask", "color"])
    (tmp_path / "out" / "color" / "a.png").unlink()  # an interrupted run lost one output
    again = predict_folder(predictor, [str(tmp_path / "in")], tmp_path / "out", save=["mask", "color"])
    assert (again.predicted, again.skipped, len(again.failed)) == (1, 5, 1)
    assert (tmp_path / "out" / "color" / "a.png").is_file()
    forced = predict_folder(predictor, [str(tmp_path / "in")], tmp_path / "out", save=["mask"], overwrite=True)
    assert (forced.predicted, forced.skipped) == (6, 0)


def test_predictor_on_arrays_auto_mode_and_tta(checkpoint) -> None:
    predictor = Predictor(checkpoint, device="cpu")
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)
    large = rng.integers(0, 256, (70, 2 * CROP + 10, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (40, 40), dtype=np.uint8)
    masks = predictor.predict([small, large, grey])
    assert [m.shape for m in masks] == [(50, 60), (70, 138), (40, 40)]
    assert predictor.mode_for(50, 60) == "whole" and predictor.mode_for(70, 138) == "slide"
    assert Predictor(checkpoint, device="cpu", mode="whole").mode_for(70, 138) == "whole"
    slide_trained = Predictor(make_checkpoint(checkpoint.parent / "s.pt", {"eval": {"mode": "slide", "crop": 48}}), device="cpu")
    assert slide_trained.mode_for(50, 60) == "slide" and slide_trained.crop == 48
    flipped = predictor.predict([small[:, ::-1].copy()])[0]
    tta = Predictor(checkpoint, device="cpu", tta=True)
    np.testing.assert_array_equal(tta.predict([small])[0], tta.predict([small[:, ::-1].copy()])[0][:, ::-1])
    assert flipped.shape == small.shape[:2]
    with pytest.raises(DataError, match="at least 32"):
        predictor.predict([rng.integers(0, 256, (20, 80, 3), dtype=np.uint8)])


def test_predictor_accepts_a_model_object() -> None:
    config = ModelConfig(backbone="b0", method="semi", num_classes=21, head_dim=32)
    predictor = Predictor(build_model(config), device="cpu")
    assert predictor.class_names[1] == "aeroplane"  # K = 21 -> VOC names
    assert predictor.predict([np.zeros((32, 32, 3), np.uint8)])[0].shape == (32, 32)


def test_sources_files_globs_and_prefixes(tmp_path) -> None:
    make_tree(tmp_path / "in")
    (tmp_path / "in2").mkdir()
    _image(np.random.default_rng(2), 40, 40).save(tmp_path / "in2" / "a.jpg")
    images = collect_images([str(tmp_path / "in"), str(tmp_path / "in2"), str(tmp_path / "in" / "a.jpg")])
    relpaths = [image.relpath for image in images]
    assert "in/sub/deep/d.tiff" in relpaths and "in2/a.jpg" in relpaths
    assert len(relpaths) == 8  # in/a.jpg given twice is collected once; notes.txt skipped
    globbed = collect_images([str(tmp_path / "in" / "**" / "*.png")])
    assert sorted(image.relpath for image in globbed) == ["b.png", "f.png"]
    only = collect_images([str(tmp_path / "in" / "sub")])
    assert {image.relpath for image in only} == {"broken.jpg", "c.bmp", "deep/d.tiff", "e.webp"}


def test_same_stem_different_formats_do_not_collide(tmp_path) -> None:
    rng = np.random.default_rng(3)
    _image(rng, 40, 40).save(tmp_path / "x.jpg")
    _image(rng, 40, 40).save(tmp_path / "x.png")
    assert output_stems(collect_images([str(tmp_path)])) == ["x.jpg", "x.png"]


@pytest.mark.parametrize(
    ("sources", "error", "fragment"),
    [
        (["missing_folder"], DataError, "does not exist"),
        (["empty"], DataError, "contains no image"),
        (["*.nothing"], DataError, "matches no image"),
        (["empty/readme.txt"], DataError, "not an image file"),
        ([], SettingsError, "no source"),
    ],
)
def test_bad_sources(sources, error, fragment, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(error, match=fragment):
        collect_images(sources)


def test_output_folder_that_is_a_file_is_refused_before_any_work(checkpoint, tmp_path) -> None:
    make_tree(tmp_path / "in")
    (tmp_path / "out").write_text("occupied")
    with pytest.raises(SettingsError, match="is a file"):
        predict_folder(Predictor(checkpoint, device="cpu"), [str(tmp_path / "in")], tmp_path / "out" / "x")
    with pytest.raises(SettingsError, match="unknown output"):
        predict_folder(Predictor(checkpoint, device="cpu"), [str(tmp_path / "in")], tmp_path / "o", save=["masks"])


def test_overlay_blend_and_legend() -> None:
    from allspark_cli.viz.overlay import blend, overlay_with_legend

    image = np.full((60, 80, 3), 100, np.uint8)
    mask = np.zeros((60, 80), np.uint8)
    mask[:, 40:] = 2
    mask[0, 0] = 255
    np.testing.assert_array_equal(blend(image, mask, PALETTE, 0.0), image)
    colours = blend(image, mask, PALETTE, 1.0)
    assert tuple(colours[30, 70]) == PALETTE[2] and tuple(colours[30, 10]) == PALETTE[0]
    assert tuple(colours[0, 0]) == (100, 100, 100)  # ignore pixels show the image
    half = blend(image, mask, PALETTE, 0.5)
    assert tuple(half[30, 70]) == (50, 150, 50)
    with_legend = overlay_with_legend(image, mask, CLASSES, PALETTE, 0.5)
    assert with_legend.shape == image.shape
    assert not np.array_equal(with_legend[:20, :40], half[:20, :40])  # legend drawn top-left
    np.testing.assert_array_equal(with_legend[40:, 60:], half[40:, 60:])  # the rest untouched


def test_the_overlay_legend_keeps_to_a_small_corner_of_a_small_image() -> None:
    from allspark_cli.viz.overlay import LEGEND_CORNER_SHARE, overlay_with_legend

    names = ["background", "square", "disc", "triangle", "ring", "star", "cross"]
    # No black class: the legend's text is black.
    palette = [(90, 90, 90), (200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (200, 40, 200), (40, 200, 200)]
    for height, width in ((96, 128), (480, 640)):
        image = np.full((height, width, 3), 100, np.uint8)
        mask = (np.arange(width) * len(names) // width)[None].repeat(height, 0).astype(np.uint8)
        changed = (overlay_with_legend(image, mask, names, palette, 0.0) != image).any(axis=-1)
        rows, cols = np.nonzero(changed)
        assert rows.max() < LEGEND_CORNER_SHARE * height and cols.max() < LEGEND_CORNER_SHARE * width
        swatches = sum((changed & (overlay_with_legend(image, mask, names, palette, 0.0) == colour).all(-1)).any()
                       for colour in np.array(palette, np.uint8))
        # A large image shows every class; a small one the first that fits, the rest summed up as "+N".
        assert swatches == (len(names) if height == 480 else 1)
