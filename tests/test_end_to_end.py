"""The whole user path through the CLI on a tiny dataset: train -> resume refused (finished) ->
eval -> predict -> inspect-memory. Each step reads only what the previous one wrote."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from typer.testing import CliRunner

from allspark_cli.cli.app import app
from train_fixtures import CLASSES, SIZE, make_dataset, tiny_layer

runner = CliRunner()
VAL_IMAGES = 3  # make_dataset's default validation split
B0_CHANNELS = 256  # C: the channels of MiT-B0's last stage (tiny_layer's backbone), which the memory stores
PHOTO_SIZE = (40, 56)


def _ok(argv: list[str]) -> str:
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, f"{argv}: {result.output}"
    return result.output


def test_train_eval_predict_inspect(tmp_path: Path):
    manifest = make_dataset(tmp_path / "data")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_layer(manifest, tmp_path / "runs")))
    _ok(["train", "--config", str(config), "--name", "e2e"])
    run = tmp_path / "runs" / "tiny" / "e2e"
    best = run / "weights" / "best.pt"
    assert best.is_file() and (run / "results.csv").is_file()

    finished = runner.invoke(app, ["train", "--resume", str(run)])
    assert finished.exit_code == 2 and "already" in finished.output

    eval_output = _ok(["eval", str(best), "--out", str(tmp_path / "eval")])
    _check_eval_folder(tmp_path / "eval", eval_output)

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*PHOTO_SIZE, 3), dtype=np.uint8)).save(photos / "a.jpg")
    _ok(["predict", str(best), str(photos), "--out", str(tmp_path / "pred")])
    mask = np.array(Image.open(tmp_path / "pred" / "masks" / "a.png"))
    assert mask.shape == PHOTO_SIZE and mask.max() < len(CLASSES)
    with Image.open(tmp_path / "pred" / "color" / "a.png") as color, Image.open(tmp_path / "pred" / "overlay" / "a.jpg") as overlay:
        assert color.mode == "P" and color.size == overlay.size == PHOTO_SIZE[::-1]

    _ok(["inspect-memory", str(run), "--out", str(tmp_path / "memory")])
    assert (tmp_path / "memory" / "index.html").is_file()
    summary = json.loads((tmp_path / "memory" / "summary.json").read_text())
    _check_memory_summary(summary, tmp_path / "memory")


def _check_eval_folder(out: Path, output: str) -> None:
    """What `eval` promises, checked against the dataset rather than against the engine's own numbers."""
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["split"], metrics["mode"], metrics["num_images"]) == ("val", "whole", VAL_IMAGES)
    assert [row["name"] for row in metrics["classes"]] == CLASSES
    # Every labelled pixel is counted exactly once (the tiny masks have no ignore pixels).
    assert sum(map(sum, metrics["confusion"])) == VAL_IMAGES * SIZE * SIZE
    assert [row["gt_pixels"] for row in metrics["classes"]] == [sum(row) for row in metrics["confusion"]]
    ious = [row["iou"] for row in metrics["classes"] if row["iou"] is not None]
    assert isinstance(metrics["miou"], float) and 0.0 <= metrics["miou"] <= 100.0
    assert math.isclose(metrics["miou"], sum(ious) / len(ious), abs_tol=1e-6)  # the mean over defined classes
    rows = list(csv.DictReader((out / "per_class.csv").open()))
    assert [(row["class_id"], row["name"]) for row in rows] == [(str(k), name) for k, name in enumerate(CLASSES)]
    assert (out / "confusion.png").stat().st_size > 0
    assert all(name in output for name in CLASSES) and f"{metrics['miou']:.2f}" in output


def _check_memory_summary(summary: dict, out: Path) -> None:
    """The memory of this run: one slot per class, the crop's token grid, pictures that exist."""
    assert (summary["method"], summary["backbone"], summary["source"]) == ("allspark", "b0", "allspark")
    assert summary["token_grid"] == [2, 2]  # the 64-pixel crop on the backbone's stride-32 grid
    assert summary["slots_per_class"] == B0_CHANNELS  # S = memory_multiple (1) x C
    assert [(row["class_id"], row["name"]) for row in summary["classes"]] == list(enumerate(CLASSES))
    assert all(0 <= row["filled_slots"] <= B0_CHANNELS for row in summary["classes"])
    assert summary["provenance_available"]  # this toolkit's run records where its memory came from
    assert summary["pictures"] and all((out / picture).is_file() for picture in summary["pictures"])
