"""The Quickstart as a user runs it, at full size: `prepare demo` (2,000 + 200 images), one epoch of
`train --preset demo-1/16`, `eval` of its best.pt and `predict` on validation images. Several
minutes on 2 cores, so marked slow (`pytest -m slow`); the default suite keeps the tiny
train -> eval -> predict path of test_end_to_end.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from allspark_cli.cli.app import app

pytestmark = pytest.mark.slow
runner = CliRunner()
DEMO_CLASSES = 7


def _ok(argv: list[str]) -> str:
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, f"{argv}: {result.output}"
    return result.output


def test_quickstart_prepare_train_eval_predict(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    _ok(["prepare", "demo", "--out", str(data)])
    assert len((data / "splits" / "val.txt").read_text().splitlines()) == 200
    _ok(["train", "--preset", "demo-1/16", "--data", str(data), "--epochs", "1", "--set", f"run.root={tmp_path / 'runs'}",
         "--name", "quick"])
    best = tmp_path / "runs" / "demo-1_16" / "quick" / "weights" / "best.pt"
    _ok(["eval", str(best), "--out", str(tmp_path / "eval")])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert len(metrics["classes"]) == DEMO_CLASSES and metrics["miou"] > 100 / DEMO_CLASSES / 2
    _ok(["predict", str(best), str(data / "images" / "val"), "--out", str(tmp_path / "pred"), "--save", "mask"])
    assert len(list((tmp_path / "pred" / "masks").rglob("*.png"))) == 200
