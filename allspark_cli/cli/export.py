"""`allspark export CHECKPOINT --format onnx|torchscript`: the inference graph, checked (engine/inference/export.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from allspark_cli.engine.inference.export import DEFAULT_OPSET, ExportFormat, export_checkpoint


def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint of this toolkit or of the reference code.", show_default=False)],
    fmt: Annotated[ExportFormat, typer.Option("--format", "-f", help="onnx (needs allspark[export]) or torchscript.")] = "onnx",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output file (default: beside the checkpoint).", show_default=False)] = None,
    opset: Annotated[int, typer.Option("--opset", min=11, help="ONNX opset version.")] = DEFAULT_OPSET,
) -> None:
    """Export the inference graph (per-image AllSpark, dynamic batch and size) and check it against
    the checkpoint on two input sizes before reporting success."""
    report = export_checkpoint(checkpoint, fmt, out=out, opset=opset)
    shapes = ", ".join("x".join(map(str, shape)) for shape in report.checked_shapes)
    Console().print(f"[green]exported[/] {report.path} ({report.format}, {report.num_classes} classes); "
                    f"checked on {shapes}: max |logit difference| {report.max_difference:.2e}", highlight=False)


def register(app: typer.Typer) -> None:
    """Adds `allspark export` to the app."""
    app.command("export")(export_command)
