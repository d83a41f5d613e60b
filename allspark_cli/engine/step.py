"""One semi-supervised training step (DESIGN.md section 1, "plain pseudo-labeling" + AllSpark).

Per step: the model in EVAL mode predicts the unlabeled batch without gradient; the argmax is the
pseudo label (no confidence threshold), with the unlabeled crop's padded area set to ignore; the
SAME raw logits go to `forward_train(pseudo_logits_u=...)` for the memory grouping. Then the
train-mode forward of cat(labeled, unlabeled) gives the two losses; the step's loss is their
mean (`sup`: the labeled loss alone). Backward and the optimizer step are the caller's.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import ContextManager, NamedTuple

import torch
from torch import nn

from allspark_cli.constants import IGNORE_INDEX
from allspark_cli.data.transforms import UNLABELED_PADDING
from allspark_cli.engine.losses import Criterion, cross_entropy

# The semi-supervised loss is the plain mean of the two views' losses (the reference's weighting).
LABELED_WEIGHT = 0.5
UNLABELED_WEIGHT = 0.5


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
        self.segmentor = segmentor

    def forward(self, images_l: torch.Tensor, images_u: torch.Tensor | None, **kwargs):
        return self.segmentor.forward_train(images_l, images_u, **kwargs)


@torch.no_grad()
def pseudo_labels(
    segmentor: nn.Module, images_u: torch.Tensor, pad_mask: torch.Tensor, autocast: Callable[[], ContextManager]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode logits (B, K, H, W) float32 and their argmax (B, H, W) int64, padding = ignore."""
    segmentor.eval()
    with autocast():
        logits = segmentor(images_u).float()
    segmentor.train()
    pseudo = logits.argmax(dim=1)
    pseudo[pad_mask == UNLABELED_PADDING] = IGNORE_INDEX
    return logits, pseudo


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
) -> StepLosses:
    """Losses of one step. batch_l = (images (B,3,S,S), masks (B,S,S)); batch_u = (images,
    pad_mask (B,S,S) with 255 on padding, sample ids (B,)) or None (`sup`). `runner` is the
    (possibly DDP-wrapped) TrainForward of `segmentor`; all tensors are on the model's device."""
    images_l, masks_l = batch_l
    if batch_u is None:
        with autocast():
            output = runner(images_l, None, pseudo_logits_u=None, use_memory=use_memory, iteration=iteration)
        loss_x = criterion_l(output.logits_l, masks_l)
        return StepLosses(loss_x, loss_x.detach(), None)
    images_u, pad_mask, sample_ids = batch_u
    logits_u_eval, pseudo = pseudo_labels(segmentor, images_u, pad_mask, autocast)
    with autocast():
        output = runner(
            images_l,
            images_u,
            pseudo_logits_u=logits_u_eval,
            use_memory=use_memory,
            sample_ids_u=sample_ids,
            iteration=iteration,
            gather=gather,
        )
    loss_x = criterion_l(output.logits_l, masks_l)
    loss_u = cross_entropy(output.logits_u, pseudo, ignore_index=IGNORE_INDEX)
    total = LABELED_WEIGHT * loss_x + UNLABELED_WEIGHT * loss_u
    return StepLosses(total, loss_x.detach(), loss_u.detach())
