"""What the training loop reports while it runs, and a plain-text reporter.

The loop calls a `TrainReporter` (on rank 0 only); the CLI draws these events with rich (a live
bar on a terminal), and `PlainReporter` writes one line per event (logs, pipes, CI). The engine
itself never prints.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TextIO

from allspark_cli.data.transforms import CUTMIX_PROBABILITY
from allspark_cli.engine.training.presets import PAPER_GPUS
from allspark_cli.model.backbones import display_name
from allspark_cli.model.methods import METHODS
from allspark_cli.text import plural

SECONDS_PER_MINUTE = 60
PLAIN_EVAL_LINES = 4  # progress lines of one in-training evaluation in plain logs


@dataclass(frozen=True)
class StartInfo:
    """The startup banner: the run's scale next to the paper's (DESIGN.md section 3)."""

    run_dir: Path
    preset: str | None
    method: str
    backbone: str
    device: str
    world_size: int
    global_batch: int
    per_process_batch: int
    group_size: int  # images of each kind per group (see engine/training/step.py)
    lr: float
    head_lr: float
    amp: str
    epochs: int
    iterations_per_epoch: int
    labeled_images: int
    unlabeled_images: int
    start_iteration: int
    paper_batch: int | None
    paper_lr: float | None
    paper_gpus: int | None
    notes: list[str] = field(default_factory=list)
    recipe: str = "reference"  # the unlabeled loss's recipe, with its threshold and weighting ("" for sup)
    micro_steps: int = 1  # gradient accumulation (engine/training/accumulation.py)
    attention: str = ""  # the labeled branch's attention path, "(auto)" when the rule chose it; "" without it


@dataclass(frozen=True)
class StepInfo:
    """One log step: losses are means over the steps since the previous log line (all ranks)."""

    epoch: int
    epochs: int
    iteration: int
    total_iterations: int
    loss: float
    loss_x: float
    loss_u: float | None
    lr: float
    seconds_per_iteration: float


@dataclass(frozen=True)
class EvalInfo:
    epoch: int
    miou: float
    pixel_accuracy: float
    best_miou: float
    best_epoch: int
    seconds: float


class TrainReporter(Protocol):
    def start(self, info: StartInfo) -> None: ...

    def step(self, info: StepInfo) -> None: ...

    def evaluating(self, done: int, total: int) -> None:
        """Progress of an in-training evaluation: `done` of `total` validation images of this
        process's share (rank 0's; the shares of the other ranks are as large within one image)."""

    def evaluated(self, info: EvalInfo) -> None: ...

    def message(self, text: str) -> None: ...

    def close(self) -> None: ...


def format_step(info: StepInfo) -> str:
    loss_u = "-" if info.loss_u is None else f"{info.loss_u:.4f}"
    remaining = (info.total_iterations - info.iteration) * info.seconds_per_iteration
    return (
        f"epoch {info.epoch + 1}/{info.epochs} iter {info.iteration}/{info.total_iterations} "
        f"loss {info.loss:.4f} loss_x {info.loss_x:.4f} loss_u {loss_u} lr {info.lr:.3g} "
        f"{info.seconds_per_iteration:.2f}s/it eta {remaining / SECONDS_PER_MINUTE:.1f}min"
    )


def format_evaluating(done: int, total: int) -> str:
    return f"evaluating: {done}/{plural(total, 'validation image')}"


def format_eval(info: EvalInfo) -> str:
    return (
        f"epoch {info.epoch + 1} eval: mIoU {info.miou:.2f} pixel acc {info.pixel_accuracy:.2f} "
        f"(best {info.best_miou:.2f} at epoch {info.best_epoch + 1}) in {info.seconds:.1f}s"
    )


def format_start(info: StartInfo) -> str:
    paper = ""
    if info.paper_batch is not None:
        paper = f" (paper: {info.paper_batch}+{info.paper_batch} on {info.paper_gpus} GPUs, lr {info.paper_lr:g})"
    return (
        f"training {info.preset or 'custom'} [{info.method}, {display_name(info.backbone)}] on {info.device} x{info.world_size}: "
        f"global batch {info.global_batch}+{info.global_batch} in groups of {info.group_size}, lr {info.lr:g} "
        f"(head {info.head_lr:g}){paper}; "
        f"{plural(info.epochs, 'epoch')} x {plural(info.iterations_per_epoch, 'iteration')}; "
        + (f"{info.micro_steps} micro-steps per step (accumulated); " if info.micro_steps > 1 else "")
        + (f"recipe {info.recipe}; " if info.recipe else "")
        + (f"labeled attention {info.attention}; " if info.attention else "")
        + f"run folder {info.run_dir}"
    )


def recipe_text(settings) -> str:
    """'weak-to-strong (threshold 0.95, fixmatch loss_x + 1 x loss_u)' ('CutMix p' and a ramp named when not the
    defaults), or '' for a run without unlabeled loss."""
    train = settings.train
    if not METHODS[settings.model.method].unlabeled:
        return ""
    weighting = ("mean (loss_x + loss_u) / 2" if train.loss_weighting == "mean"
                 else f"fixmatch loss_x + {train.unlabeled_weight:g} x loss_u")
    details = []
    if train.recipe == "weak-to-strong":
        details.append(f"threshold {train.confidence_threshold:g}")
        if train.cutmix_probability != CUTMIX_PROBABILITY:
            details.append(f"CutMix p {train.cutmix_probability:g}")
        if train.distribution_alignment:
            details.append("distribution alignment")
    if train.teacher_momentum:
        details.append(f"EMA teacher {train.teacher_momentum:g}")
    if train.unlabeled_rampup:
        details.append(f"ramp {train.unlabeled_rampup} iterations")
    return f"{train.recipe} ({', '.join(details + [weighting])})"


class PlainReporter:
    """One line per event on `stream` (stderr by default)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._eval_part = 0  # quarters of the running evaluation already written

    def _write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def start(self, info: StartInfo) -> None:
        self._write(format_start(info))
        for note in info.notes:
            self._write(f"note: {note}")

    def step(self, info: StepInfo) -> None:
        self._write(format_step(info))

    def evaluating(self, done: int, total: int) -> None:
        # A line at each quarter: a log shows the evaluation advancing without a line per batch.
        part = done * PLAIN_EVAL_LINES // total
        if part > self._eval_part:
            self._eval_part = part
            self._write(format_evaluating(done, total))

    def evaluated(self, info: EvalInfo) -> None:
        self._eval_part = 0
        self._write(format_eval(info))

    def message(self, text: str) -> None:
        self._write(text)

    def close(self) -> None:
        return None


