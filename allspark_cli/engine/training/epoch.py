"""One training epoch: the step loop with its schedule, logging, saving and stop checks.

`train_epoch` runs the iterations of one epoch from a given batch (a resumed run skips the batches
it already did), sets the poly learning rate per iteration (DESIGN.md section 3), calls the
semi-supervised step, steps the optimizer (through the fp16 scaler when enabled), logs every
`train.log_every` iterations (losses averaged over steps and ranks), saves `last.pt` every
`train.save_every` iterations, saves and raises on a stop request, and raises on a non-finite loss
without saving (the last save before it is the last good state). The per-step flags are read on the
host one step late, so that checking them never makes the host wait for the step it just queued.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from allspark_cli.engine import distributed as D
from allspark_cli.engine.settings import TrainSettings
from allspark_cli.engine.training.events import StepInfo, TrainReporter, format_step
from allspark_cli.engine.training.rundir import RunFolder
from allspark_cli.engine.training.state import TrainState
from allspark_cli.engine.training.accumulation import accumulated_step
from allspark_cli.engine.training.alignment import DistributionAlignment
from allspark_cli.engine.training.teacher import EmaTeacher
from allspark_cli.engine.training.pseudo_labels import CollapseMonitor, HealthSummary, PseudoHealth, summarize_health
from allspark_cli.engine.training.step import StepRecipe, loss_weights, train_step
from allspark_cli.engine.training.tensorboard import TensorBoardLog
from allspark_cli.engine.training.train_data import Loaders
from allspark_cli.errors import Interrupted, SettingsError
from allspark_cli.signals import StopRequest


HEALTH_DIGITS = 4  # decimals of the shares (percent) and confidences in metrics.jsonl


def poly_lr(base_lr: float, iteration: int, total: int, power: float) -> float:
    """lr * (1 - it/total)^power, per iteration (DESIGN.md section 3)."""
    return base_lr * (1 - iteration / total) ** power


@dataclass
class EpochLoop:
    """What every training step needs; built once by `_train`."""

    settings: TrainSettings
    dist: D.DistInfo
    runner: nn.Module  # TrainForward, DDP-wrapped under torchrun
    segmentor: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Callable[[], AbstractContextManager]
    criterion_l: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    gather: Callable[[torch.Tensor], torch.Tensor] | None  # the memory update's all-gather (DDP only)
    loaders: Loaders
    run_folder: RunFolder
    reporter: TrainReporter | None
    state: TrainState
    stop: StopRequest
    save: Callable[[Path], None]
    total_iterations: int
    tensorboard: TensorBoardLog | None = None  # rank 0 only
    class_names: list[str] = field(default_factory=list)  # non-empty: log the pseudo labels' health
    collapse: CollapseMonitor | None = None  # rank 0 only
    alignment: DistributionAlignment | None = None  # the pseudo labels' distribution alignment (weak-to-strong)
    teacher: EmaTeacher | None = None  # the pseudo-label teacher, when not the model itself


def step_recipe(settings: TrainSettings, groups: int, num_classes: int) -> StepRecipe:
    """The step's view of the training settings (engine/training/step.py)."""
    train = settings.train
    labeled_weight, unlabeled_weight = loss_weights(train.loss_weighting, train.unlabeled_weight)
    return StepRecipe(groups=groups, pseudo_label_pass=train.pseudo_label_pass,
                      ignore_padding=train.unlabeled_padding == "ignore", unlabeled_rampup=train.unlabeled_rampup,
                      weak_to_strong=train.recipe == "weak-to-strong",
                      confidence_threshold=train.confidence_threshold if train.recipe == "weak-to-strong" else 0.0,
                      labeled_weight=labeled_weight, unlabeled_weight=unlabeled_weight, num_classes=num_classes)


class _LossWindow:
    """Sums of (loss, loss_x, loss_u) over steps, averaged over steps and ranks on demand, and of
    the steps' PseudoHealth counts (summed over steps and ranks)."""

    def __init__(self, device: torch.device, health_size: int = 0) -> None:
        self.sums, self.steps, self.start = torch.zeros(3, device=device), 0, time.perf_counter()
        self.health = torch.zeros(health_size, device=device)
        self.first_iteration: int | None = None

    def add(self, losses: torch.Tensor, health: torch.Tensor | None = None, iteration: int = 0) -> None:
        self.sums += losses
        self.steps += 1
        if health is not None:
            self.health += health
        if self.first_iteration is None:
            self.first_iteration = iteration

    def means(self, dist: D.DistInfo) -> list[float]:
        return (D.all_reduce_(self.sums.clone()) / (self.steps * dist.world_size)).tolist()

    def health_counts(self) -> list[float]:
        return D.all_reduce_(self.health.clone()).tolist()

    def seconds_per_step(self) -> float:
        return (time.perf_counter() - self.start) / max(self.steps, 1)


