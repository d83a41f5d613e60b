"""`allspark predict` end to end: folder tree with a corrupt file (exit 3), resume, default output
folder, reference checkpoints, and a table of bad inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from allspark_cli.cli.app import app
from allspark_cli.model.checkpoint import save_checkpoint
from allspark_cli.model.config import ModelConfig, build_model, tokens_for_crop
from allspark_cli.labels import voc_palette

torch.set_num_threads(1)
CROP = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    config = ModelConfig(backbone="b0", method="allspark", num_classes=3, head_dim=32, memory_tokens=tokens_for_crop(CROP))
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, build_model(config), class_names=["bg", "a", "b"], palette=[(1, 2, 3), (4, 5, 6), (7, 8, 9)],
                    settings={"data": {"crop": CROP}})
    return path


def make_images(root: Path, corrupt: bool = True) -> None:
    rng = np.random.default_rng(0)
    for relpath, size in {"x.jpg": (40, 50), "nested/y.png": (36, 36), "nested/z.webp": (40, 50)}.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / relpath)
    if corrupt:
        (root / "nested" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")


def invoke(*args: str):
    return CliRunner().invoke(app, ["predict", *args])


def test_help() -> None:
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    assert "--save" in result.output and "--overwrite" in result.output


def test_folder_with_a_corrupt_file_exits_3_after_predicting_the_rest(checkpoint, tmp_path) -> None:
    make_images(tmp_path / "in")
    result = invoke(str(checkpoint), str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--workers", "0",
                    "--batch-size", "2")
    assert result.exit_code == 3, result.output
    assert "bad.png" in result.output and "1 of 4 images could not be read" in result.output
    assert "3 predicted" in result.output and "images/s" in result.output
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")) == [
        "color/nested/y.png", "color/nested/z.png", "color/x.png",
        "masks/nested/y.png", "masks/nested/z.png", "masks/x.png",
    ]
    again = invoke(str(checkpoint), str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--workers", "0")
    assert "3 already done" in again.output and "0 predicted" in again.output


def test_default_output_folder_is_numbered_and_a_name_resumes(checkpoint, tmp_path) -> None:
    make_images(tmp_path / "in", corrupt=False)
    for _ in range(2):
        result = invoke(str(checkpoint), str(tmp_path / "in" / "x.jpg"), "--save", "mask", "--workers", "0")
        assert result.exit_code == 0, result.output
    assert Path("runs/predict/exp/masks/x.png").is_file() and Path("runs/predict/exp2/masks/x.png").is_file()
    named = [invoke(str(checkpoint), str(tmp_path / "in"), "--name", "mine", "--save", "mask", "--workers", "0")
             for _ in range(2)]
    assert all(r.exit_code == 0 for r in named), named[0].output
    assert "3 already done" in named[1].output


def test_glob_source_and_overlay_only(checkpoint, tmp_path) -> None:
    make_images(tmp_path / "in")
    result = invoke(str(checkpoint), str(tmp_path / "in" / "**" / "*.webp"), "--out", str(tmp_path / "o"),
                    "--save", "overlay", "--opacity", "0.3", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "o").rglob("*.*")] == ["z.jpg"]
    assert (tmp_path / "o" / "overlay" / "nested" / "z.jpg").is_file()


def test_reference_checkpoint_uses_voc_names_and_palette(reference_dir, tmp_path) -> None:
    make_images(tmp_path / "in", corrupt=False)
    result = invoke(str(reference_dir / "reference_ckpt_b0.pth"), str(tmp_path / "in" / "x.jpg"),
                    "--out", str(tmp_path / "o"), "--save", "color", "--workers", "0")
    assert result.exit_code == 0, result.output
    color = Image.open(tmp_path / "o" / "color" / "x.png")
    assert color.getpalette()[: 21 * 3] == voc_palette(21).reshape(-1).tolist()


BAD_INPUTS = [
    # (case, exit code, message fragment)
    ("not_a_checkpoint", 3, "x.jpg"),
    ("no_image_in_folder", 3, "contains no image"),
    ("pattern_matches_nothing", 3, "matches no image"),
    ("missing_source", 3, "does not exist"),
    ("out_is_a_file", 2, "is a file"),
    ("unknown_save_kind", 2, "unknown output"),
    ("window_under_the_backbones_32", 2, "greater than or equal to 32"),  # the same bound as eval and the settings
    ("stride_over_the_window", 2, "larger than the window"),
]


@pytest.mark.parametrize(("case", "code", "fragment"), BAD_INPUTS)
def test_bad_inputs(case: str, code: int, fragment: str, checkpoint, tmp_path) -> None:
    make_images(tmp_path / "in", corrupt=False)
    (tmp_path / "empty").mkdir()
    args = [str(checkpoint), str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--workers", "0"]
    if case == "not_a_checkpoint":
        args[0] = str(tmp_path / "in" / "x.jpg")
    elif case == "no_image_in_folder":
        args[1] = str(tmp_path / "empty")
    elif case == "pattern_matches_nothing":
        args[1] = str(tmp_path / "in" / "*.gif")
    elif case == "missing_source":
        args[1] = str(tmp_path / "nowhere")
    elif case == "out_is_a_file":
        (tmp_path / "out").write_text("occupied")
        args[3] = str(tmp_path / "out" / "sub")
    elif case == "unknown_save_kind":
        args += ["--save", "mask,heatmap"]
    elif case == "window_under_the_backbones_32":
        args += ["--crop", "31"]
    elif case == "stride_over_the_window":
        args += ["--crop", "40", "--stride", "41"]
    result = invoke(*args)
    assert result.exit_code == code, result.output
    assert fragment in result.output
    if case != "out_is_a_file":
        assert not (tmp_path / "out").exists()  # nothing written, not even an empty folder


def test_amp_bf16_predicts_and_fp16_on_cpu_is_refused_before_any_output(checkpoint, tmp_path) -> None:
    make_images(tmp_path / "in", corrupt=False)
    common = [str(checkpoint), str(tmp_path / "in"), "--device", "cpu", "--workers", "0", "--save", "mask"]
    result = invoke(*common, "--out", str(tmp_path / "bf16"), "--amp", "bf16")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "bf16" / "masks").rglob("*.png"))) == 3
    refused = invoke(*common, "--out", str(tmp_path / "fp16"), "--amp", "fp16")
    assert refused.exit_code == 4 and "--amp fp16 needs a CUDA device" in refused.output
    assert not (tmp_path / "fp16").exists()
