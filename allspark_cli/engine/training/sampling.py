"""The training data order: a batch sampler that is a pure function of (seed, epoch, stream).

Each epoch draws one permutation of the dataset from `np.random.default_rng((seed, epoch,
stream))` and trims it to whole global batches (drop-last). A global batch holds G groups (the
reference's GPUs: G = 4 for the paper presets); group j is the positions j, j + G, j + 2G, ... of
the global batch (the DistributedSampler split over G processes), and rank r of W takes the groups
r * G/W ... (r + 1) * G/W - 1, one after the other. So every world size that divides G sees the
same groups, and with G = W this is exactly the DistributedSampler split. Because the order
depends on nothing else, a resumed run can skip the batches it already did (`start_batch`) and see
exactly the batches it would have seen. Streams keep the labeled and unlabeled orders independent.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

LABELED_STREAM = 0
UNLABELED_STREAM = 1


class EpochBatchSampler(Sampler[list[int]]):
    """Yields this rank's index lists (`batch_size` per rank) for the current epoch."""

    def __init__(self, length: int, *, batch_size: int, seed: int, stream: int, rank: int = 0, world_size: int = 1,
                 max_batches: int | None = None, groups: int | None = None) -> None:
        super().__init__()
        groups = world_size if groups is None else groups
        if groups % world_size or (batch_size * world_size) % groups:
            raise ValueError(f"{groups} groups cannot be spread over {world_size} processes of {batch_size} images")
        self.groups = groups
        self.length = length
        self.batch_size = batch_size
        self.seed = seed
        self.stream = stream
        self.rank = rank
        self.world_size = world_size
        self.max_batches = max_batches
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        """Whole global batches in one pass (drop-last), capped at `max_batches` when set."""
        full = self.length // (self.batch_size * self.world_size)
        return full if self.max_batches is None else min(full, self.max_batches)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the epoch's order, skipping its first `start_batch` batches (resume)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def order(self) -> np.ndarray:
        """The whole epoch's permutation (all ranks), int64."""
        return np.random.default_rng((self.seed, self.epoch, self.stream)).permutation(self.length)

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.start_batch, 0)

    def __iter__(self) -> Iterator[list[int]]:
        global_batch = self.batch_size * self.world_size
        order = self.order()
        for batch in range(self.start_batch, self.batches_per_epoch):
            chunk = order[batch * global_batch:(batch + 1) * global_batch]
            mine = range(self.rank * self.groups // self.world_size, (self.rank + 1) * self.groups // self.world_size)
            yield [int(index) for group in mine for index in chunk[group::self.groups]]