def _health_record(summary: HealthSummary) -> dict[str, float | list[float] | None]:
    def rounded(value: float) -> float | None:  # JSON has no NaN: a class without pixels is null
        return None if math.isnan(value) else round(value, HEALTH_DIGITS)

    return {"pseudo_pass_share": rounded(summary.pass_share),
            "pseudo_class_share": [rounded(v) for v in summary.pseudo_share],
            "labeled_class_share": [rounded(v) for v in summary.labeled_share],
            "pseudo_confidence": [rounded(v) for v in summary.confidence]}


def _log_step(loop: EpochLoop, window: _LossWindow, epoch: int, iteration: int, lr: float, with_u: bool) -> None:
    means = window.means(loop.dist)
    info = StepInfo(epoch, loop.settings.train.epochs, iteration, loop.total_iterations, means[0], means[1],
                    means[2] if with_u else None, lr, window.seconds_per_step())
    health = window.health_counts() if with_u and loop.class_names else None
    summary = summarize_health(health, len(loop.class_names)) if health is not None else None
    if loop.dist.rank == 0:
        loop.run_folder.log(format_step(info))
        # Epochs count from 1 here as in results.csv and the log lines (the loop's own count is 0-based).
        record = {"epoch": epoch + 1, "iteration": iteration, "lr": lr, "loss": info.loss, "loss_x": info.loss_x,
                  "loss_u": info.loss_u, "seconds_per_iteration": info.seconds_per_iteration}
        loop.run_folder.append_metrics({**record, **(_health_record(summary) if summary is not None else {})})
        if health is not None and loop.collapse is not None:
            for warning in loop.collapse.add(health, window.first_iteration + 1, iteration):
                loop.run_folder.log(warning)
                if loop.reporter is not None:
                    loop.reporter.message(warning)
    if loop.reporter is not None:
        loop.reporter.step(info)
    if loop.tensorboard is not None:
        loop.tensorboard.step(iteration, loss=info.loss, loss_x=info.loss_x, loss_u=info.loss_u, lr=lr)
        if summary is not None:
            loop.tensorboard.health(iteration, summary, loop.class_names)


def _read_flags(loop: EpochLoop, flags: torch.Tensor, epoch: int, iteration: int) -> bool:
    """Reads a step's [non-finite, stop] flags on the host: SettingsError when its loss was not
    finite (the weights after it are not saved); True when a stop was requested."""
    nonfinite, stop = flags.tolist()
    if nonfinite > 0:
        saved = loop.state.saved_iteration
        where = (f"the last good state is in {loop.run_folder.last} (iteration {saved})" if saved is not None
                 else "no state was saved before it")
        raise SettingsError(
            f"the loss became non-finite at epoch {epoch + 1}, iteration {iteration}; {where}; "
            "lower --lr or use --amp off/bf16, then --resume (or start again)"
        )
    return stop > 0


