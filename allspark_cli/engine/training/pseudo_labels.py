"""Pseudo labels of the unlabeled batch: the weak-to-strong recipe's CutMix and confidence filter,
and the health counts a user reads in metrics.jsonl (DESIGN.md section 3a).

CutMix within groups: image i of a group takes the strong pixels of the next image of the same
group (cyclically; a group of one image mixes with itself, i.e. not at all) inside its box, and its
pseudo label, confidence, padding and memory logits follow the same pixels:

    mixed_i = where(box_i, x_partner(i), x_i),    partner(i) = group start + (i + 1) mod group size

Health counts of a step (`PseudoHealth`, summed over steps and ranks by the loop, read on the host
only when a line is logged): valid (non-padding) unlabeled pixels, those passing the threshold, and
per class the pseudo labels' pixels, their confidence sum and the labeled masks' pixels.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from allspark_cli.constants import IGNORE_INDEX
from allspark_cli.data.transforms import UNLABELED_PADDING
from allspark_cli.text import plural

CLASS_DIM = 1


def group_partners(batch: int, groups: int, device: torch.device) -> torch.Tensor:
    """(B,) index of each image's CutMix partner: the next image of its own group, cyclically."""
    size = batch // groups
    position = torch.arange(batch, device=device)
    start = position - position % size
    return start + (position % size + 1) % size


