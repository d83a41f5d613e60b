"""Segmentation losses of the training recipe (DESIGN.md section 3).

- `cross_entropy`: pixel-wise CE averaged over the pixels whose target is not `ignore_index`
  (VOC borders, Cityscapes void, the crop padding, and the padded area of unlabeled crops).
- `OhemCrossEntropy`: online hard example mining for the Cityscapes labeled loss: keep the pixels
  whose probability of the true class is below `thresh`, but never fewer than the `min_kept`
  hardest ones (the threshold is raised to the `min_kept`-th smallest probability when needed).
  With fewer valid pixels than `min_kept`, every valid pixel is kept.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from allspark_cli.constants import IGNORE_INDEX

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Stands in for the true-class probability of ignored pixels in OHEM's ranking: above every real one.
_ABOVE_ANY_PROBABILITY = 2.0


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean CE over non-ignored pixels. logits (N, K, H, W) float; target (N, H, W) int64.

    Returns a scalar; 0 (with a gradient path) when every pixel is ignored, rather than NaN.
    """
    # Sum over valid pixels / their count (at least 1): no device-to-host sync, and 0 rather
    # than NaN when every pixel is ignored.
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    return total / (target != ignore_index).sum().clamp(min=1)


class OhemCrossEntropy:
    """CE over the hardest pixels: true-class probability < thresh, at least `min_kept` of them."""

    def __init__(self, *, thresh: float, min_kept: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.thresh = thresh
        self.min_kept = min_kept
        self.ignore_index = ignore_index

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (N, K, H, W), target (N, H, W) int64 -> scalar loss.

        No device-to-host sync: the ignored pixels take a probability above any real one (so the
        `min_kept`-th smallest over all pixels is the `min_kept`-th smallest valid one, or that sentinel
        when fewer pixels are valid, which keeps them all), and the mean over the kept pixels is a sum
        over a count (0 rather than NaN when nothing is valid)."""
        logits = logits.float()
        valid = target != self.ignore_index
        pixel_loss = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="none")
        with torch.no_grad():
            safe_target = target.masked_fill(~valid, 0)
            true_prob = logits.softmax(dim=1).gather(1, safe_target.unsqueeze(1)).squeeze(1)
            ranked = true_prob.masked_fill(~valid, _ABOVE_ANY_PROBABILITY).reshape(-1)
            kth = torch.kthvalue(ranked, min(self.min_kept, ranked.numel())).values
            keep = valid & (true_prob <= torch.clamp(kth, min=self.thresh))
        return torch.where(keep, pixel_loss, 0.0).sum() / keep.sum().clamp(min=1)


def build_criterion(kind: str, *, ohem_thresh: float, ohem_min_kept: int, ignore_index: int = IGNORE_INDEX) -> Criterion:
    """The labeled-loss function for a `train.loss` setting ('ce' or 'ohem')."""
    if kind == "ohem":
        return OhemCrossEntropy(thresh=ohem_thresh, min_kept=ohem_min_kept, ignore_index=ignore_index)

    def criterion(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, target, ignore_index=ignore_index)

    return criterion