def train_epoch(loop: EpochLoop, epoch: int, start_batch: int) -> tuple[dict[str, float | None] | None, float]:
    """Runs epoch `epoch` from batch `start_batch`; returns its mean losses (None when no step ran
    here, e.g. a run resumed exactly at the epoch's end) and the last lr."""
    settings, dist, state, loaders = loop.settings, loop.dist, loop.state, loop.loaders
    per_epoch = loaders.iterations_per_epoch
    for sampler in loaders.samplers:
        sampler.set_epoch(epoch, start_batch)
    for dataset in (loaders.datasets.labeled, loaders.datasets.unlabeled):
        if dataset is not None:
            dataset.set_epoch(epoch)
    use_memory = epoch >= settings.train.warmup_epochs
    lr = poly_lr(settings.optim.lr, epoch * per_epoch + start_batch, loop.total_iterations, settings.optim.poly_power)
    batches_u = iter(loaders.unlabeled) if loaders.unlabeled is not None else None
    num_classes = len(loop.class_names)
    recipe = step_recipe(settings, loaders.groups.count, num_classes)
    micro_steps = settings.train.accumulation_steps
    teacher = loop.teacher.model if loop.teacher is not None else None
    health_size = PseudoHealth.size(num_classes) if num_classes else 0
    window, epoch_window = _LossWindow(dist.device, health_size), _LossWindow(dist.device)
    unread: tuple[torch.Tensor, int, int] | None = None  # a step's flags not read on the host yet
    loop.segmentor.train()
    for batch_index, batch_l in enumerate(loaders.labeled, start=start_batch):
        iteration = epoch * per_epoch + batch_index
        lr = poly_lr(settings.optim.lr, iteration, loop.total_iterations, settings.optim.poly_power)
        for group in loop.optimizer.param_groups:
            group["lr"] = lr * group["base_lr"] / settings.optim.lr
        batch_l = [t.to(dist.device, non_blocking=True) for t in batch_l]
        batch_u = None if batches_u is None else [t.to(dist.device, non_blocking=True) for t in next(batches_u)]
        loop.optimizer.zero_grad(set_to_none=True)
        if loop.alignment is not None and batch_u is not None:
            loop.alignment.observe_labeled(batch_l[1])
        if micro_steps == 1:
            losses = train_step(loop.runner, loop.segmentor, batch_l, batch_u, criterion_l=loop.criterion_l,
                                use_memory=use_memory, iteration=iteration, gather=loop.gather,
                                autocast=loop.autocast, recipe=recipe, alignment=loop.alignment, teacher=teacher)
            loop.scaler.scale(losses.total).backward()
        else:  # forward and backward in pieces of whole groups (engine/training/accumulation.py)
            losses = accumulated_step(loop.runner, loop.segmentor, batch_l, batch_u, micro_steps=micro_steps,
                                      backward=lambda loss: loop.scaler.scale(loss).backward(),
                                      criterion_l=loop.criterion_l, use_memory=use_memory, iteration=iteration,
                                      gather=loop.gather, autocast=loop.autocast, recipe=recipe,
                                      alignment=loop.alignment, teacher=teacher)
        # [loss non-finite, stop requested], summed over ranks on the device; read on the host one
        # step late (or now, where the host waits anyway), so the host never waits for the step it
        # has just queued. No save happens before the flags of every step until then were read, so
        # a non-finite loss never reaches a checkpoint.
        flags = D.all_reduce_(torch.stack([(~torch.isfinite(losses.total.detach())).float(),
                                           torch.tensor(float(loop.stop.requested), device=dist.device)]))
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
        if loop.teacher is not None:
            loop.teacher.update(loop.segmentor)
        state.iteration, state.batch, state.epoch = iteration + 1, batch_index + 1, epoch
        loss_u = losses.loss_u if losses.loss_u is not None else torch.zeros((), device=dist.device)
        step_losses = torch.stack([losses.total.detach(), losses.loss_x, loss_u]).float()
        window.add(step_losses, losses.health, iteration)
        epoch_window.add(step_losses)
        stop_seen = unread is not None and _read_flags(loop, *unread)
        log_now = window.steps == settings.train.log_every or batch_index + 1 == per_epoch
        save_now = bool(settings.train.save_every) and (iteration + 1) % settings.train.save_every == 0
        unread = (flags, epoch, iteration)
        if log_now or save_now or stop_seen or batch_index + 1 == per_epoch:
            stop_seen = _read_flags(loop, *unread) or stop_seen
            unread = None
        if log_now:
            _log_step(loop, window, epoch, iteration + 1, lr, losses.loss_u is not None)
            window = _LossWindow(dist.device, health_size)
        if save_now or stop_seen:
            loop.save(loop.run_folder.last)
        if stop_seen:
            raise Interrupted(f"stopped at iteration {iteration + 1}; resume with "
                              f"allspark train --resume {loop.run_folder.path}")
    if unread is not None:  # an epoch cut short by the loader (never in practice): read it before the save
        _read_flags(loop, *unread)
    if not epoch_window.steps:
        return None, lr
    means = epoch_window.means(dist)
    return {"loss_x": means[1], "loss_u": means[2] if loaders.unlabeled is not None else None}, lr
