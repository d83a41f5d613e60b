"""One semi-supervised training step (DESIGN.md section 1, "plain pseudo-labeling" + AllSpark,
and section 3a, the weak-to-strong recipe).

Per step: the model in EVAL mode predicts the unlabeled batch without gradient; the argmax is the
pseudo label; the SAME raw logits go to `forward_train(memory_step=MemoryStep(pseudo_logits_u=...))`
for the memory grouping. Then the train-mode forward of cat(labeled, unlabeled) gives the two losses.

Recipes (`StepRecipe.weak_to_strong`):
- reference: the unlabeled loss is CE against the pseudo labels on the very view that was
  pseudo-labeled, every pixel (no confidence threshold);
- weak-to-strong: the pseudo-label pass sees the weak view (the reference's); the train-mode
  forward sees the strong view of the same crop, CutMixed within its group (engine/training/
  pseudo_labels.py), and the loss counts the pixels whose weak confidence is at least the
  threshold, divided by the valid pixels. The memory is grouped by the weak logits mixed like the images.

Weighting: total = labeled_weight * loss_x + unlabeled_weight * ramp(t) * loss_u, with (0.5, 0.5)
the reference's mean and (1, lambda) FixMatch's; `sup` trains loss_x alone at weight 1. The ramp
(`train.unlabeled_rampup`) is off by default.

Groups (`StepRecipe.groups`): the process's batch is split into equal groups, each what one of the
reference's GPUs held (2 + 2 images for Pascal and Cityscapes, 4 + 4 for COCO). Within a group the
AllSpark keys/values come from the group's unlabeled images, the pseudo-label pass pools the
group's keys (`pseudo_label_pass="group"`, the reference; "image" runs each image on its own, as
inference does), and each loss is the group's mean; the step's losses are the means over groups,
which is what DDP's gradient averaging makes of the reference's per-GPU losses.

Padding of unlabeled crops: the reference pseudo-labels it and trains on it (`ignore_padding`
False); with `ignore_padding`, and always under weak-to-strong, the padded area is left out of the
unlabeled loss.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import ContextManager, NamedTuple

import torch
from torch import nn

from allspark_cli.constants import IGNORE_INDEX
from allspark_cli.data.transforms import UNLABELED_PADDING
from allspark_cli.engine.distributed import match_gradient_layout_
from allspark_cli.engine.settings import PseudoLabelPass
from allspark_cli.engine.training.alignment import DistributionAlignment
from allspark_cli.engine.training.losses import Criterion, cross_entropy
from allspark_cli.engine.training.pseudo_labels import (
    ConfidentTargets,
    confident_cross_entropy,
    confident_targets,
    cutmix,
    group_partners,
    health_counts,
)
from allspark_cli.model.allspark import MemoryStep, split_groups

# The reference's weighting: the plain mean of the two views' losses.
MEAN_WEIGHTS = (0.5, 0.5)
# FixMatch's weighting keeps the labeled loss at full weight; the unlabeled one is lambda (a setting).
FIXMATCH_LABELED_WEIGHT = 1.0
# The sigmoid ramp-up of Laine & Aila (2017): weight exp(-RAMP_SHARPNESS (1 - t/T)^2), 0.7% at t = 0.
RAMP_SHARPNESS = 5.0


def rampup_factor(iteration: int, rampup_iterations: int) -> float:
    """The unlabeled loss's share of its full weight at `iteration` (0-based): 1 without a ramp."""
    if rampup_iterations == 0 or iteration >= rampup_iterations:
        return 1.0
    remaining = 1.0 - iteration / rampup_iterations
    return math.exp(-RAMP_SHARPNESS * remaining * remaining)


class StepRecipe(NamedTuple):
    """How a step couples the images of the process's batch (see the module docstring)."""

    groups: int = 1
    pseudo_label_pass: PseudoLabelPass = "group"
    ignore_padding: bool = False
    unlabeled_rampup: int = 0  # iterations of the unlabeled weight's ramp (0: the reference's full weight)
    weak_to_strong: bool = False  # the weak-to-strong recipe (batch_u then carries the strong view and boxes)
    confidence_threshold: float = 0.0  # weak-to-strong: the weak confidence a pixel needs to be trained on
    labeled_weight: float = MEAN_WEIGHTS[0]
    unlabeled_weight: float = MEAN_WEIGHTS[1]
    num_classes: int = 0  # > 0: the step also returns its PseudoHealth counts


