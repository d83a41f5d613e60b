"""One confusion matrix for semantic segmentation, reduced once (DESIGN.md section 3b).

Intersection and union are summed over the whole evaluation set (not averaged per image or per
batch), then turned into per-class IoU and the mean. Rows of the matrix are ground-truth classes,
columns predicted classes. The matrix stays on the device of the tensors it is fed (no
device-to-host copy or sync per batch); processes of a DDP run add theirs together once, at the end.

NaN policy (what "absent" means, and how the mean treats it):
- IoU of class k is `TP / (TP + FP + FN)`. A class absent from both the ground truth and the
  prediction has a union of 0: its IoU is NaN (shown as "n/a") and it is left out of the mean.
  A class that is predicted but absent from the ground truth has IoU 0 and counts in the mean
  (a false positive is an error).
- Per-class accuracy is `TP / (TP + FN)` (the share of the class's ground-truth pixels predicted
  right); it is NaN for a class with no ground-truth pixel.
- Pixel accuracy is `sum(TP) / labelled pixels`; NaN before any labelled pixel was seen.
On the benchmark validation sets every class is present, so the mean equals the reference's.
IoU and accuracies are reported in percent (0-100), the scale of the published tables.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from allspark_cli.constants import IGNORE_INDEX

PERCENT = 100.0


@dataclass(frozen=True)
class SegmentationMetrics:
    """Metrics of one evaluation, in percent (0-100); NaN marks an undefined value (see module doc).

    iou, accuracy: per class, length K. miou: mean IoU over the classes whose IoU is defined.
    pixel_accuracy: correctly predicted labelled pixels over all labelled pixels.
    """

    iou: list[float]
    accuracy: list[float]
    miou: float
    pixel_accuracy: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; NaN becomes None (JSON has no NaN)."""
        return {
            "miou": _json_float(self.miou),
            "pixel_accuracy": _json_float(self.pixel_accuracy),
            "iou": [_json_float(value) for value in self.iou],
            "accuracy": [_json_float(value) for value in self.accuracy],
        }


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


class ConfusionMatrix:
    """K x K pixel counts (int64), rows = ground truth, columns = prediction.

    Pixels whose target equals `ignore_index` are skipped. Target values outside [0, K) that are not
    the ignore index cannot be placed in the matrix; they are skipped too and counted in
    `out_of_range` so the caller can report a mask that does not fit the model's classes.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix: torch.Tensor | None = None
        self._out_of_range: torch.Tensor | None = None

    def update(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        """Adds one batch. target, pred: integer tensors of the same shape (e.g. (N, H, W)), any device;
        pred values must lie in [0, K)."""
        if target.shape != pred.shape:
            raise ValueError(f"target shape {tuple(target.shape)} != prediction shape {tuple(pred.shape)}")
        k = self.num_classes
        target = target.reshape(-1).long()
        pred = pred.reshape(-1).long()
        labelled = target != self.ignore_index
        in_range = (target >= 0) & (target < k)
        valid = labelled & in_range
        # Every pixel lands in a bin, the skipped ones in an extra last bin: no boolean indexing and no
        # bincount, both of which wait for the device to learn their output size (one sync per batch).
        cells = torch.where(valid, target * k + pred, k * k)
        counts = torch.zeros(k * k + 1, dtype=torch.int64, device=cells.device)
        counts.scatter_add_(0, cells, cells.new_ones(()).expand_as(cells))
        counts = counts[: k * k].reshape(k, k)
        outside = (labelled & ~in_range).sum()
        if self.matrix is None:
            self.matrix = torch.zeros_like(counts)
            self._out_of_range = torch.zeros_like(outside)
        self.matrix += counts.to(self.matrix.device)
        self._out_of_range += outside.to(self._out_of_range.device)

    @property
    def out_of_range(self) -> int:
        """Labelled pixels whose target class was >= K or negative (skipped)."""
        return 0 if self._out_of_range is None else int(self._out_of_range.item())

    def all_reduce_(self, dist: Any | None = None) -> ConfusionMatrix:
        """Sums the matrix over all processes of a DDP run (in place); a no-op for one process.

        `dist` is the run's DistInfo (anything with `world_size`, and `device` for the collective);
        None means a single process. Call it once, after the last `update`.
        """
        world_size = getattr(dist, "world_size", 1) if dist is not None else 1
        if world_size <= 1:
            return self
        device = getattr(dist, "device", None)
        if self.matrix is None:
            # A rank with no images must still take part in the collective with zeros.
            self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
            self._out_of_range = torch.zeros((), dtype=torch.int64)
        packed = torch.cat([self.matrix.reshape(-1), self._out_of_range.reshape(1)])
        if device is not None:
            packed = packed.to(device)
        torch.distributed.all_reduce(packed)
        k = self.num_classes
        self.matrix = packed[: k * k].reshape(k, k)
        self._out_of_range = packed[k * k]
        return self

    def to_numpy(self):
        """The (K, K) int64 matrix as a numpy array (zeros before any update)."""
        if self.matrix is None:
            return torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64).numpy()
        return self.matrix.detach().cpu().numpy()

    def compute(self) -> SegmentationMetrics:
        """Per-class IoU/accuracy, mIoU and pixel accuracy with the module's NaN policy."""
        return metrics_from_confusion(torch.from_numpy(self.to_numpy()))


def metrics_from_confusion(matrix: torch.Tensor) -> SegmentationMetrics:
    """SegmentationMetrics of a (K, K) confusion matrix (rows = ground truth, columns = prediction)."""
    hist = matrix.double()
    true_positive = hist.diag()
    ground_truth = hist.sum(dim=1)
    predicted = hist.sum(dim=0)
    union = ground_truth + predicted - true_positive
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, true_positive / union.clamp(min=1), nan) * PERCENT
    accuracy = torch.where(ground_truth > 0, true_positive / ground_truth.clamp(min=1), nan) * PERCENT
    defined = ~iou.isnan()
    miou = float(iou[defined].mean()) if bool(defined.any()) else float("nan")
    total = float(hist.sum())
    pixel_accuracy = float(true_positive.sum()) / total * PERCENT if total > 0 else float("nan")
    return SegmentationMetrics(
        iou=[float(v) for v in iou],
        accuracy=[float(v) for v in accuracy],
        miou=miou,
        pixel_accuracy=pixel_accuracy,
    )
