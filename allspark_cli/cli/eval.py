"""`allspark eval`: evaluate a checkpoint on a split of a prepared dataset (DESIGN.md section 3b)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from allspark_cli.cli.options import (
    INFERENCE_WORKERS,
    AmpOption,
    BatchSizeOption,
    DataOption,
    DeviceOption,
    StrideOption,
    ThreadsOption,
    WindowOption,
    WorkersOption,
)
from allspark_cli.data.manifest import EvalMode
from allspark_cli.text import plural

if TYPE_CHECKING:
    from allspark_cli.engine.inference.eval_report import EvalReport

NOT_AVAILABLE = "n/a"


def _percent(value: float) -> str:
    return NOT_AVAILABLE if math.isnan(value) else f"{value:.2f}"


def _render(console: Console, report: EvalReport, checkpoint_name: str, tta: bool) -> None:
    """Per-class table, the summary line and where the files went."""
    metrics, protocol = report.result.metrics, report.protocol
    window = f" crop {protocol.crop}" if protocol.crop else ""
    window += f" stride {protocol.stride}" if protocol.stride else ""
    table = Table(title=f"{checkpoint_name} on {report.split} ({protocol.mode}{window}{', tta' if tta else ''})")
    table.add_column("id", justify="right")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    table.add_column("accuracy", justify="right")
    for class_id, name in enumerate(report.class_names):
        table.add_row(str(class_id), name, _percent(metrics.iou[class_id]), _percent(metrics.accuracy[class_id]))
    console.print(table)
    # Two short lines rather than one long one: a narrow terminal would wrap it between a number
    # and its unit.
    console.print(f"mIoU [bold]{_percent(metrics.miou)}[/bold]  pixel accuracy {_percent(metrics.pixel_accuracy)}")
    console.print(f"{plural(report.result.num_images, 'image')} at {report.result.images_per_second:.2f} images/s")
    if report.result.out_of_range_pixels:
        console.print(
            f"[yellow]warning:[/yellow] {report.result.out_of_range_pixels} labelled pixels had a mask value "
            f"outside 0..{len(report.class_names) - 1} and were skipped"
        )
    console.print(f"results written to {report.out_dir}")


def eval_command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint of allspark or of the reference code.")],
    data: DataOption = None,
    split: Annotated[str, typer.Option(help="Evaluation split of the manifest.")] = "val",
    mode: Annotated[
        EvalMode | None, typer.Option(help="Inference mode; default: checkpoint settings, then the manifest.")
    ] = None,
    crop: WindowOption = None,
    stride: StrideOption = None,
    batch_size: BatchSizeOption = None,
    tta: Annotated[bool, typer.Option("--tta", help="Average with the horizontally flipped image.")] = False,
    device: DeviceOption = None,
    amp: AmpOption = None,
    workers: WorkersOption = None,
    threads: ThreadsOption = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Eval folder; default <run>/eval/<split> for a run's checkpoint, else runs/eval/<stem>."),
    ] = None,
) -> None:
    """Evaluate a checkpoint: per-class IoU and accuracy, mIoU, pixel accuracy and a confusion matrix.

    Writes metrics.json, per_class.csv and confusion.png into the eval folder.

    --data defaults to the dataset recorded in the checkpoint.

    --batch-size (default 1) batches images of equal size; the numbers do not change.
    """
    from allspark_cli.engine.inference.evaluate import evaluate_checkpoint
    from allspark_cli.threads import apply_threads

    apply_threads(threads)

    console = Console()
    columns = (TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("eval", total=None)
        report = evaluate_checkpoint(
            checkpoint, data=data, split=split, mode=mode, crop=crop, stride=stride, tta=tta,
            batch_size=batch_size or 1, device=device or "auto", amp=amp or "off", out=out,
            workers=INFERENCE_WORKERS if workers is None else workers,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    _render(console, report, checkpoint.name, tta)


def register(app: typer.Typer) -> None:
    """Adds `allspark eval` to the app."""
    app.command("eval")(eval_command)
