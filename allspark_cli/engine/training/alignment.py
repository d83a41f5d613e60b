"""Distribution alignment of the pseudo labels (ReMixMatch, Berthelot et al. 2020), an option of the
weak-to-strong recipe (`train.distribution_alignment`, DESIGN.md section 3a).

A teacher trained on few labels under-predicts its thin classes: their pixels go to the dominant
class (background) in the pseudo labels and the unlabeled loss then teaches background where they
are. Alignment rescales the weak view's class probabilities of every pixel so that their mean over
the unlabeled pixels follows the labeled masks' class shares, before the argmax and the threshold:

    p~_k(x) = p_k(x) * r_k / sum_j p_j(x) * r_j,    r_k = target_k / predicted_k

    target_k    = labeled pixels of class k / all labeled pixels, over every step of the run so far
    predicted_k = exponential moving average over steps of mean_x p_k(x), over the step's valid
                  (non-padding) unlabeled pixels, first value the first step's mean

Both are sums over the whole step (every rank's images, so DDP and one process align alike) and
change once per step, so gradient accumulation, which pseudo-labels the step's unlabeled images in
one pass, aligns as the one-shot step does. They are part of a run's state: a resumed run continues
them (`state_dict`). A class no labeled pixel has shown yet keeps its probability (r_k = 1) until one does.
"""
from __future__ import annotations

from typing import Any

import torch

from allspark_cli.engine import distributed as D
from allspark_cli.engine.training.pseudo_labels import CLASS_DIM, labeled_class_counts

# predicted_k's moving average keeps this share of its value per step: a horizon of about 10
# steps. ReMixMatch averages its last 128 batches, but a model trained from scratch changes its
# class shares within tens of steps early on, and a 100-step average then still holds the first
# steps' near-uniform prediction: it scaled background up until every pseudo label was background
# for the first 300 of 750 iterations on the demo data.
ALIGNMENT_MOMENTUM = 0.9
# Floor of predicted_k in r_k's denominator: a class the teacher never predicts is boosted a
# large but finite amount, and a probability of exactly 0 stays 0.
PREDICTED_FLOOR = 1e-6


class DistributionAlignment:
    """The running class shares of one run (see the module docstring); K classes, on `device`."""

    def __init__(self, num_classes: int, device: torch.device, ignore_index: int) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.labeled = torch.zeros(num_classes, dtype=torch.float64, device=device)  # pixel counts
        self.predicted = torch.zeros(num_classes, dtype=torch.float32, device=device)
        self.steps = 0  # steps whose unlabeled pixels went into `predicted`

    def observe_labeled(self, masks_l: torch.Tensor) -> None:
        """Adds the step's labeled masks (B, H, W) int64 (ignored pixels left out) to the target."""
        counts = labeled_class_counts(masks_l, self.num_classes, self.ignore_index)
        self.labeled += D.all_reduce_(counts).double()

    def align(self, probabilities: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """probabilities (B, K, H, W) float32 of the weak view, valid (B, H, W) bool (non-padding):
        folds this step's mean into `predicted`, returns the aligned probabilities (B, K, H, W)."""
        weights = valid.unsqueeze(CLASS_DIM).float()
        sums = torch.cat([(probabilities * weights).sum(dim=(0, 2, 3)), weights.sum().reshape(1)])
        sums = D.all_reduce_(sums)
        step_mean = sums[:-1] / sums[-1].clamp(min=1)
        if self.steps == 0:
            self.predicted = step_mean
        else:
            self.predicted = ALIGNMENT_MOMENTUM * self.predicted + (1 - ALIGNMENT_MOMENTUM) * step_mean
        self.steps += 1
        scaled = probabilities * self.ratio().view(1, -1, 1, 1)
        return scaled / scaled.sum(dim=CLASS_DIM, keepdim=True)

    def ratio(self) -> torch.Tensor:
        """(K,) r_k = target_k / predicted_k; 1 for a class without labeled pixels so far."""
        total = self.labeled.sum().clamp(min=1)
        target = (self.labeled / total).float()
        seen = self.labeled > 0
        return torch.where(seen, target / self.predicted.clamp(min=PREDICTED_FLOOR), torch.ones_like(target))

    def state_dict(self) -> dict[str, Any]:
        """Plain values for the checkpoint's train_state (torch.load weights_only)."""
        return {"labeled": self.labeled.tolist(), "predicted": self.predicted.tolist(), "steps": self.steps}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.labeled = torch.tensor(saved["labeled"], dtype=torch.float64, device=self.labeled.device)
        self.predicted = torch.tensor(saved["predicted"], dtype=torch.float32, device=self.predicted.device)
        self.steps = int(saved["steps"])
