"""`allspark prepare`: build a dataset folder (masks, split lists, dataset.yaml) or check one.

Each sub-command calls one builder of `data_tools` with a progress callback, then prints a
summary table; `check` renders the CheckReport of `allspark_cli.data.check`. Bad data raises
DataError (exit 3) and the one error boundary in `cli/errors.py` prints it. A stop signal
(SIGINT, SIGTERM, SIGHUP) anywhere in a build ends it with exit 130 and the resume hint.
"""
from __future__ import annotations

import shlex
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from allspark_cli.cli.option_groups import with_option_group
from allspark_cli.cli.options import SeedOption
from allspark_cli.errors import Interrupted
from allspark_cli.text import plural
from data_tools.common import CrowdMode

if TYPE_CHECKING:
    from allspark_cli.data.check import CheckReport
    from data_tools.common import PrepareSummary, ProgressFn

prepare_app = typer.Typer(
    name="prepare",
    help="Prepare a dataset (masks, split lists, dataset.yaml) or check a prepared one.",
    no_args_is_help=True,
)
console = Console()
# Problems listed row by row by `prepare check`; the rest are counted per rule.
MAX_PROBLEM_ROWS = 50
PERCENT = 100

OutOption = Annotated[Path, typer.Option("--out", "-o", help="Output folder of the prepared dataset.", file_okay=False)]
PrepareWorkersOption = Annotated[
    int | None, typer.Option("--workers", "-j", min=1, help="Processes that convert files (default: all cores).", show_default=False)
]
SplitsFromOption = Annotated[
    Path | None,
    # No `exists=True`: a missing folder is bad data (exit 3, named by the builder), not bad usage.
    typer.Option("--splits-from", help="Folder of reference split files (<name>/labeled.txt, unlabeled.txt; the published "
                 "folders as they are, or a subset of them) to import byte for byte.", show_default=False),
]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Rebuild every mask of --out (needed when the options that determine the masks changed).")
]


@dataclass(frozen=True)
class MaskBuildOptions:
    """The options of a builder that writes its own masks (pascal, coco): which splits, and how the
    masks are written. Each field's annotation is its option; the field order is that of --help."""

    splits_from: SplitsFromOption = None
    seed: SeedOption = None
    overwrite: OverwriteOption = False
    workers: PrepareWorkersOption = None

    def arguments(self) -> dict[str, Any]:
        """The builder's keyword arguments for these options (seed 0 unless given)."""
        return {"splits_from": self.splits_from, "seed": self.seed or 0, "overwrite": self.overwrite, "workers": self.workers}


with_mask_build_options = with_option_group("build", MaskBuildOptions)


@contextmanager
def _resumable() -> Iterator[None]:
    """A stop signal outside the conversion stage (which stops on its own; the CLI turns SIGTERM and
    SIGHUP into KeyboardInterrupt around every command) ends the build with the resume hint."""
    from data_tools.common import RESUME_HINT

    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; {RESUME_HINT}") from None


