"""SegFormer + AllSpark: encoder (MiT, or another family of model/backbones.py) -> (AllSpark on the
last stage's map) -> all-MLP head -> logits upsampled bilinearly to the input size (DESIGN.md
sections 1-2).

`forward(images) -> logits` is inference, per image (batch-invariant), any input size.
`forward_train(...) -> TrainOutput` is the training forward of cat(labeled, unlabeled).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from allspark_cli.constants import AttentionPath
from allspark_cli.model.allspark import NO_MEMORY_STEP, AllSparkModule, MemoryStep
from allspark_cli.model.backbones import build_backbone
from allspark_cli.model.head import SegFormerHead
from allspark_cli.model.memory import SemanticMemory
from allspark_cli.model.methods import DEFAULT_METHOD, METHODS


class TrainOutput(NamedTuple):
    logits_l: torch.Tensor  # (B_l, K, H, W)
    logits_u: torch.Tensor | None  # (B_u, K, H, W); None when no unlabeled images were given


class AllSparkSegmentor(nn.Module):
    """The segmentation network of one ablation variant.

    Args:
        backbone: encoder variant, a name of the `Backbone` literal ("b0".."b5", "dinov2-s", ...).
        num_classes: K.
        method: a name of `METHODS` (model/methods.py), whose spec says whether the AllSpark
            module, its Semantic Memory and the memory's class grouping are built.
        head_dim: E of the SegFormer head.
        attention_heads: h of the AllSpark projections.
        memory_multiple: m; each class ring holds m groups of C channels (memory methods only).
        memory_tokens: N of the training crop's last-stage grid (memory methods only).
        attention_path: how the module's labeled-branch map is computed (model/attention_paths.py).
    """

    def __init__(
        self,
        backbone: str = "b0",
        num_classes: int = 21,
        *,
        method: str = DEFAULT_METHOD,
        head_dim: int = 768,
        attention_heads: int = 2,
        memory_multiple: int = 1,
        memory_tokens: int = 0,
        drop_path_rate: float = 0.1,
        attention_dropout: float = 0.1,
        projection_dropout: float = 0.1,
        decoder_dropout: float = 0.1,
        attention_path: AttentionPath = "auto",
    ) -> None:
        super().__init__()
        self.method = method
        self.backbone = build_backbone(backbone, drop_path_rate=drop_path_rate)
        dims = tuple(stage.num_chs for stage in self.backbone.feature_info)
        dim = dims[-1]
        self.allspark: AllSparkModule | None = None
        spec = METHODS[method]
        if spec.channel_attention:
            self.allspark = AllSparkModule(
                dim,
                num_classes,
                attention_heads,
                memory_multiple=memory_multiple if spec.semantic_memory else None,
                memory_tokens=memory_tokens,
                group_by_class=spec.class_grouping,
                attention_dropout=attention_dropout,
                projection_dropout=projection_dropout,
                attention_path=attention_path,
            )
        self.head = SegFormerHead(dims, num_classes, head_dim, dropout=decoder_dropout)

    @property
    def memory(self) -> SemanticMemory | None:
        return self.allspark.memory if self.allspark is not None else None

    def extract_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's four stage maps (before the AllSpark module)."""
        return self.backbone(images)

    def _decode(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        logits = self.head(features)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) ImageNet-normalised images -> (N, K, H, W) logits, each image on its own."""
        features = self.extract_features(images)
        if self.allspark is not None:
            features[3] = self.allspark(features[3])
        return self._decode(features, images.shape[-2:])

    def forward_pooled(self, images: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """The reference's eval-mode pass over a training batch (its pseudo labels): as `forward`,
        but within each of `groups` equal groups the AllSpark keys/values pool the group's images.
        (N, 3, H, W) -> (N, K, H, W); without the module it is `forward`."""
        features = self.extract_features(images)
        if self.allspark is not None:
            features[3] = self.allspark.forward_pooled(features[3], groups)
        return self._decode(features, images.shape[-2:])

    def forward_train(
        self,
        images_l: torch.Tensor,
        images_u: torch.Tensor | None = None,
        *,
        memory_step: MemoryStep = NO_MEMORY_STEP,
        groups: int = 1,
    ) -> TrainOutput:
        """Training forward of cat(labeled (B_l, 3, H, W), unlabeled (B_u, 3, H, W)).

        `memory_step` (see `MemoryStep`) is ignored by methods without a memory; `groups` by
        methods without the AllSpark module. `images_u=None` (the `sup` method) runs the labeled images alone.
        """
        if images_u is None:
            return TrainOutput(self._decode(self.extract_features(images_l), images_l.shape[-2:]), None)
        B_l = images_l.shape[0]
        features = self.extract_features(torch.cat([images_l, images_u]))
        if self.allspark is not None:
            stage4_l, stage4_u = self.allspark.forward_train(
                features[3][:B_l], features[3][B_l:], memory_step=memory_step, groups=groups
            )
            features[3] = torch.cat([stage4_l, stage4_u])
        logits = self._decode(features, images_l.shape[-2:])
        return TrainOutput(logits[:B_l], logits[B_l:])

    @torch.no_grad()
    def memory_tokens(self, images_u: torch.Tensor) -> torch.Tensor:
        """The tokens (B, N, C) `forward_train` would write into the memory for unlabeled images
        (B, 3, H, W) in the current mode (`MemoryStep.later_tokens_u`); memory methods only."""
        return self.allspark.memory_tokens(self.extract_features(images_u)[3])

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """AllSpark module and decoder: the group trained at the head learning-rate multiple."""
        modules = [m for m in (self.allspark, self.head) if m is not None]
        return [p for m in modules for p in m.parameters()]
