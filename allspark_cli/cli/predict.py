"""`allspark predict`: segment image files, folders and glob patterns with a checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from allspark_cli.cli.options import (
    INFERENCE_WORKERS,
    AmpOption,
    BatchSizeOption,
    DeviceOption,
    NameOption,
    StrideOption,
    ThreadsOption,
    WindowOption,
    WorkersOption,
)
from allspark_cli.engine.inference.predict import PredictMode
from allspark_cli.engine.inference.predict_folder import DEFAULT_OPACITY
from allspark_cli.text import plural
from allspark_cli.viz.overlay import MAX_OPACITY, MIN_OPACITY

RUNS_ROOT = Path("runs")


def _save_kinds(text: str) -> list[str]:
    return [kind.strip() for kind in text.split(",") if kind.strip()]


def predict_command(
    checkpoint: Annotated[
        Path, typer.Argument(help="Checkpoint of allspark or of the reference code.")
    ],
    sources: Annotated[list[str], typer.Argument(help="Image files, folders (searched recursively) or glob patterns.")],
    out: Annotated[Path | None, typer.Option(help="Output folder; default runs/predict/<name>.")] = None,
    name: NameOption = None,
    save: Annotated[str, typer.Option(help="Comma-separated outputs: mask, color, overlay.")] = "mask,color,overlay",
    opacity: Annotated[
        float, typer.Option(min=MIN_OPACITY, max=MAX_OPACITY, help="Weight of the colours in the overlay.")
    ] = DEFAULT_OPACITY,
    mode: Annotated[
        PredictMode | None,
        typer.Option(help="whole or slide; default: slide for images over 2x the crop (or slide-trained checkpoints)."),
    ] = None,
    crop: WindowOption = None,
    stride: StrideOption = None,
    tta: Annotated[bool, typer.Option("--tta", help="Average with the horizontally flipped image.")] = False,
    batch_size: BatchSizeOption = None,
    device: DeviceOption = None,
    amp: AmpOption = None,
    workers: WorkersOption = None,
    threads: ThreadsOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo images whose outputs already exist.")] = False,
) -> None:
    """Predict segmentation masks: masks/ (class ids), color/ (palette PNG), overlay/ (image + colours + legend).

    Outputs go to --out, or runs/predict/<--name> (default exp, exp2, ...); a given name is reused.

    Outputs mirror the input folders; a re-run skips finished images unless --overwrite.

    Unreadable images are reported and skipped; the exit code is then 3.

    --batch-size (default 1) batches images of equal size.
    """
    from allspark_cli.engine.inference.predict import Predictor
    from allspark_cli.engine.inference.predict_folder import predict_folder, predict_out_dir
    from allspark_cli.errors import DataError
    from allspark_cli.threads import apply_threads

    apply_threads(threads)

    console = Console()
    predictor = Predictor(
        checkpoint, device=device or "auto", mode=mode, crop=crop, stride=stride, tta=tta, batch_size=batch_size or 1,
        amp=amp or "off",
    )
    out_dir = out if out is not None else predict_out_dir(RUNS_ROOT, name)
    columns = (TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    current = "image" if predictor.batch_size == 1 else f"batch of up to {predictor.batch_size} images"
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("predict", total=None)
        summary = predict_folder(
            predictor, sources, out_dir, save=_save_kinds(save), opacity=opacity, overwrite=overwrite,
            workers=INFERENCE_WORKERS if workers is None else workers,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
            stopping=lambda: progress.console.print(f"stopping after the current {current}...", markup=False,
                                                    highlight=False),
        )
    for path, message in summary.failed:
        Console(stderr=True).print(f"skipped {path}: {message}", markup=False, highlight=False)
    modes = ", ".join(f"{count} {kind}" for kind, count in sorted(summary.mode_counts.items()))
    console.print(
        f"{plural(summary.found, 'image')}: {summary.predicted} predicted ({modes or 'none'}), {summary.skipped} already done, "
        f"{len(summary.failed)} unreadable; {summary.images_per_second:.2f} images/s"
    )
    console.print(f"outputs in {summary.out_dir}")
    if summary.failed:
        raise DataError(f"{len(summary.failed)} of {plural(summary.found, 'image')} could not be read (listed above)")


def register(app: typer.Typer) -> None:
    """Adds `allspark predict` to the app."""
    app.command("predict")(predict_command)