def loss_weights(weighting: str, unlabeled_lambda: float) -> tuple[float, float]:
    """(labeled, unlabeled) weights of `train.loss_weighting` ('mean' or 'fixmatch')."""
    return MEAN_WEIGHTS if weighting == "mean" else (FIXMATCH_LABELED_WEIGHT, unlabeled_lambda)


class StepLosses(NamedTuple):
    """Scalar losses of one step: `total` carries the gradient; `loss_u` is None for `sup`;
    `health` the step's PseudoHealth counts (None for `sup` or when not asked for)."""

    total: torch.Tensor
    loss_x: torch.Tensor
    loss_u: torch.Tensor | None
    health: torch.Tensor | None = None


class TrainForward(nn.Module):
    """Routes `forward` to `segmentor.forward_train`, so DDP's gradient hooks (which only run
    through `forward`) see the training forward."""

    def __init__(self, segmentor: nn.Module) -> None:
        super().__init__()
        # DDP wraps this module: gradients must come with their parameters' strides (no warning, no copy).
        self.segmentor = match_gradient_layout_(segmentor)

    def forward(self, images_l: torch.Tensor, images_u: torch.Tensor | None, **kwargs):
        return self.segmentor.forward_train(images_l, images_u, **kwargs)


@torch.no_grad()
def pseudo_labels(
    segmentor: nn.Module,
    images_u: torch.Tensor,
    pad_mask: torch.Tensor,
    autocast: Callable[[], ContextManager],
    recipe: StepRecipe = StepRecipe(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode logits (B, K, H, W) float32 and their argmax (B, H, W) int64 (padding = ignore
    when the recipe says so). `segmentor` is left in the mode it came in (the student in train
    mode, an EMA teacher in eval mode)."""
    was_training = segmentor.training
    segmentor.eval()
    with autocast():
        if recipe.pseudo_label_pass == "group":
            logits = segmentor.forward_pooled(images_u, recipe.groups).float()
        else:
            logits = segmentor(images_u).float()
    segmentor.train(was_training)
    pseudo = logits.argmax(dim=1)
    if recipe.ignore_padding:
        pseudo[pad_mask == UNLABELED_PADDING] = IGNORE_INDEX
    return logits, pseudo


def grouped_loss(criterion: Criterion, logits: torch.Tensor, target: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean over the equal groups of the batch of each group's loss (one group: the plain loss)."""
    if groups == 1:
        return criterion(logits, target)
    pairs = zip(split_groups(logits, groups), split_groups(target, groups))
    return torch.stack([criterion(group_logits, group_target) for group_logits, group_target in pairs]).mean()


# CE against the pseudo labels: every pixel counts except the ignored padding (when ignored).
_unlabeled_loss = partial(cross_entropy, ignore_index=IGNORE_INDEX)


def _confident_loss(logits_u: torch.Tensor, targets: ConfidentTargets, groups: int) -> torch.Tensor:
    """Mean over groups of each group's confidence-filtered CE (one group: the plain loss)."""
    parts = zip(split_groups(logits_u, groups), *(split_groups(t, groups) for t in targets))
    return torch.stack([confident_cross_entropy(logits, ConfidentTargets(*rest)) for logits, *rest in parts]).mean()


class UnlabeledBatch(NamedTuple):
    """The unlabeled half of a step, ready for the train-mode forward: the images it sees (the
    strong mixed view under weak-to-strong), the eval-mode logits the memory groups by (mixed like
    the images), the loss targets, and the sample ids (B,)."""

    images: torch.Tensor  # (B, 3, S, S)
    memory_logits: torch.Tensor  # (B, K, S, S) float32
    targets: ConfidentTargets
    pseudo: torch.Tensor  # (B, S, S) int64: the reference recipe's targets (padding per the recipe)
    sample_ids: torch.Tensor


def prepare_unlabeled(
    segmentor: nn.Module,
    batch_u: tuple[torch.Tensor, ...],
    autocast: Callable[[], ContextManager],
    recipe: StepRecipe,
    alignment: DistributionAlignment | None = None,
    teacher: nn.Module | None = None,
) -> UnlabeledBatch:
    """The pseudo-label pass over `batch_u` (see `train_step`) and, under weak-to-strong, the CutMix
    of the strong view within groups and the distribution alignment of the pseudo labels (when
    given; once per step, engine/training/alignment.py). `teacher` (an EMA of `segmentor`,
    engine/training/teacher.py) runs the pseudo-label pass instead of `segmentor` when given."""
    images_u, pad_mask, sample_ids = batch_u[:3]
    labeler = teacher if teacher is not None else segmentor
    logits_u_eval, pseudo = pseudo_labels(labeler, images_u, pad_mask, autocast, recipe)
    if recipe.weak_to_strong:
        strong, boxes = batch_u[3:]
        partners = group_partners(images_u.shape[0], recipe.groups, images_u.device)
        logits_u_eval = cutmix(logits_u_eval, boxes, partners)
        images_u = cutmix(strong, boxes, partners)
        targets = confident_targets(logits_u_eval, cutmix(pad_mask, boxes, partners), recipe.confidence_threshold,
                                    align=alignment.align if alignment is not None else None)
    else:  # every non-padding pixel counts as passing (no threshold)
        targets = confident_targets(logits_u_eval, pad_mask, threshold=0.0)
    return UnlabeledBatch(images_u, logits_u_eval, targets, pseudo, sample_ids)


def step_losses(
    runner: nn.Module,
    batch_l: tuple[torch.Tensor, torch.Tensor],
    unlabeled: UnlabeledBatch | None,
    *,
    criterion_l: Criterion,
    memory_step: MemoryStep,
    iteration: int,
    autocast: Callable[[], ContextManager],
    recipe: StepRecipe,
) -> StepLosses:
    """The train-mode forward of labeled + unlabeled and the weighted losses (see `train_step`)."""
    images_l, masks_l = batch_l
    if unlabeled is None:
        with autocast():
            output = runner(images_l, None)
        loss_x = grouped_loss(criterion_l, output.logits_l, masks_l, recipe.groups)
        return StepLosses(loss_x, loss_x.detach(), None)
    with autocast():
        output = runner(images_l, unlabeled.images, memory_step=memory_step, groups=recipe.groups)
    loss_x = grouped_loss(criterion_l, output.logits_l, masks_l, recipe.groups)
    if recipe.weak_to_strong:
        loss_u = _confident_loss(output.logits_u, unlabeled.targets, recipe.groups)
    else:
        loss_u = grouped_loss(_unlabeled_loss, output.logits_u, unlabeled.pseudo, recipe.groups)
    ramp = rampup_factor(iteration, recipe.unlabeled_rampup)
    total = recipe.labeled_weight * loss_x + recipe.unlabeled_weight * ramp * loss_u
    health = health_counts(unlabeled.targets, masks_l, recipe.num_classes) if recipe.num_classes else None
    return StepLosses(total, loss_x.detach(), loss_u.detach(), health)


def train_step(
    runner: nn.Module,
    segmentor: nn.Module,
    batch_l: tuple[torch.Tensor, torch.Tensor],
    batch_u: tuple[torch.Tensor, ...] | None,
    *,
    criterion_l: Criterion,
    use_memory: bool,
    iteration: int,
    gather: Callable[[torch.Tensor], torch.Tensor] | None,
    autocast: Callable[[], ContextManager],
    recipe: StepRecipe = StepRecipe(),
    alignment: DistributionAlignment | None = None,
    teacher: nn.Module | None = None,
) -> StepLosses:
    """Losses of one step. batch_l = (images (B,3,S,S), masks (B,S,S)); batch_u = (images,
    pad_mask (B,S,S) with 255 on padding, sample ids (B,)), under weak-to-strong followed by (strong
    images (B,3,S,S), CutMix boxes (B,S,S)), or None (`sup`). `runner` is the (possibly DDP-wrapped)
    TrainForward of `segmentor`; all tensors are on the model's device. `alignment`: the run's
    distribution alignment of the pseudo labels (weak-to-strong only; None: off); `teacher`: the
    model that pseudo-labels (None: `segmentor` itself)."""
    unlabeled = (prepare_unlabeled(segmentor, batch_u, autocast, recipe, alignment, teacher)
                 if batch_u is not None else None)
    memory_step = (MemoryStep(unlabeled.memory_logits, use_memory, unlabeled.sample_ids, iteration, gather)
                   if unlabeled is not None else MemoryStep())
    return step_losses(runner, batch_l, unlabeled, criterion_l=criterion_l, memory_step=memory_step,
                       iteration=iteration, autocast=autocast, recipe=recipe)