def cutmix(tensor: torch.Tensor, box: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
    """tensor (B, ...) with spatial trailing dims (H, W); box (B, H, W), nonzero where the partner's
    pixels are taken. Channels (B, C, H, W) follow the box of their image."""
    inside = box.bool()
    if tensor.dim() == box.dim() + 1:
        inside = inside.unsqueeze(CLASS_DIM)
    return torch.where(inside, tensor[partners], tensor)


class ConfidentTargets(NamedTuple):
    """Targets of the unlabeled loss: pseudo labels (B, H, W) int64 with IGNORE_INDEX on padding,
    their confidence (B, H, W) float32, and the pixels that pass the threshold (B, H, W) bool."""

    labels: torch.Tensor
    confidence: torch.Tensor
    passing: torch.Tensor


def confident_targets(logits: torch.Tensor, pad_mask: torch.Tensor, threshold: float,
                      align: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> ConfidentTargets:
    """Argmax and max-softmax of (B, K, H, W) logits; padding never passes. `align` maps the
    probabilities and the valid pixels (B, H, W) to aligned probabilities first
    (`DistributionAlignment.align`, engine/training/alignment.py)."""
    padding = pad_mask == UNLABELED_PADDING
    probabilities = logits.softmax(dim=CLASS_DIM)
    if align is not None:
        probabilities = align(probabilities, ~padding)
    confidence, labels = probabilities.max(dim=CLASS_DIM)
    labels = labels.masked_fill(padding, IGNORE_INDEX)
    return ConfidentTargets(labels, confidence, (confidence >= threshold) & ~padding)


def confident_cross_entropy(logits: torch.Tensor, targets: ConfidentTargets) -> torch.Tensor:
    """CE over the passing pixels, summed and divided by the valid (non-padding) pixels (UniMatch's
    normalisation: a step whose pixels mostly fail the threshold contributes a small loss, rather
    than a loud one from its few confident pixels). 0 with a gradient path when nothing is valid."""
    trained = targets.labels.masked_fill(~targets.passing, IGNORE_INDEX)
    total = F.cross_entropy(logits.float(), trained, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets.labels != IGNORE_INDEX).sum().clamp(min=1)


class PseudoHealth(NamedTuple):
    """Summable counts of one or more steps, as one float tensor (see the module docstring)."""

    counts: torch.Tensor  # [valid, passing, pseudo per class (K), confidence sum per class (K), labeled per class (K)]

    @staticmethod
    def size(num_classes: int) -> int:
        return 2 + 3 * num_classes


def _class_sums(classes: torch.Tensor, weights: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K,) sums of `weights` per class id; ids outside 0..K-1 (ignore, padding) go to a dropped
    extra bin. Scatter-add with fixed shapes: no boolean indexing, so no device-to-host sync."""
    bins = torch.where((classes >= 0) & (classes < num_classes), classes, num_classes).reshape(-1)
    sums = torch.zeros(num_classes + 1, device=classes.device).scatter_add_(0, bins, weights.reshape(-1).float())
    return sums[:num_classes]


def labeled_class_counts(masks_l: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(K,) float pixel counts per class of labeled masks (B, H, W); ignored pixels in none."""
    ids = masks_l.masked_fill(masks_l == ignore_index, num_classes)
    return _class_sums(ids, torch.ones_like(ids, dtype=torch.float32), num_classes)


def health_counts(targets: ConfidentTargets, masks_l: torch.Tensor, num_classes: int,
                  ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """This step's PseudoHealth counts (no host sync: it runs every step)."""
    valid = targets.labels != IGNORE_INDEX
    ones = valid.float()
    pseudo = _class_sums(targets.labels, ones, num_classes)
    confidence = _class_sums(targets.labels, targets.confidence * ones, num_classes)
    labeled = labeled_class_counts(masks_l, num_classes, ignore_index)
    head = torch.stack([ones.sum(), targets.passing.sum().float()])
    return torch.cat([head, pseudo, confidence, labeled])


class HealthSummary(NamedTuple):
    """Readable health of a window of steps: shares in percent, confidences in 0..1 (NaN: no pixel)."""

    pass_share: float
    pseudo_share: list[float]
    labeled_share: list[float]
    confidence: list[float]


def summarize_health(counts: list[float], num_classes: int) -> HealthSummary:
    valid, passing = counts[0], counts[1]
    k = num_classes
    pseudo, confidence, labeled = counts[2:2 + k], counts[2 + k:2 + 2 * k], counts[2 + 2 * k:2 + 3 * k]
    pseudo_total, labeled_total = sum(pseudo), sum(labeled)

    def share(part: float, whole: float) -> float:
        return 100.0 * part / whole if whole else float("nan")

    return HealthSummary(
        pass_share=share(passing, valid),
        pseudo_share=[share(value, pseudo_total) for value in pseudo],
        labeled_share=[share(value, labeled_total) for value in labeled],
        confidence=[total / count if count else float("nan") for total, count in zip(confidence, pseudo)],
    )


# Collapse warning: a class that covers at least this share (percent) of the labeled pixels ...
COLLAPSE_MIN_LABELED_SHARE = 1.0
# ... and gets under this fraction of that share in the pseudo labels, over a window of iterations.
COLLAPSE_RATIO = 0.1
# Windows are checked from this share of the run on: a model trained from scratch predicts little
# but background in its first steps, in healthy runs too.
COLLAPSE_GRACE_SHARE = 0.25


class CollapseMonitor:
    """Accumulates the logged PseudoHealth counts over windows of `window` iterations and names,
    once per class, a class whose pseudo-label share collapsed against its labeled share."""

    def __init__(self, class_names: list[str], window: int, total_iterations: int, remedy: str) -> None:
        self.class_names, self.window, self.remedy = class_names, window, remedy
        self.grace = int(COLLAPSE_GRACE_SHARE * total_iterations)
        self.sums: list[float] | None = None
        self.start: int | None = None
        self.warned: set[int] = set()

    def add(self, counts: list[float], first_iteration: int, last_iteration: int) -> list[str]:
        """Counts of the logged iterations first_iteration..last_iteration (1-based, inclusive);
        returns the warnings of a window completed by them."""
        if not self.window or first_iteration <= self.grace:
            return []
        self.sums = counts if self.sums is None else [a + b for a, b in zip(self.sums, counts)]
        self.start = first_iteration if self.start is None else self.start
        if last_iteration - self.start + 1 < self.window:
            return []
        summary = summarize_health(self.sums, len(self.class_names))
        warnings = []
        for class_id, (labeled, pseudo) in enumerate(zip(summary.labeled_share, summary.pseudo_share)):
            if class_id in self.warned or not labeled >= COLLAPSE_MIN_LABELED_SHARE:
                continue
            if pseudo < COLLAPSE_RATIO * labeled:
                self.warned.add(class_id)
                warnings.append(
                    f"warning: pseudo labels collapse on class '{self.class_names[class_id]}' at iteration "
                    f"{last_iteration}: {pseudo:.2f}% of the pseudo-labeled pixels over the last "
                    f"{plural(last_iteration - self.start + 1, 'iteration')} against {labeled:.2f}% of the labeled ones; "
                    f"{self.remedy}")
        self.sums, self.start = None, None
        return warnings


def collapse_remedy(weak_to_strong: bool) -> str:
    """What the collapse warning suggests for a run's recipe."""
    if weak_to_strong:
        return "try a lower train.confidence_threshold or a ramp (train.unlabeled_rampup)"
    return ("try --recipe weak-to-strong (confidence-filtered, strongly augmented unlabeled loss), "
            "or a ramp (train.unlabeled_rampup)")