@contextmanager
def _progress_bar() -> Iterator[Callable[[str, int, int], None]]:
    """A rich bar per stage; yields the `progress(stage, done, total)` callback the builders take."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


def _build(builder: Callable[[ProgressFn], PrepareSummary]) -> PrepareSummary:
    """Runs `builder(progress)` with the stages' bars (a stop ends it with the resume hint), then
    prints its summary."""
    with _resumable(), _progress_bar() as progress:
        summary = builder(progress)
    _show_summary(summary)
    return summary


def _show_summary(summary: PrepareSummary) -> None:
    table = Table(title=f"{summary.name}: {summary.manifest_path}")
    table.add_column("split")
    table.add_column("labeled", justify="right")
    table.add_column("unlabeled", justify="right")
    for name, (labeled, unlabeled) in summary.split_sizes.items():
        table.add_row(name, str(labeled), "-" if unlabeled is None else str(unlabeled))
    console.print(table)
    if summary.samples_checked:
        console.print(f"checked {plural(summary.samples_checked, 'file')}")
    else:
        console.print(f"masks: {summary.masks_written} written, {summary.masks_skipped} already complete (skipped)")
    for note in summary.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"next: allspark prepare check {summary.manifest_path}")


@prepare_app.command("pascal")
@with_mask_build_options
def pascal(
    voc_root: Annotated[Path, typer.Option("--voc-root", help="VOCdevkit/VOC2012 (JPEGImages, SegmentationClass, ImageSets).")],
    out: OutOption,
    sbd_root: Annotated[Path | None, typer.Option("--sbd-root", help="SBD benchmark_RELEASE (dataset/cls/*.mat).", show_default=False)] = None,
    aug_masks: Annotated[Path | None, typer.Option("--aug-masks", help="SegmentationClassAug folder (instead of --sbd-root).", show_default=False)] = None,
    build: MaskBuildOptions = MaskBuildOptions(),
) -> None:
    """Pascal VOC 2012 + SBD: the 10,582-image augmented masks, every reference split, val."""
    from data_tools.pascal import prepare_pascal

    _build(lambda progress: prepare_pascal(voc_root, out, sbd_root=sbd_root, aug_masks=aug_masks, **build.arguments(),
                                           progress=progress))


@prepare_app.command("cityscapes")
def cityscapes(
    root: Annotated[Path, typer.Option("--root", help="Cityscapes folder holding leftImg8bit/ and gtFine/.")],
    out: OutOption,
    splits_from: SplitsFromOption = None,
    seed: SeedOption = None,
    workers: PrepareWorkersOption = None,
) -> None:
    """Cityscapes: *_gtFine_labelTrainIds.png beside each labelIds mask, splits 1/30..1/2, val."""
    from data_tools.cityscapes import prepare_cityscapes

    _build(lambda progress: prepare_cityscapes(root, out, splits_from=splits_from, seed=seed or 0, workers=workers,
                                               progress=progress))


@prepare_app.command("coco")
@with_mask_build_options
def coco(
    root: Annotated[Path, typer.Option("--root", help="COCO folder holding train2017/, val2017/ and annotations/.")],
    out: OutOption,
    crowd: Annotated[
        CrowdMode, typer.Option("--crowd", help="Crowd regions: background (as the reference) or ignore (255).")
    ] = "background",
    build: MaskBuildOptions = MaskBuildOptions(),
) -> None:
    """COCO 2017: 81-class masks from the instance annotations, splits 1/512..1/32, val."""
    from data_tools.coco import prepare_coco

    _build(lambda progress: prepare_coco(root, out, crowd=crowd, **build.arguments(), progress=progress))


@prepare_app.command("custom")
def custom(
    classes: Annotated[Path, typer.Option("--classes", help="Text file: one class name a line (line i = class id i).")],
    out: OutOption,
    images: Annotated[Path | None, typer.Option("--images", help="Folder of training images (subfolders included).", show_default=False)] = None,
    masks: Annotated[Path | None, typer.Option("--masks", help="Folder of PNG masks, named like their images (a.jpg -> a.png).", show_default=False)] = None,
    val_images: Annotated[Path | None, typer.Option("--val-images", help="Folder of the fixed validation images (none of them in training).", show_default=False)] = None,
    val_masks: Annotated[Path | None, typer.Option("--val-masks", help="Folder of the masks of --val-images.", show_default=False)] = None,
    mmseg_root: Annotated[Path | None, typer.Option("--mmseg-root", help="mmsegmentation layout: img_dir/{train,val} + ann_dir/{train,val} (instead of the four folders).", show_default=False)] = None,
    train_list: Annotated[Path | None, typer.Option("--train-list", help="Text file naming the training images of --images, one a line (with --val-list).", show_default=False)] = None,
    val_list: Annotated[Path | None, typer.Option("--val-list", help="Text file naming the validation images of --images, one a line.", show_default=False)] = None,
    unlabeled: Annotated[Path | None, typer.Option("--unlabeled", help="Folder of images without masks.", show_default=False)] = None,
    unlabeled_from_images: Annotated[bool, typer.Option("--unlabeled-from-images", help="Images of --images without a mask are unlabeled (instead of an error).")] = False,
    palette: Annotated[Path | None, typer.Option("--palette", help="Text file: one colour 'R G B' or '#rrggbb' per class; colour (RGB) masks are converted through it.", show_default=False)] = None,
    ratio: Annotated[list[str] | None, typer.Option("--ratio", help="Labeled share of the training images, e.g. 1/8 (default); one training split each: repeat it or give a comma list (1/8,1/4).", show_default=False)] = None,
    count: Annotated[int | None, typer.Option("--count", min=1, help="Labeled training images (instead of --ratio).", show_default=False)] = None,
    val_ratio: Annotated[str | None, typer.Option("--val-ratio", help="Share of the masked images drawn for val (default 1/10) when val is not fixed.", show_default=False)] = None,
    name: Annotated[str | None, typer.Option("--name", help="Dataset name (default: the --out folder name).", show_default=False)] = None,
    seed: SeedOption = None,
    workers: PrepareWorkersOption = None,
) -> None:
    """Your own images and masks: checks every file, writes splits and dataset.yaml."""
    from allspark_cli.data.manifest import FULL_SPLIT
    from data_tools.custom import prepare_custom

    summary = _build(lambda progress: prepare_custom(
        images, masks, classes, out, unlabeled_dir=unlabeled, unlabeled_from_images=unlabeled_from_images,
        val_images_dir=val_images, val_masks_dir=val_masks, mmseg_root=mmseg_root, train_list=train_list,
        val_list=val_list, palette_file=palette, ratio=ratio, count=count, val_ratio=val_ratio, seed=seed or 0,
        name=name, workers=workers, progress=progress,
    ))
    # The exact command that trains on it: the default recipe for your own data (docs/training.md).
    for split in summary.split_sizes:
        if split != FULL_SPLIT and summary.split_sizes[split][1] is not None:
            console.print(f"next: allspark train --data {shlex.quote(str(out))} --split {shlex.quote(split)}",
                          soft_wrap=True, markup=False, highlight=False)


@prepare_app.command("demo")
def demo(
    out: OutOption,
    seed: SeedOption = None,
    workers: PrepareWorkersOption = None,
    family: Annotated[str, typer.Option(
        "--family", help="Procedural family: shapes (the demo presets' dataset) or signs (a second family, to check "
        "that a recipe is not tuned to one dataset).")] = "shapes",
) -> None:
    """A small synthetic dataset (shapes on textures) to try the toolkit without downloads."""
    from data_tools.demo import build_demo

    with _progress_bar() as progress:
        manifest_path = build_demo(out, seed=seed or 0, workers=workers, family=family,
                                   progress=lambda done, total: progress("images", done, total))
    console.print(f"demo dataset: {manifest_path}")
    console.print(f"next: allspark prepare check {manifest_path}")


def _show_report(report: CheckReport) -> None:
    manifest = report.manifest
    counts = Table(title=f"{manifest.name}: {manifest.root} ({'fast' if report.fast else 'full'} check)")
    for column, justify in (("split", "left"), ("labeled", "right"), ("unlabeled", "right")):
        counts.add_column(column, justify=justify)
    for name, (labeled, unlabeled) in report.split_sizes.items():
        counts.add_row(name, str(labeled), str(unlabeled))
    console.print(counts)
    console.print(f"images checked: {report.images_checked}, masks decoded: {report.masks_checked}")
    shares = Table(title="pixel share per class (% of labeled pixels)")
    shares.add_column("class")
    for group in report.stats:
        shares.add_column(group, justify="right")
    for index, class_name in enumerate(manifest.classes):
        shares.add_row(f"{index} {class_name}", *(f"{stats.pixel_share[index] * PERCENT:.2f}" for stats in report.stats.values()))
    console.print(shares)
    if report.ok:
        console.print("[green]no problems found[/]")
        return
    # One plain line a problem, never cut: logs are often 80 columns wide and the file name matters.
    console.print(f"[bold red]{plural(len(report.problems), 'problem')}[/] (file: rule: detail)")
    for problem in report.problems[:MAX_PROBLEM_ROWS]:
        line = f"{problem.file}: {problem.rule}" + (f": {problem.detail}" if problem.detail else "")
        console.print(line, soft_wrap=True, markup=False, highlight=False)
    if len(report.problems) > MAX_PROBLEM_ROWS:
        rules = ", ".join(f"{rule}: {n}" for rule, n in report.rule_counts().items())
        console.print(f"... and {len(report.problems) - MAX_PROBLEM_ROWS} more ({rules})")


@prepare_app.command("check")
def check(
    dataset: Annotated[Path, typer.Argument(help="A prepared dataset: its folder or dataset.yaml.")],
    fast: Annotated[bool, typer.Option("--fast", help="Read headers only and decode a sample of the masks.")] = False,
    workers: PrepareWorkersOption = None,
) -> None:
    """Checks every file a dataset.yaml lists; exit code 3 when any rule fails."""
    from allspark_cli.data.check import check_dataset, raise_if_problems

    with _progress_bar() as progress:
        report = check_dataset(dataset, fast=fast, workers=workers, progress=lambda done, total: progress("check", done, total))
    _show_report(report)
    raise_if_problems(report, listed=True)


def register(app: typer.Typer) -> None:
    """Adds `allspark prepare ...` to the app."""
    app.add_typer(prepare_app, name="prepare")
