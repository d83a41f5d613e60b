"""Gradient accumulation over the reference's groups: one step as N sequential micro-steps.

The process's batch holds G groups (engine/training/step.py). With `train.accumulation_steps` N
(N divides G), micro-step k takes the consecutive groups [k G/N, (k+1) G/N) of both halves, runs
the pseudo-label pass, forward and backward of those groups alone, and the optimizer steps once
after the last. Every loss is a mean over groups, so the one-shot step's loss is the mean of the N
micro-steps' losses, and each micro-step's backward carries 1/N of it:

    L = (1/G) sum_g L_g = (1/N) sum_k L^(k),    L^(k) = (N/G) sum_{g in micro-step k} L_g

Nothing a group computes depends on another group, except two things:
- the Semantic Memory: in the one-shot step every group's unlabeled channels are written (in image
  order) before any group reads the memory. So a memory method first computes the unlabeled tokens
  of the whole step piece by piece without gradient (train mode, as the forward would), writes them
  at once, and the micro-steps then read it (they write nothing). That pre-pass is the price of
  exactness: one extra no-gradient forward of the unlabeled images through the encoder;
- the head's BatchNorm: in train mode its batch statistics cover one micro-step's images, as on a
  CPU DDP process (the one difference; its running statistics too).
With dropout and drop-path off and BatchNorm in eval mode, the losses, every gradient and the
memory equal the one-shot step's to float rounding (tests/test_accumulation.py). Under DDP the
gradient all-reduce runs only with the last micro-step's backward (`no_sync` before it).
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import ContextManager

import torch
from torch import nn

from allspark_cli.engine.training.losses import Criterion
from allspark_cli.engine.training.step import (
    StepLosses,
    StepRecipe,
    prepare_unlabeled,
    step_losses,
    train_step,
)
from allspark_cli.errors import SettingsError
from allspark_cli.model.allspark import MemoryStep
from allspark_cli.text import plural


def check_accumulation(micro_steps: int, groups: int) -> None:
    """SettingsError unless `micro_steps` divides the process's `groups` (whole groups per micro-step)."""
    if groups % micro_steps:
        raise SettingsError(
            f"train.accumulation_steps: {micro_steps} micro-steps must divide the {plural(groups, 'group')} of each "
            f"process's batch (whole groups per micro-step); use a divisor of {groups}"
        )


def _pieces(batch: tuple[torch.Tensor, ...] | None, micro_steps: int) -> list[tuple[torch.Tensor, ...] | None]:
    """Each tensor of `batch` cut along the batch dimension into `micro_steps` consecutive pieces."""
    if batch is None:
        return [None] * micro_steps
    return list(zip(*(tensor.chunk(micro_steps) for tensor in batch)))


def accumulated_step(
    runner: nn.Module,
    segmentor: nn.Module,
    batch_l: tuple[torch.Tensor, torch.Tensor],
    batch_u: tuple[torch.Tensor, ...] | None,
    *,
    micro_steps: int,
    backward: Callable[[torch.Tensor], None],
    criterion_l: Criterion,
    use_memory: bool,
    iteration: int,
    gather: Callable[[torch.Tensor], torch.Tensor] | None,
    autocast: Callable[[], ContextManager],
    recipe: StepRecipe = StepRecipe(),
) -> StepLosses:
    """Forward and backward of one step in `micro_steps` pieces (see the module docstring): calls
    `backward(loss)` once per piece with 1/N of the step's loss, and returns the step's losses
    (detached; `health` summed over the pieces). The caller steps the optimizer."""
    check_accumulation(micro_steps, recipe.groups)
    if micro_steps == 1:  # the one-shot step
        losses = train_step(runner, segmentor, batch_l, batch_u, criterion_l=criterion_l, use_memory=use_memory,
                            iteration=iteration, gather=gather, autocast=autocast, recipe=recipe)
        backward(losses.total)
        return losses._replace(total=losses.total.detach())
    piece_recipe = recipe._replace(groups=recipe.groups // micro_steps)
    pieces_l = _pieces(batch_l, micro_steps)
    unlabeled = [prepare_unlabeled(segmentor, piece, autocast, piece_recipe) if piece is not None else None
                 for piece in _pieces(batch_u, micro_steps)]
    prewritten = batch_u is not None and getattr(segmentor, "memory", None) is not None
    if prewritten:
        _write_step_memory(segmentor, unlabeled, use_memory, iteration, gather, autocast)
    results = []
    for index, (piece_l, piece_u) in enumerate(zip(pieces_l, unlabeled)):
        last = index == micro_steps - 1
        memory_step = MemoryStep() if piece_u is None else MemoryStep(
            None if prewritten else piece_u.memory_logits, use_memory, piece_u.sample_ids, iteration, gather)
        no_sync = runner.no_sync if hasattr(runner, "no_sync") and not last else nullcontext
        with no_sync():
            losses = step_losses(runner, piece_l, piece_u, criterion_l=criterion_l, memory_step=memory_step,
                                 iteration=iteration, autocast=autocast, recipe=piece_recipe)
            backward(losses.total / micro_steps)
        results.append(losses)
    return _combined(results)


@torch.no_grad()
def _write_step_memory(segmentor: nn.Module, unlabeled, use_memory: bool, iteration: int, gather, autocast) -> None:
    """The whole step's unlabeled tokens, computed piece by piece, written into the memory at once."""
    tokens, grid = [], None
    for piece in unlabeled:
        with autocast():
            piece_tokens, grid = segmentor.memory_tokens(piece.images)
        tokens.append(piece_tokens)
    logits = torch.cat([piece.memory_logits for piece in unlabeled])
    sample_ids = torch.cat([piece.sample_ids for piece in unlabeled])
    segmentor.write_memory(torch.cat(tokens), grid, MemoryStep(logits, use_memory, sample_ids, iteration, gather))


def _combined(results: list[StepLosses]) -> StepLosses:
    """The step's losses from its pieces': means of the losses, sums of the health counts."""
    total = torch.stack([r.total.detach() for r in results]).mean()
    loss_x = torch.stack([r.loss_x for r in results]).mean()
    loss_u = None if results[0].loss_u is None else torch.stack([r.loss_u for r in results]).mean()
    health = None if results[0].health is None else torch.stack([r.health for r in results]).sum(0)
    return StepLosses(total, loss_x, loss_u, health)
