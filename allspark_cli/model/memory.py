"""Semantic Memory (S-Mem) and Channel-wise Semantic Grouping (CSG): paper sections 3.3-3.4,
DESIGN.md section 1.

The memory is a class-wise FIFO of unlabeled feature channels: `bank (K, S, N)` holds S channels
(each an N-vector over the stride-32 token grid of the training crop) per class, initialised with
standard normal noise, plus one write pointer per class. The grouping assigns every channel of
the unlabeled tokens the class whose (resized, raw) logit map it is most similar to (cosine
similarity over tokens, as the reference does; the paper writes an instance-normalised product).

Writes are vectorised (no loop over images or classes, no device-to-host sync) and follow the
reference's order exactly: image by image, class by class ascending, channels ascending; the item
with rank r within class k goes to slot (ptr_k + r) mod S, and when a class receives more than S
items in one update the later ones win.

Beyond the reference, the memory records where each slot came from (`source_sample`,
`source_channel`, `source_iteration`, -1 = still initial noise) and how many channels the grouping
sent to each class (`assigned_count`), for `allspark inspect-memory`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NEVER_WRITTEN = -1


def group_channels(class_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Class of each token channel: argmax_k cos(class_logits[b, k, :], tokens[b, :, c]).

    class_logits: (B, K, N) raw logits resized to the token grid; tokens: (B, N, C).
    Returns (B, C) int64 class indices.
    """
    class_maps = F.normalize(class_logits.float(), dim=-1)  # (B, K, N), unit norm over tokens
    channels = F.normalize(tokens.float().transpose(1, 2), dim=-1)  # (B, C, N)
    similarity = class_maps @ channels.transpose(1, 2)  # (B, K, C)
    return similarity.argmax(dim=1)


def resize_logits_to_grid(logits: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, K, H, W) logits -> (B, K, h*w) by bilinear resizing (align_corners False), as CSG needs."""
    small = F.interpolate(logits.float(), size=grid, mode="bilinear", align_corners=False)
    return small.flatten(2)


class SemanticMemory(nn.Module):
    """Class-wise ring buffers of unlabeled channels.

    Args:
        num_classes: K.
        multiple: m; each class ring holds m groups of C slots, S = m*C (the memory length).
        tokens: N, the token count of the training crop's stride-32 grid.
        channels: C, the channel count of the tokens written.
    """

    def __init__(self, num_classes: int, multiple: int, tokens: int, channels: int) -> None:
        super().__init__()
        self.multiple, self.channels = multiple, channels
        slots = multiple * channels
        self.register_buffer("bank", torch.randn(num_classes, slots, tokens))
        self.register_buffer("pointer", torch.zeros(num_classes, dtype=torch.long))
        for name in ("source_sample", "source_channel", "source_iteration"):
            self.register_buffer(name, torch.full((num_classes, slots), NEVER_WRITTEN, dtype=torch.long))
        self.register_buffer("assigned_count", torch.zeros(num_classes, dtype=torch.long))

    @property
    def num_classes(self) -> int:
        return self.bank.shape[0]

    @property
    def slots(self) -> int:
        return self.bank.shape[1]

    @property
    def tokens(self) -> int:
        return self.bank.shape[2]

    def as_sources(self) -> torch.Tensor:
        """The memory as key/value sources: (K * m, N, C), i.e. each group of C slots of a class
        transposed so that the key/value projections mix the slots as if they were channels
        (what the published weights were trained with)."""
        K, _, N = self.bank.shape
        return self.bank.view(K * self.multiple, self.channels, N).transpose(1, 2)

    @torch.no_grad()
    def write(
        self,
        tokens: torch.Tensor,
        classes: torch.Tensor | None,
        *,
        sample_ids: torch.Tensor | None = None,
        iteration: int = NEVER_WRITTEN,
    ) -> None:
        """Appends every channel of `tokens` (B, N, C) to the ring of its class in `classes` (B, C).

        `classes=None` enqueues blindly (the `cca+smem` ablation): the K rings then act as one ring
        of K*S slots in channel order, whose write position is `pointer[0]`.
        """
        B, N, C = tokens.shape
        K, S, _ = self.bank.shape
        channels = tokens.transpose(1, 2).reshape(B * C, N).to(self.bank.dtype)  # items in write order
        order = torch.arange(B * C, device=tokens.device)
        if classes is None:
            position = (self.pointer[0] + order) % (K * S)
            cls, slot = position // S, position % S
            counts = torch.bincount(cls, minlength=K)
            self.pointer[0] = (self.pointer[0] + B * C) % (K * S)
        else:
            cls = classes.reshape(B * C)
            onehot = F.one_hot(cls, K)  # (B*C, K)
            rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # rank of each item within its class
            counts = onehot.sum(0)
            slot = (self.pointer[cls] + rank) % S
            self.pointer.copy_((self.pointer + counts) % S)
        # Later items win: for every (class, slot), keep the largest item index written there.
        winner = torch.full((K * S,), NEVER_WRITTEN, dtype=torch.long, device=tokens.device)
        winner.scatter_reduce_(0, cls * S + slot, order, reduce="amax", include_self=True)
        written = winner >= 0
        source = winner.clamp(min=0)

        def update(buffer: torch.Tensor, values: torch.Tensor) -> None:
            flat = buffer.view(K * S, *buffer.shape[2:])
            mask = written.view(-1, *([1] * (flat.dim() - 1)))
            flat.copy_(torch.where(mask, values[source], flat))

        update(self.bank, channels)
        if sample_ids is None:
            sample_ids = torch.full((B,), NEVER_WRITTEN, dtype=torch.long, device=tokens.device)
        update(self.source_sample, sample_ids.to(tokens.device).long().repeat_interleave(C))
        update(self.source_channel, order % C)
        update(self.source_iteration, torch.full_like(order, int(iteration)))
        self.assigned_count += counts
