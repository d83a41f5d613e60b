"""The training display on a terminal: the live bars of `train` and `ablate` (one declaration for both)."""
from __future__ import annotations

from collections.abc import Iterator

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from allspark_cli.engine.training import events


class _ProgressWithStatus(Progress):
    """The bars, then the status (losses, lr, mIoU) on a line of its own: beside the bars it would
    take the width the done/total and ETA columns need at 80 columns."""

    status = ""

    def get_renderables(self) -> Iterator[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        if self.status:
            yield Text(self.status, no_wrap=True, overflow="ellipsis")


class RichReporter:
    """A live bar with done/total and ETA, the losses, lr and last mIoU below it, and a second bar
    while the model is evaluated (terminals only)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = _ProgressWithStatus(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                            TimeElapsedColumn(), TimeRemainingColumn(), console=console)
        self.task = None
        self.eval_task = None
        self.miou = "-"

    def start(self, info: events.StartInfo) -> None:
        # Plain text (markup off): the banner contains "[allspark, MiT-B5]", which is not markup.
        self.console.print(events.format_start(info), markup=False, highlight=False)
        for note in info.notes:
            self.console.print(f"note: {note}", style="yellow", markup=False, highlight=False)
        total = info.epochs * info.iterations_per_epoch
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=info.start_iteration)

    def step(self, info: events.StepInfo) -> None:
        loss_u = "-" if info.loss_u is None else f"{info.loss_u:.3f}"
        self.progress.status = (f"epoch {info.epoch + 1}/{info.epochs}  loss_x {info.loss_x:.3f}  loss_u {loss_u}  "
                                f"lr {info.lr:.2e}  mIoU {self.miou}")
        self.progress.update(self.task, completed=info.iteration)

    def evaluating(self, done: int, total: int) -> None:
        if self.eval_task is None:
            self.eval_task = self.progress.add_task("eval", total=total)
        self.progress.update(self.eval_task, completed=done, total=total)

    def evaluated(self, info: events.EvalInfo) -> None:
        if self.eval_task is not None:
            self.progress.remove_task(self.eval_task)
            self.eval_task = None
        self.miou = f"{info.miou:.2f}"
        self.progress.console.print(events.format_eval(info), markup=False, highlight=False)

    def message(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self.progress.stop()
