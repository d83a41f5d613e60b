"""`allspark inspect-memory`: pictures and an index.html of what a checkpoint's Semantic Memory holds."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _split_names(values: list[str] | None) -> list[str] | None:
    """`--classes a,b --classes c` -> [a, b, c]."""
    if not values:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def inspect_memory_command(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint file, or a run folder (uses weights/best.pt, else last.pt).")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder. Default: RUN_DIR/inspect-memory, or <stem>-memory beside it."),
    ] = None,
    classes: Annotated[
        list[str] | None,
        typer.Option("--classes", "-c", metavar="NAMES", help="Class names or ids to draw (repeat or comma-separate). Default: all."),
    ] = None,
    max_channels: Annotated[
        int | None,
        typer.Option("--max-channels", help="Stored channels drawn per class slot and per image. Default 32."),
    ] = None,
    images: Annotated[
        list[Path] | None,
        typer.Option("--images", "-i", metavar="IMAGE", help="Image to show before/after the module, with its attention on the memory."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="dataset.yaml to find source images with, instead of the checkpoint's."),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="Torch device, e.g. cpu or cuda.")] = "cpu",
) -> None:
    """Show what the Semantic Memory holds: stored channels per class (with their source images),
    fill level, channels per class from the grouping, and - for given images - features before and
    after the AllSpark module and which memory class slots they draw from. Writes index.html."""
    from rich.console import Console
    from rich.table import Table

    # Imported here so that `allspark --help` does not load torch.
    from allspark_cli.engine.inspection.inspect_memory import DEFAULT_MAX_CHANNELS, default_out_dir, inspect_memory

    err = Console(stderr=True)
    summary = inspect_memory(
        checkpoint,
        out_dir=out or default_out_dir(checkpoint),
        classes=_split_names(classes),
        max_channels=DEFAULT_MAX_CHANNELS if max_channels is None else max_channels,
        images=images,
        image_root=data,
        device=device,
        progress=lambda message: err.print(f"[dim]{message}[/dim]"),
    )
    table = Table(title=f"Semantic Memory: {summary.method}, {summary.backbone}, {summary.slots_per_class} slots/class")
    for header in ("id", "class", "filled", "assigned", "sources"):
        table.add_column(header, justify="left" if header == "class" else "right")
    for item in summary.classes:
        filled = "n/a" if item.filled_slots is None else f"{item.filled_slots}/{item.slots}"
        assigned = "n/a" if item.assigned_count is None else str(item.assigned_count)
        table.add_row(str(item.class_id), item.name, filled, assigned, str(item.resolved_images))
    console = Console()
    console.print(table)
    if not summary.provenance_available:
        console.print(f"[yellow]no provenance:[/yellow] {summary.provenance_note}")
    console.print(f"wrote {Path(summary.out_dir) / summary.index_html}")


def register(app: typer.Typer) -> None:
    """Adds `inspect-memory` to the app."""
    app.command("inspect-memory")(inspect_memory_command)
