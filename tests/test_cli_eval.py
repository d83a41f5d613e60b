"""`allspark eval` end to end on a tiny checkpoint and a tiny dataset built here, plus bad inputs."""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from allspark_cli.cli.app import app
from allspark_cli.data.datasets import build_eval_dataset
from allspark_cli.data.manifest import DatasetManifest, TrainSplit, load_manifest, write_manifest
from allspark_cli.engine.inference.evaluate import evaluate_dataset
from allspark_cli.model.checkpoint import load_model, save_checkpoint
from allspark_cli.model.config import ModelConfig, build_model, tokens_for_crop

CLASSES = ["background", "cat", "dog"]
PALETTE = [(0, 0, 0), (200, 0, 0), (0, 200, 0)]
SIZES = [(48, 64), (48, 64), (64, 40)]
CROP = 64

torch.set_num_threads(1)


def make_dataset(root: Path, classes: list[str] = CLASSES, **manifest_fields) -> Path:
    """Three random images with masks (one row of ignore pixels each); returns the dataset.yaml path."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    lines = []
    for index, (height, width) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / f"images/{index}.jpg")
        mask = rng.integers(0, len(classes), (height, width)).astype(np.uint8)
        mask[0] = 255
        Image.fromarray(mask).save(root / f"masks/{index}.png")
        lines.append(f"images/{index}.jpg masks/{index}.png")
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    palette = [tuple(int(v) for v in np.random.default_rng(k).integers(0, 256, 3)) for k in range(len(classes))]
    manifest = DatasetManifest(
        name="toy", root=root, classes=classes, palette=palette, train_splits={"full": TrainSplit(labeled="val.txt")},
        eval_splits={"val": "val.txt"}, train_crop=CROP, **manifest_fields,
    )
    write_manifest(manifest, root / "dataset.yaml")
    return root / "dataset.yaml"


def make_checkpoint(path: Path, manifest: Path | None, num_classes: int = len(CLASSES), settings: dict | None = None) -> Path:
    config = ModelConfig(
        backbone="b0", method="allspark", num_classes=num_classes, head_dim=32, memory_tokens=tokens_for_crop(CROP)
    )
    if settings is None:
        settings = {"data": {"manifest": str(manifest), "crop": CROP}} if manifest else {}
    names = CLASSES if num_classes == len(CLASSES) else [f"c{k}" for k in range(num_classes)]
    save_checkpoint(path, build_model(config), class_names=names, palette=PALETTE[:1] * num_classes, settings=settings)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    manifest = make_dataset(root / "data")
    checkpoint = make_checkpoint(root / "run" / "weights" / "best.pt", manifest)
    return checkpoint, manifest


def invoke(*args: str):
    return CliRunner().invoke(app, ["eval", *args])


def test_help() -> None:
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    assert "--mode" in result.output and "--tta" in result.output


def test_eval_writes_the_run_eval_folder_and_matches_the_engine(tiny) -> None:
    checkpoint, manifest = tiny
    result = invoke(str(checkpoint), "--workers", "0", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    out = checkpoint.parent.parent / "eval" / "val"  # checkpoint in <run>/weights -> <run>/eval/<split>
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == len(SIZES) and metrics["mode"] == "whole" and metrics["split"] == "val"
    assert [c["name"] for c in metrics["classes"]] == CLASSES
    expected = evaluate_dataset(load_model(checkpoint), build_eval_dataset(load_manifest(manifest)))
    assert metrics["miou"] == pytest.approx(expected.metrics.miou)
    assert metrics["confusion"] == expected.confusion.tolist()
    assert f"{expected.metrics.miou:.2f}" in result.output and "cat" in result.output
    rows = list(csv.DictReader((out / "per_class.csv").open()))
    assert [row["name"] for row in rows] == CLASSES
    assert sum(int(row["gt_pixels"]) for row in rows) == sum(h * w - w for h, w in SIZES)  # ignore row excluded
    with Image.open(out / "confusion.png") as picture:
        assert picture.size[0] > 100
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary files


def test_slide_mode_options_and_out_folder(tiny, tmp_path) -> None:
    checkpoint, manifest = tiny
    out = tmp_path / "ev"
    result = invoke(str(checkpoint), "--data", str(manifest), "--mode", "slide", "--crop", "40", "--stride", "20",
                    "--tta", "--out", str(out), "--workers", "0")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["mode"], metrics["crop"], metrics["stride"], metrics["tta"]) == ("slide", 40, 20, True)


def test_protocol_defaults_come_from_the_manifest(tmp_path) -> None:
    manifest = make_dataset(tmp_path / "data", eval_mode="slide", eval_crop=48, eval_stride=32)
    checkpoint = make_checkpoint(tmp_path / "model.pt", manifest)
    result = invoke(str(checkpoint), "--workers", "0")
    assert result.exit_code == 0, result.output
    metrics = json.loads(Path("runs/eval/model/metrics.json").read_text())  # not in a run: runs/eval/<stem>
    assert (metrics["mode"], metrics["crop"], metrics["stride"]) == ("slide", 48, 32)


def test_absent_class_is_shown_as_na(tmp_path) -> None:
    classes = [*CLASSES, "unicorn"]  # never in a mask; a random model may still predict it
    manifest = make_dataset(tmp_path / "data", classes=classes)
    for mask_path in (tmp_path / "data" / "masks").glob("*.png"):
        mask = np.array(Image.open(mask_path))
        mask[mask == 3] = 0
        Image.fromarray(mask).save(mask_path)
    checkpoint = make_checkpoint(tmp_path / "model.pt", manifest, num_classes=4)
    result = invoke(str(checkpoint), "--workers", "0", "--out", "ev")
    assert result.exit_code == 0, result.output
    unicorn = json.loads(Path("ev/metrics.json").read_text())["classes"][3]
    assert unicorn["gt_pixels"] == 0 and unicorn["accuracy"] is None
    assert (unicorn["iou"] is None) == (unicorn["predicted_pixels"] == 0)
    assert "n/a" in result.output


def test_reference_checkpoint_with_data(reference_dir, tmp_path) -> None:
    voc_like = [f"class_{k}" for k in range(21)]
    manifest = make_dataset(tmp_path / "data", classes=voc_like)
    result = invoke(str(reference_dir / "reference_ckpt_b0.pth"), "--data", str(manifest), "--workers", "0", "--out", "ev")
    assert result.exit_code == 0, result.output
    metrics = json.loads(Path("ev/metrics.json").read_text())
    assert metrics["checkpoint_source"] == "reference" and len(metrics["classes"]) == 21
    assert not math.isnan(metrics["pixel_accuracy"])


BAD_INPUTS = [
    # (case, exit code, message fragment)
    ("not_a_checkpoint", 3, "not a readable"),
    ("class_mismatch", 2, "5 classes"),
    ("no_dataset_recorded", 2, "--data"),
    ("out_is_a_file", 2, "is a file"),
    ("unknown_split", 3, "no evaluation split 'test'"),
    ("bad_mode", 2, "tiles"),
    ("missing_checkpoint", 3, "checkpoint not found"),
    ("window_under_the_backbones_32", 2, "greater than or equal to 32"),  # the same bound as predict and the settings
    ("stride_over_the_window", 2, "larger than the window"),
]


@pytest.mark.parametrize(("case", "code", "fragment"), BAD_INPUTS)
def test_bad_inputs(case: str, code: int, fragment: str, tiny, tmp_path) -> None:
    checkpoint, manifest = tiny
    args = [str(checkpoint), "--workers", "0", "--out", str(tmp_path / "ev")]
    if case == "not_a_checkpoint":
        fake = tmp_path / "fake.pt"
        fake.write_text("this is not a checkpoint")
        args[0] = str(fake)
    elif case == "class_mismatch":
        args[0] = str(make_checkpoint(tmp_path / "five.pt", manifest, num_classes=5))
    elif case == "no_dataset_recorded":
        args[0] = str(make_checkpoint(tmp_path / "bare.pt", None, settings={}))
    elif case == "out_is_a_file":
        (tmp_path / "ev").write_text("occupied")
    elif case == "unknown_split":
        args += ["--split", "test"]
    elif case == "bad_mode":
        args += ["--mode", "tiles"]
    elif case == "missing_checkpoint":
        args[0] = str(tmp_path / "nope.pt")
    elif case == "window_under_the_backbones_32":
        args += ["--mode", "slide", "--crop", "31"]
    elif case == "stride_over_the_window":
        args += ["--mode", "slide", "--crop", "40", "--stride", "41"]
    result = invoke(*args)
    assert result.exit_code == code, result.output
    assert fragment in result.output
    if case == "class_mismatch":
        assert "3" in result.output  # names both counts
    if case != "out_is_a_file":
        assert not (tmp_path / "ev").exists()  # nothing written


@pytest.fixture
def unwritable_folder(tmp_path) -> Path:
    """A folder this process cannot write in: a read-only folder, or (as root, whom permissions do not
    stop) /sys, which refuses new files even to root."""
    import tempfile

    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            tempfile.TemporaryFile(dir=candidate).close()
        except OSError:
            yield candidate
            break
    else:
        pytest.skip("no unwritable folder on this machine")
    folder.chmod(0o755)  # so that pytest can remove it


def test_an_unwritable_out_folder_is_refused_before_evaluating(tiny, unwritable_folder) -> None:
    """The whole evaluation would be lost to its last step: the folder is checked first."""
    from allspark_cli.engine.inference.evaluate import evaluate_checkpoint
    from allspark_cli.errors import WriteError

    checkpoint, _ = tiny
    evaluated: list[int] = []
    with pytest.raises(WriteError, match="cannot be written"):
        evaluate_checkpoint(checkpoint, device="cpu", out=unwritable_folder / "ev",
                            progress=lambda done, total: evaluated.append(done))
    assert evaluated == []
    result = invoke(str(checkpoint), "--workers", "0", "--out", str(unwritable_folder / "ev"))
    assert result.exit_code == 6
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--out" in lines[0], result.output


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize(("command", "name", "runner_hint"), [
    ("eval", "best.onnx", "onnxruntime"),
    ("predict", "best.torchscript.pt", "torch.jit.load"),
    ("eval", "renamed.pt", "torch.jit.load"),  # a TorchScript archive is recognised by its content too
])
def test_an_exported_model_is_named_with_how_to_run_it(command, name, runner_hint, tmp_path) -> None:
    exported = tmp_path / name
    if name.endswith(".onnx"):
        exported.write_bytes(b"\x08\x07\x12\x0fallspark export")  # the start of an ONNX protobuf
    else:
        torch.jit.trace(torch.nn.Conv2d(3, 2, 1), torch.zeros(1, 3, 8, 8)).save(str(exported))
    result = CliRunner().invoke(app, [command, str(exported), *(["photos"] if command == "predict" else [])])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "exported" in lines[0] and runner_hint in lines[0], result.output


@pytest.mark.parametrize("columns", ["80", "40"])
def test_the_summary_keeps_each_number_with_its_unit(tiny, tmp_path, columns) -> None:
    checkpoint, _ = tiny
    result = CliRunner().invoke(app, ["eval", str(checkpoint), "--workers", "0", "--out", str(tmp_path / "ev")],
                                env={"COLUMNS": columns})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("mIoU ") and "pixel accuracy " in line for line in lines), result.output
    assert any(re.fullmatch(r"3 images at \d+\.\d\d images/s *", line) for line in lines), result.output
