"""Gradient accumulation over the reference's groups: one step as N sequential micro-steps.

The process's batch holds G groups (engine/training/step.py). With `train.accumulation_steps` N
(N divides G), micro-step k takes the consecutive groups [k G/N, (k+1) G/N) of both halves and runs
the forward and backward of those groups alone, and the optimizer steps once after the last. Every
loss is a mean over groups, so the one-shot step's loss is the mean of the N micro-steps' losses,
and each micro-step's backward carries 1/N of it:

    L = (1/G) sum_g L_g = (1/N) sum_k L^(k),    L^(k) = (N/G) sum_{g in micro-step k} L_g

The pseudo-label pass runs once over the whole step's unlabeled images, as in the one-shot step:
it has no gradient, so it keeps no activations (its peak, that of the one-shot step's pass, is part
of what `--accumulate auto` measures), and one pass over the batch runs 1/N of the kernels that N
passes over its pieces would, each on more data: kernel launches and the threads' synchronisation
are paid per kernel, not per image.

Nothing a group computes depends on another group, except two things:
- the Semantic Memory: in the one-shot step every group's unlabeled channels are written (in image
  order) before any group reads the memory. Writes of consecutive pieces one after the other equal
  one write of them all (each ring advances by the same ranks), so a step that does not read the
  memory (warm-up) on one process lets each micro-step write its own piece. A step that reads it,
  or whose writes are gathered over DDP ranks (a gather per piece would interleave the ranks'
  pieces), computes the unlabeled tokens of micro-steps 2..N ahead, in one no-gradient encoder pass
  in train mode (as the forward would), and micro-step 1 writes its own tokens followed by those
  (`MemoryStep.later_tokens_u`) before it reads, as the one-shot forward does; the later micro-steps
  only read. That pass over (N - 1)/N of the unlabeled images is the price of exactness;
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

from allspark_cli.engine.training.alignment import DistributionAlignment
from allspark_cli.engine.training.losses import Criterion
from allspark_cli.engine.training.pseudo_labels import ConfidentTargets
from allspark_cli.engine.training.step import (
    StepLosses,
    StepRecipe,
    UnlabeledBatch,
    prepare_unlabeled,
    step_losses,
    train_step,
)
from allspark_cli.errors import SettingsError
from allspark_cli.model.allspark import NO_MEMORY_STEP, MemoryStep
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
    alignment: DistributionAlignment | None = None,
    teacher: nn.Module | None = None,
) -> StepLosses:
    """Forward and backward of one step in `micro_steps` pieces (see the module docstring): calls
    `backward(loss)` once per piece with 1/N of the step's loss, and returns the step's losses
    (detached; `health` summed over the pieces). The caller steps the optimizer. The pseudo labels
    are aligned once, over the whole step (`alignment`, as `train_step`), by `teacher` when given."""
    check_accumulation(micro_steps, recipe.groups)
    if micro_steps == 1:  # the one-shot step
        losses = train_step(runner, segmentor, batch_l, batch_u, criterion_l=criterion_l, use_memory=use_memory,
                            iteration=iteration, gather=gather, autocast=autocast, recipe=recipe,
                            alignment=alignment, teacher=teacher)
        backward(losses.total)
        return losses._replace(total=losses.total.detach())
    piece_recipe = recipe._replace(groups=recipe.groups // micro_steps)
    unlabeled = None if batch_u is None else prepare_unlabeled(segmentor, batch_u, autocast, recipe, alignment, teacher)
    pieces_u = _unlabeled_pieces(unlabeled, micro_steps)
    memory_steps = _memory_steps(segmentor, unlabeled, pieces_u, use_memory, iteration, gather, autocast)
    results = []
    pieces = zip(_pieces(batch_l, micro_steps), pieces_u, memory_steps)
    for index, (piece_l, piece_u, memory_step) in enumerate(pieces):
        no_sync = runner.no_sync if hasattr(runner, "no_sync") and index < micro_steps - 1 else nullcontext
        with no_sync():
            losses = step_losses(runner, piece_l, piece_u, criterion_l=criterion_l, memory_step=memory_step,
                                 iteration=iteration, autocast=autocast, recipe=piece_recipe)
            backward(losses.total / micro_steps)
        results.append(losses)
    return _combined(results)


def _unlabeled_pieces(unlabeled: UnlabeledBatch | None, micro_steps: int) -> list[UnlabeledBatch | None]:
    """The prepared unlabeled half cut into `micro_steps` consecutive pieces (views, no copies)."""
    if unlabeled is None:
        return [None] * micro_steps
    targets = _pieces(unlabeled.targets, micro_steps)
    tensors = _pieces((unlabeled.images, unlabeled.memory_logits, unlabeled.pseudo, unlabeled.sample_ids), micro_steps)
    return [UnlabeledBatch(images, logits, ConfidentTargets(*piece_targets), pseudo, sample_ids)
            for (images, logits, pseudo, sample_ids), piece_targets in zip(tensors, targets)]


def _memory_steps(
    segmentor: nn.Module,
    unlabeled: UnlabeledBatch | None,
    pieces_u: list[UnlabeledBatch | None],
    use_memory: bool,
    iteration: int,
    gather: Callable[[torch.Tensor], torch.Tensor] | None,
    autocast: Callable[[], ContextManager],
) -> list[MemoryStep]:
    """What each micro-step's forward writes into the Semantic Memory and reads (module docstring)."""
    if unlabeled is None:
        return [NO_MEMORY_STEP] * len(pieces_u)
    own = [MemoryStep(piece.memory_logits, use_memory, piece.sample_ids, iteration, gather) for piece in pieces_u]
    if getattr(segmentor, "memory", None) is None or not (use_memory or gather is not None):
        return own  # without a memory the writes are ignored; unread and not gathered, piece by piece is exact
    with autocast():  # the tokens micro-steps 2..N would write, before micro-step 1 reads
        later = segmentor.memory_tokens(unlabeled.images[pieces_u[0].images.shape[0]:])
    whole = MemoryStep(unlabeled.memory_logits, use_memory, unlabeled.sample_ids, iteration, gather, later)
    return [whole] + [step._replace(pseudo_logits_u=None) for step in own[1:]]


def _combined(results: list[StepLosses]) -> StepLosses:
    """The step's losses from its pieces': means of the losses, sums of the health counts."""
    total = torch.stack([r.total.detach() for r in results]).mean()
    loss_x = torch.stack([r.loss_x for r in results]).mean()
    loss_u = None if results[0].loss_u is None else torch.stack([r.loss_u for r in results]).mean()
    health = None if results[0].health is None else torch.stack([r.health for r in results]).sum(0)
    return StepLosses(total, loss_x, loss_u, health)
