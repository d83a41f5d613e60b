"""Option aliases shared by several commands, declared once (help text written once).

Each alias is an `Annotated` type; a command uses it as `device: DeviceOption = None`. A value of
None means "not given": the command then keeps the value of the preset, config or checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from allspark_cli.constants import MIN_CROP
from allspark_cli.engine.settings import AmpMode, Recipe

DEVICE_HELP = "Device: auto (CUDA when present, else CPU), cpu, cuda or cuda:N."

DeviceOption = Annotated[str | None, typer.Option("--device", help=DEVICE_HELP, show_default=False)]
AmpOption = Annotated[
    AmpMode | None, typer.Option("--amp", help="Mixed precision (fp16 needs CUDA).", show_default=False)
]
BatchSizeOption = Annotated[int | None, typer.Option("--batch-size", "-b", min=1, help="Batch size.", show_default=False)]
WorkersOption = Annotated[int | None, typer.Option("--workers", "-j", min=0, help="Data loader worker processes.", show_default=False)]
SeedOption = Annotated[int | None, typer.Option("--seed", min=0, help="Random seed.", show_default=False)]
CropOption = Annotated[int | None, typer.Option("--crop", help="Square crop size in pixels.", show_default=False)]
# eval and predict: the inference window. Bounded here by the settings' constant (a training crop
# is bounded by the settings themselves); defaults: engine/inference/protocol.py.
WindowOption = Annotated[
    int | None,
    typer.Option("--crop", min=MIN_CROP, help="Window of the sliding window (and of center-crop); default: the "
                 "checkpoint's evaluation window, else its training crop.", show_default=False),
]
StrideOption = Annotated[
    int | None,
    typer.Option("--stride", min=1, help="Sliding-window step; default: the checkpoint's for its own window, "
                 "else floor(2/3 crop).", show_default=False),
]
# Loader processes of eval and predict: image decoding overlaps the forward without taking the
# cores a CPU forward needs.
INFERENCE_WORKERS = 2
DataOption = Annotated[
    Path | None,
    typer.Option("--data", help="A prepared dataset: its dataset.yaml or folder.", show_default=False),
]
SplitOption = Annotated[
    str | None,
    typer.Option("--split", help="Training split of the dataset, e.g. 1/8 (default: the preset's; without a preset "
                 "the dataset's only one).", show_default=False),
]
NameOption = Annotated[str | None, typer.Option("--name", "-n", help="Name of the output folder.", show_default=False)]
ExistOkOption = Annotated[bool, typer.Option("--exist-ok", help="Reuse an existing output folder of that name.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override any setting, e.g. --set train.epochs=3 (repeatable; YAML values).", show_default=False),
]
EpochsOption = Annotated[int | None, typer.Option("--epochs", help="Training epochs (passes over the unlabeled list).", show_default=False)]
LrOption = Annotated[float | None, typer.Option("--lr", help="Backbone learning rate (head: x multiplier).", show_default=False)]
ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file layered over the preset.", show_default=False)]
ThreadsOption = Annotated[
    int | None,
    typer.Option("--threads", min=1, help="CPU threads of torch (default: OMP_NUM_THREADS, else one per core); "
                 "another count changes results in the last bits.", show_default=False),
]
RecipeOption = Annotated[
    Recipe | None,
    typer.Option("--recipe", help="Unlabeled loss of every semi-supervised method: reference (the paper's) or "
                 "weak-to-strong (confidence-filtered, on a strong view; DESIGN.md 3a).", show_default=False),
]
AccumulateOption = Annotated[
    str | None,
    typer.Option("--accumulate", metavar="N|auto", help="Micro-steps per optimizer step (whole groups each: the same "
                 "step in less memory); auto: 1 on CPU, measured on CUDA.", show_default=False),
]