# The paper's per-kind global batch and lr by dataset (DESIGN.md section 3), for the banner.
PAPER_RECIPES = {"pascal": (8, 0.001), "cityscapes": (8, 0.005), "coco": (16, 0.001)}


def start_info(settings, run_dir, dist, loaders, start_iteration, notes, *, attention: str = "") -> StartInfo:
    """The banner of a run: its recipe, data and device, beside the paper's recipe for the dataset."""
    family = (settings.preset or "").split("-")[0]
    paper_batch, paper_lr = PAPER_RECIPES.get(family, (None, None))
    unlabeled = loaders.datasets.unlabeled
    return StartInfo(
        run_dir=run_dir, preset=settings.preset, method=settings.model.method, backbone=settings.model.backbone,
        device=str(dist.device), world_size=dist.world_size, global_batch=settings.train.batch_size,
        per_process_batch=loaders.groups.per_process, group_size=loaders.groups.size, lr=settings.optim.lr,
        head_lr=settings.optim.lr * settings.optim.head_lr_multiplier, amp=settings.train.amp,
        epochs=settings.train.epochs, iterations_per_epoch=loaders.iterations_per_epoch,
        labeled_images=len(loaders.datasets.labeled.entries),
        unlabeled_images=len(unlabeled) if unlabeled is not None else 0, start_iteration=start_iteration,
        paper_batch=paper_batch, paper_lr=paper_lr, paper_gpus=PAPER_GPUS if paper_batch else None, notes=notes,
        recipe=recipe_text(settings), micro_steps=settings.train.accumulation_steps, attention=attention,
    )
