"""`allspark export`: ONNX and TorchScript files that reproduce the checkpoint's logits at several
batch sizes and image sizes, carry their metadata, and are never left half-written."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from allspark_cli.cli.app import app
from allspark_cli.engine.inference import export as export_module
from allspark_cli.engine.inference.export import TORCHSCRIPT_METADATA, ExportCheckError, export_checkpoint
from allspark_cli.model.checkpoint import load_model, save_checkpoint
from allspark_cli.model.config import ModelConfig, build_model

LOGITS_ATOL = 1e-4
SHAPES = ((1, 3, 64, 64), (3, 3, 72, 96))
CLASSES = ["background", "square", "disc"]
PALETTE = [[0, 0, 0], [200, 40, 40], [40, 200, 40]]

onnxruntime = pytest.importorskip("onnxruntime")  # installed by the dev extra; an optional feature


@pytest.fixture(scope="module")
def toolkit_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="b0", method="allspark", num_classes=3, head_dim=16, memory_tokens=4))
    path = tmp_path_factory.mktemp("export") / "best.pt"
    save_checkpoint(path, model, class_names=CLASSES, palette=PALETTE, settings={})
    return path


def _run_onnx(path: Path, images: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def _run_torchscript(path: Path, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path))(images)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("which", ["toolkit", "reference"])
def test_export_reproduces_the_checkpoint(fmt, which, toolkit_checkpoint, tmp_path, request) -> None:
    checkpoint = toolkit_checkpoint if which == "toolkit" else request.getfixturevalue("reference_dir") / "reference_ckpt_b0.pth"
    out = tmp_path / f"model.{fmt}"
    report = export_checkpoint(checkpoint, fmt, out=out)
    assert report.path == out and out.is_file() and report.max_difference < LOGITS_ATOL
    model = load_model(checkpoint)
    for shape in SHAPES:  # our own sizes, not the ones the export checked itself with
        images = torch.randn(*shape)
        with torch.no_grad():
            expected = model(images)
        got = _run_onnx(out, images) if fmt == "onnx" else _run_torchscript(out, images)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() < LOGITS_ATOL
    if fmt == "onnx":
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    else:
        files = {TORCHSCRIPT_METADATA: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.load(str(out), _extra_files=files)
        meta = json.loads(files[TORCHSCRIPT_METADATA])
    assert json.loads(meta["normalization_mean"]) == [0.485, 0.456, 0.406]
    names = json.loads(meta["class_names"])
    assert names == CLASSES if which == "toolkit" else len(names) == 21


def test_a_failed_check_leaves_no_file(toolkit_checkpoint, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(export_module, "CHECK_TOLERANCE", -1.0)
    out = tmp_path / "model.onnx"
    with pytest.raises(ExportCheckError, match="nothing was written"):
        export_checkpoint(toolkit_checkpoint, "torchscript", out=out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_export_command_reports_the_check(toolkit_checkpoint) -> None:
    result = CliRunner().invoke(app, ["export", str(toolkit_checkpoint), "--format", "torchscript"])
    assert result.exit_code == 0, result.output
    assert "max |logit difference|" in " ".join(result.output.split())  # rich wraps long paths
    assert toolkit_checkpoint.with_name("best.torchscript.pt").is_file()
    missing = CliRunner().invoke(app, ["export", str(toolkit_checkpoint.with_name("none.pt"))])
    assert missing.exit_code == 3 and "none.pt" in missing.output
