"""A second encoder family through the whole CLI: a tiny DINOv2 starts from a weight file in Meta's
release layout, trains, and its checkpoint is evaluated, predicted with, inspected and exported
(TorchScript and ONNX, checked at other image sizes than the traced one)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from allspark_cli.cli.app import app
from allspark_cli.model.checkpoint import read_checkpoint
from allspark_cli.model.config import grid_for_crop
from backbone_fixtures import TINY_DINOV2, shrink_dinov2, write_meta_release
from train_fixtures import TINY_CROP, make_dataset, tiny_layer

runner = CliRunner()
EXPORT_FORMATS = ["torchscript"] + (["onnx"] if importlib.util.find_spec("onnxruntime") else [])


def _ok(argv: list[str]) -> str:
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, f"{argv}: {result.output}"
    return " ".join(result.output.split())  # rich wraps long lines


@pytest.fixture
def dinov2_run(tmp_path: Path, monkeypatch) -> Path:
    shrink_dinov2(monkeypatch)
    manifest = make_dataset(tmp_path / "data")
    weights = write_meta_release(tmp_path / "weights" / TINY_DINOV2.weight_file, TINY_DINOV2)
    layer = tiny_layer(manifest, tmp_path / "runs", model={"backbone": "dinov2-s", "pretrained": str(weights)})
    config = tmp_path / "dino.yaml"
    config.write_text(yaml.safe_dump(layer))
    output = _ok(["train", "--config", str(config), "--name", "dino"])
    assert "[allspark, DINOv2-S]" in output
    assert "tensors matched, 0 missing, 0 unexpected, 0 of another shape" in output
    return tmp_path / "runs" / "tiny" / "dino"


def test_dinov2_trains_evaluates_predicts_inspects_and_exports(dinov2_run: Path, tmp_path: Path) -> None:
    best = dinov2_run / "weights" / "best.pt"
    config = read_checkpoint(best).model_config
    assert (config.backbone, config.backbone_family) == ("dinov2-s", "dinov2")
    assert config.memory_grid == grid_for_crop(TINY_CROP, "dinov2-s") == (5, 5)  # ceil(64 / 14)

    _ok(["eval", str(best), "--out", str(tmp_path / "eval")])
    assert 0.0 <= json.loads((tmp_path / "eval" / "metrics.json").read_text())["miou"] <= 100.0

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 57, 3), dtype=np.uint8)).save(photos / "a.jpg")
    _ok(["predict", str(best), str(photos), "--out", str(tmp_path / "pred")])
    assert np.array(Image.open(tmp_path / "pred" / "masks" / "a.png")).shape == (40, 57)

    _ok(["inspect-memory", str(dinov2_run), "--out", str(tmp_path / "memory")])
    assert json.loads((tmp_path / "memory" / "summary.json").read_text())["token_grid"] == [5, 5]

    for fmt in EXPORT_FORMATS:
        out = tmp_path / f"model.{fmt}"
        assert "max |logit difference|" in _ok(["export", str(best), "--format", fmt, "--out", str(out)])
        assert out.is_file()
