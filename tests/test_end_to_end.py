"""The whole user path through the CLI on a tiny dataset: train -> resume refused (finished) ->
eval -> predict -> inspect-memory. Each step reads only what the previous one wrote."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from typer.testing import CliRunner

from allspark_cli.cli.app import app
from train_fixtures import make_dataset, tiny_layer

runner = CliRunner()


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

    _ok(["eval", str(best), "--out", str(tmp_path / "eval")])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["miou"] <= 100.0

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(photos / "a.jpg")
    _ok(["predict", str(best), str(photos), "--out", str(tmp_path / "pred")])
    mask = np.array(Image.open(tmp_path / "pred" / "masks" / "a.png"))
    assert mask.shape == (40, 56) and mask.max() < 3

    _ok(["inspect-memory", str(run), "--out", str(tmp_path / "memory")])
    assert (tmp_path / "memory" / "index.html").is_file()
    summary = json.loads((tmp_path / "memory" / "summary.json").read_text())
    assert summary
