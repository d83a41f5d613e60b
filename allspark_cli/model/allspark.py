"""The AllSpark bottleneck (paper section 3, Algorithm 1; DESIGN.md section 1, steps 1-6).

Between the encoder and the SegFormer head, on its last stage's map (MiT: stride 32; C channels, N = h*w tokens):
labeled features are rebuilt from unlabeled channels by channel-wise cross-attention, whose
keys/values come from the batch's unlabeled tokens (warm-up, and every `cca` step) or from the
Semantic Memory (after warm-up); unlabeled features go through channel-wise self-attention.

Where we differ from the reference, on purpose:
- inference is per image (keys/values from the image's own tokens through the labeled-branch
  weights, as the reference computes at batch size 1); the reference pools keys over the whole
  inference batch, so its output depends on the other images in the batch. We also skip the
  discarded unlabeled half at inference;
- labeled and unlabeled batches may differ in size (the keys are the pooled unlabeled channels);
- the memory update can gather the unlabeled channels of all DDP ranks (see `forward_train`).

The reference's batch coupling is still available where training needs it: `forward_train(groups=G)`
splits the batch into the G groups that the reference's G GPUs held (keys/values from the group's
unlabeled images), and `forward_pooled` is the reference's eval-mode forward that produces its
pseudo labels (each image's keys/values from every image of its group).

Initialisation follows the reference: every Linear of the module `xavier_uniform_` (none has a
bias); the 1x1 convolutions and LayerNorms keep PyTorch's defaults.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from allspark_cli.constants import AttentionPath, ChosenAttentionPath
from allspark_cli.model.attention_maps import normalized_attention_map
from allspark_cli.model.attention_paths import choose_path, free_device_memory, labeled_attention
from allspark_cli.model.memory import SemanticMemory, group_channels, resize_logits_to_grid
from allspark_cli.model.products import matmul_nt
from allspark_cli.model.scratch import ScratchPool

TOKEN_NORM_EPS = 1e-6


def split_groups(batch: torch.Tensor, groups: int) -> tuple[torch.Tensor, ...]:
    """(B, ...) -> `groups` consecutive (B / groups, ...) views; B must be a multiple of `groups`."""
    if groups < 1 or batch.shape[0] % groups:
        raise ValueError(f"a batch of {batch.shape[0]} cannot be split into {groups} equal groups")
    return batch.split(batch.shape[0] // groups)


class MemoryStep(NamedTuple):
    """What the Semantic Memory takes from one training step; methods without a memory ignore it.

    With `pseudo_logits_u` ((B_u, K, H, W) raw eval-mode logits of the unlabeled images) the memory
    is updated first (no grad); `use_memory` (the warm-up switch) then reads it as keys/values.
    `sample_ids_u` (B_u,) and `iteration` are recorded with the written slots; `gather`
    concatenates a tensor over DDP ranks so every rank writes the same global memory.
    `later_tokens_u` ((B_later, N, C), from `memory_tokens`): the tokens of the step's unlabeled
    images that later forwards see (gradient accumulation), written right after this forward's own
    in the same write; `pseudo_logits_u` and `sample_ids_u` then cover both, in that order."""

    pseudo_logits_u: torch.Tensor | None = None
    use_memory: bool = False
    sample_ids_u: torch.Tensor | None = None
    iteration: int = -1
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None
    later_tokens_u: torch.Tensor | None = None


# A step that neither writes nor reads the memory (the keys/values come from the unlabeled images).
NO_MEMORY_STEP = MemoryStep()


class ChannelProjections(nn.Module):
    """What both attention branches are built on: bias-free q, k, v that widen C channels to h*C
    (head j is the column block [j*C, (j+1)*C)), `out` that narrows the merged heads back to C, and
    the dropout after it."""

    def __init__(self, dim: int, heads: int, projection_dropout: float):
        super().__init__()
        self.q = nn.Linear(dim, heads * dim, bias=False)
        self.k = nn.Linear(dim, heads * dim, bias=False)
        self.v = nn.Linear(dim, heads * dim, bias=False)
        self.out = nn.Linear(heads * dim, dim, bias=False)
        self.projection_dropout = nn.Dropout(projection_dropout)


class ChannelSelfAttention(ChannelProjections):
    """Unlabeled branch: per head j, A_j = softmax(IN(q_j^T k_j)) is C x C; heads merged interleaved."""

    def __init__(self, dim: int, heads: int = 2, *, attention_dropout: float = 0.1, projection_dropout: float = 0.1):
        super().__init__(dim, heads, projection_dropout)
        self.heads = heads
        self.attention_dropout = nn.Dropout(attention_dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, C = tokens.shape
        # (B, N, h*C) -> (B, h, N, C): head j is the column block [j*C, (j+1)*C).
        q, k, v = (proj(tokens).view(B, N, self.heads, C).transpose(1, 2) for proj in (self.q, self.k, self.v))
        attention = normalized_attention_map(q.transpose(-2, -1) @ k)  # (B, h, C, C)
        attention = self.attention_dropout(attention).to(v.dtype)
        mixed = attention @ v.transpose(-2, -1)  # (B, h, C, N)
        # Interleave heads: output feature c*h + j (channel-major, head-minor).
        mixed = mixed.permute(0, 3, 2, 1).reshape(B, N, C * self.heads)
        return self.projection_dropout(self.out(mixed))


class ChannelCrossAttention(ChannelProjections):
    """Labeled branch: one map of width hC between the labeled query channels and the channels of
    every source (unlabeled images or memory class groups), keys/values shared by all images.
    `attention_path` picks how the map is computed (attention_paths.py; all give the same values)."""

    def __init__(
        self,
        dim: int,
        heads: int = 2,
        *,
        attention_dropout: float = 0.1,
        projection_dropout: float = 0.1,
        attention_path: AttentionPath = "auto",
    ):
        super().__init__(dim, heads, projection_dropout)
        self.attention_dropout = attention_dropout
        self.attention_path = attention_path  # as configured; `chosen_path` is what the calls take
        # Set once (`settle_path`): the paths draw their dropout masks differently, so a path that
        # changed between steps would change the random stream of the run.
        self.chosen_path: ChosenAttentionPath | None = None if attention_path == "auto" else attention_path
        # The attention's large CPU buffers, kept from one training step to the next (scratch.py);
        # not state, never saved. Kept across eval(): the training step switches to eval mode for
        # its pseudo-label pass every iteration. `scratch.clear()` hands them back to the system.
        self.scratch = ScratchPool()

    def shared_keys(self, sources: torch.Tensor) -> torch.Tensor:
        """(M, N, C) sources -> key channels (hC * M, N) in the order that `forward` uses (row
        c * M + m is projected channel c of source m); for inspection, no autograd."""
        M, N, C = sources.shape
        return matmul_nt(self.k.weight, sources.reshape(M * N, C)).view(-1, N)

    def settle_path(self, *, images: int, sources: int, device: torch.device) -> ChosenAttentionPath:
        """The path of this call and every later one: `attention_path`, or for `auto` the rule of
        `choose_path`, applied once, for maps of `images` x hC x (hC * `sources`) and the free memory
        of `device` now. The training engine settles it before the first step, for the run's largest
        call (`AllSparkModule.settle_attention_path`); a module nobody settled decides at its first call."""
        if self.chosen_path is None:
            rows = self.q.out_features  # hC
            self.chosen_path = choose_path(self.attention_path, device.type, images=images, rows=rows,
                                           keys=rows * sources, free_bytes=free_device_memory(device))
        return self.chosen_path

    def forward(self, tokens: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, C) labeled; sources (M, N, C) -> (B, N, C)."""
        queries = self.q(tokens).transpose(1, 2)  # (B, hC, N) query channels
        dropout_p = self.attention_dropout if self.training else 0.0
        path = self.settle_path(images=queries.shape[0], sources=sources.shape[0], device=queries.device)
        scratch = self.scratch if queries.device.type == "cpu" else None  # CUDA's allocator caches
        mixed = labeled_attention(
            queries, sources, self.k.weight, self.v.weight, path=path, dropout_p=dropout_p, scratch=scratch
        )  # (B, hC, N)
        return self.projection_dropout(self.out(mixed.transpose(1, 2)))

    def forward_self(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inference: every image attends to its own channels through these weights. (B, N, C) -> (B, N, C)."""
        queries = self.q(tokens).transpose(1, 2)  # (B, hC, N)
        keys, values = self.k(tokens), self.v(tokens)  # (B, N, hC)
        attention = normalized_attention_map(queries @ keys).to(values.dtype)  # (B, hC, hC)
        return self.projection_dropout(self.out((attention @ values.transpose(1, 2)).transpose(1, 2)))


class AllSparkModule(nn.Module):
    """The bottleneck on stage-4 maps (B, C, h, w) -> (B, C, h, w).

    Args:
        dim: C, the channel count of the stage-4 map.
        num_classes: K (memory class slots).
        heads: h; widens the projections to h*C.
        memory_multiple: m, the groups of C channels each class ring holds, or None for no memory (`cca`).
        memory_tokens: N of the training crop's grid (the memory stores N-vectors).
        group_by_class: CSG on (`allspark`) or blind enqueueing (`cca+smem`).
        attention_path: how the labeled branch's map is computed (attention_paths.py).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        heads: int = 2,
        *,
        memory_multiple: int | None = None,
        memory_tokens: int = 0,
        group_by_class: bool = True,
        attention_dropout: float = 0.1,
        projection_dropout: float = 0.1,
        attention_path: AttentionPath = "auto",
    ) -> None:
        super().__init__()
        self.map_in = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU())
        self.token_norm = nn.LayerNorm(dim, eps=TOKEN_NORM_EPS)
        dropouts = {"attention_dropout": attention_dropout, "projection_dropout": projection_dropout}
        self.unlabeled_attention = ChannelSelfAttention(dim, heads, **dropouts)
        self.labeled_attention = ChannelCrossAttention(dim, heads, **dropouts, attention_path=attention_path)
        self.output_norm = nn.LayerNorm(dim, eps=TOKEN_NORM_EPS)
        self.map_out = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU())
        self.group_by_class = group_by_class
        self.memory = SemanticMemory(num_classes, memory_multiple, memory_tokens, dim) if memory_multiple else None
        self.reset_attention_parameters()

    def reset_attention_parameters(self) -> None:
        """The reference's initialisation of the projections: xavier_uniform_ on every Linear."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)

    def settle_attention_path(self, *, group_images: int, step_images: int) -> ChosenAttentionPath:
        """Decides, once and before training, how the labeled branch computes its map (see
        `ChannelCrossAttention.settle_path`), on the device of the module's weights, for its largest
        call: `group_images` labeled images against the group's as many unlabeled ones (warm-up,
        `cca`), or with the memory the `step_images` labeled images of a (micro-)step against its
        class groups."""
        images, sources = group_images, group_images
        if self.memory is not None:
            images, sources = max(images, step_images), max(sources, self.memory.as_sources().shape[0])
        device = self.labeled_attention.q.weight.device
        return self.labeled_attention.settle_path(images=images, sources=sources, device=device)

    def _tokens(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) -> pre-norm tokens t and normed tokens e, both (B, N, C)."""
        t = self.map_in(features).flatten(2).transpose(1, 2)
        return t, self.token_norm(t)

    def _output(self, mixed: torch.Tensor, t: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        y = self.output_norm(mixed + t)  # (B, N, C), residual on the pre-norm tokens
        B, N, C = y.shape
        return self.map_out(y.transpose(1, 2).reshape(B, C, *grid))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Inference, per image: (B, C, h, w) -> (B, C, h, w)."""
        t, e = self._tokens(features)
        return self._output(self.labeled_attention.forward_self(e), t, features.shape[-2:])

    def forward_pooled(self, features: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """The reference's eval-mode forward (its pseudo-label pass): within each of `groups` equal
        groups of the batch, every image's keys/values are the channels of all the group's images,
        through the labeled-branch weights. (B, C, h, w) -> (B, C, h, w); groups = B is `forward`."""
        t, e = self._tokens(features)
        mixed = torch.cat([self.labeled_attention(group, group) for group in split_groups(e, groups)])
        return self._output(mixed, t, features.shape[-2:])

    def forward_train(
        self,
        features_l: torch.Tensor,
        features_u: torch.Tensor,
        *,
        memory_step: MemoryStep = NO_MEMORY_STEP,
        groups: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward of (B_l, C, h, w) labeled and (B_u, C, h, w) unlabeled maps.

        `memory_step`: what the Semantic Memory writes and reads this step (see `MemoryStep`).
        `groups`: both halves split into this many equal groups (the reference's GPUs); without the
        memory, the labeled images of group g draw keys/values from the unlabeled images of group g.
        """
        B_l, grid = features_l.shape[0], features_l.shape[-2:]
        t, e = self._tokens(torch.cat([features_l, features_u]))
        e_l, e_u = e[:B_l], e[B_l:]
        mixed_u = self.unlabeled_attention(e_u)
        if self.memory is not None and memory_step.pseudo_logits_u is not None:
            self._update_memory(e_u, grid, memory_step)
        if memory_step.use_memory and self.memory is not None:  # one source for every group
            mixed_l = self.labeled_attention(e_l, self.memory.as_sources())
        else:
            pairs = zip(split_groups(e_l, groups), split_groups(e_u, groups))
            mixed_l = torch.cat([self.labeled_attention(queries, sources) for queries, sources in pairs])
        out = self._output(torch.cat([mixed_l, mixed_u]), t, grid)
        return out[:B_l], out[B_l:]

    @torch.no_grad()
    def memory_tokens(self, features_u: torch.Tensor) -> torch.Tensor:
        """The normed tokens (B, N, C) that `forward_train` writes into the memory for the
        unlabeled maps (B, C, h, w): for a step whose unlabeled images reach the module in pieces
        (gradient accumulation), whose memory must hold every piece before any piece reads it
        (`MemoryStep.later_tokens_u`)."""
        return self._tokens(features_u)[1]

    @torch.no_grad()
    def _update_memory(self, e_u: torch.Tensor, grid: torch.Size, step: MemoryStep) -> None:
        tokens = e_u.detach()
        if step.later_tokens_u is not None:
            tokens = torch.cat([tokens, step.later_tokens_u])
        class_logits = resize_logits_to_grid(step.pseudo_logits_u.detach(), tuple(grid))
        sample_ids, gather = step.sample_ids_u, step.gather
        if sample_ids is None:
            sample_ids = torch.full((tokens.shape[0],), -1, dtype=torch.long, device=tokens.device)
        sample_ids = sample_ids.to(tokens.device)
        if gather is not None:
            tokens, class_logits, sample_ids = gather(tokens), gather(class_logits), gather(sample_ids)
        classes = group_channels(class_logits, tokens) if self.group_by_class else None
        self.memory.write(tokens, classes, sample_ids=sample_ids, iteration=step.iteration)

    @torch.no_grad()
    def memory_attention_by_class(self, features: torch.Tensor) -> torch.Tensor:
        """For inspection: how much attention mass each labeled-branch query channel puts on each
        memory class slot, as in training after warm-up. (B, C, h, w) -> (B, hC, K), rows sum to 1."""
        if self.memory is None:
            raise ValueError("this module has no Semantic Memory")
        _, e = self._tokens(features)
        queries = self.labeled_attention.q(e).transpose(1, 2)  # (B, hC, N)
        sources = self.memory.as_sources()  # (K * G, N, C): G groups of C slots per class, class-major
        keys = self.labeled_attention.shared_keys(sources)  # (hC * K * G, N)
        K = self.memory.num_classes
        per_class = []
        for b in range(queries.shape[0]):  # one image's map at a time: the map can be large
            attention = normalized_attention_map(queries[b] @ keys.transpose(0, 1))  # (hC, hC * K * G)
            per_class.append(attention.view(attention.shape[0], -1, K, self.memory.multiple).sum((1, 3)))
        return torch.stack(per_class)
