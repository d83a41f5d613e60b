"""One semi-supervised training step (DESIGN.md section 1, "plain pseudo-labeling" + AllSpark).

Per step: the model in EVAL mode predicts the unlabeled batch without gradient; the argmax is the
pseudo label (no confidence threshold); the SAME raw logits go to
`forward_train(memory_step=MemoryStep(pseudo_logits_u=...))` for the memory grouping. Then the train-mode forward of
cat(labeled, unlabeled) gives the two losses; the step's loss is their mean (`sup`: the labeled
loss alone), unless `train.unlabeled_rampup` ramps the unlabeled weight up over its first
iterations (off by default: the reference's mean from the first step). Backward and the optimizer step are the caller's.

Groups (`StepRecipe.groups`): the process's batch is split into equal groups, each what one of the
reference's GPUs held (2 + 2 images for Pascal and Cityscapes, 4 + 4 for COCO). Within a group the
AllSpark keys/values come from the group's unlabeled images, the pseudo-label pass pools the
group's keys (`pseudo_label_pass="group"`, the reference; "image" runs each image on its own, as
inference does), and each loss is the group's mean; the step's losses are the means over groups,
which is what DDP's gradient averaging makes of the reference's per-GPU losses.

Padding of unlabeled crops: the reference pseudo-labels it and trains on it (`ignore_padding`
False); with `ignore_padding` the padded area is left out of the unlabeled loss.
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
from allspark_cli.engine.training.losses import Criterion, cross_entropy
from allspark_cli.model.allspark import MemoryStep, split_groups

# The semi-supervised loss is the plain mean of the two views' losses (the reference's weighting).
LABELED_WEIGHT = 0.5
UNLABELED_WEIGHT = 0.5
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


class StepLosses(NamedTuple):
    """Scalar losses of one step: `total` carries the gradient; `loss_u` is None for `sup`."""

    total: torch.Tensor
    loss_x: torch.Tensor
    loss_u: torch.Tensor | None


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
    when the recipe says so)."""
    segmentor.eval()
    with autocast():
        if recipe.pseudo_label_pass == "group":
            logits = segmentor.forward_pooled(images_u, recipe.groups).float()
        else:
            logits = segmentor(images_u).float()
    segmentor.train()
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


def train_step(
    runner: nn.Module,
    segmentor: nn.Module,
    batch_l: tuple[torch.Tensor, torch.Tensor],
    batch_u: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    *,
    criterion_l: Criterion,
    use_memory: bool,
    iteration: int,
    gather: Callable[[torch.Tensor], torch.Tensor] | None,
    autocast: Callable[[], ContextManager],
    recipe: StepRecipe = StepRecipe(),
) -> StepLosses:
    """Losses of one step. batch_l = (images (B,3,S,S), masks (B,S,S)); batch_u = (images,
    pad_mask (B,S,S) with 255 on padding, sample ids (B,)) or None (`sup`). `runner` is the
    (possibly DDP-wrapped) TrainForward of `segmentor`; all tensors are on the model's device."""
    images_l, masks_l = batch_l
    if batch_u is None:
        with autocast():
            output = runner(images_l, None)
        loss_x = grouped_loss(criterion_l, output.logits_l, masks_l, recipe.groups)
        return StepLosses(loss_x, loss_x.detach(), None)
    images_u, pad_mask, sample_ids = batch_u
    logits_u_eval, pseudo = pseudo_labels(segmentor, images_u, pad_mask, autocast, recipe)
    with autocast():
        memory_step = MemoryStep(logits_u_eval, use_memory, sample_ids, iteration, gather)
        output = runner(images_l, images_u, memory_step=memory_step, groups=recipe.groups)
    loss_x = grouped_loss(criterion_l, output.logits_l, masks_l, recipe.groups)
    loss_u = grouped_loss(_unlabeled_loss, output.logits_u, pseudo, recipe.groups)
    total = LABELED_WEIGHT * loss_x + UNLABELED_WEIGHT * rampup_factor(iteration, recipe.unlabeled_rampup) * loss_u
    return StepLosses(total, loss_x.detach(), loss_u.detach())
