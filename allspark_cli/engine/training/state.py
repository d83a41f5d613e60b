"""The progress of a training run: where it is in the schedule and what its evaluations gave.

Stored in last.pt and best.pt as the checkpoint's `train_state` (beside the optimizer, the scaler,
the RNG states and the run's shape, which train.py adds); a resumed run reads it back with
`TrainState.from_checkpoint`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# The fields a checkpoint stores (saved_iteration is this process's bookkeeping only).
STORED_FIELDS = ("epoch", "batch", "iteration", "best_miou", "best_epoch", "last_miou", "history")


@dataclass
class TrainState:
    epoch: int = 0  # epochs finished
    batch: int = 0  # batches of the current epoch done
    iteration: int = 0  # optimizer steps done
    best_miou: float = -math.inf
    best_epoch: int = -1  # 0-based epoch of best_miou; -1 before the first evaluation
    last_miou: float = math.nan
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per evaluation (results.csv)
    saved_iteration: int | None = None  # the iteration of the last last.pt this run wrote or resumed from

    def stored(self) -> dict[str, Any]:
        """The checkpoint form: plain values only (torch.load weights_only)."""
        return {name: list(self.history) if name == "history" else getattr(self, name) for name in STORED_FIELDS}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> TrainState:
        return cls(**{name: saved[name] for name in STORED_FIELDS})
