"""The backbone seam: what the rest of the toolkit needs to know about an encoder family, in one
interface (DESIGN.md section 2), so that the segmentor, the settings (the token grid of a crop),
the checkpoint reader (the variant behind a state dict) and the weight loader (publisher layout ->
our modules) never name a family.

An encoder module, as `BackboneFamily.build` returns it:
- maps (B, 3, H, W) ImageNet-normalised images to four stage maps [(B, C_i, h_i, w_i)], i = 1..4,
  for any H and W: the SegFormer head reads all four (resized to the first one's size), the
  AllSpark module runs on the last;
- keeps the publisher's network under `.encoder`, so that a segmentor's state dict names it
  `backbone.encoder.<timm name>` and a weight file, once remapped, loads into `.encoder` alone;
- carries `variant`, `family` (its `BackboneFamily`), `dims` (C_1..C_4) and `feature_info` (one
  `StageInfo` per stage, timm's feature_info fields).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

# Where the publisher's network sits in a segmentor's state dict (segmentor.backbone.encoder).
ENCODER_PREFIX = "backbone.encoder."


class StageInfo(NamedTuple):
    """One stage map of an encoder (the fields of timm's feature_info)."""

    num_chs: int  # C_i
    reduction: int  # stride of the map in input pixels
    module: str  # the module that makes it, relative to the encoder module


class Encoder(nn.Module):
    """What every encoder module shares: its family, variant and stage table (the contract above)."""

    def __init__(self, family: BackboneFamily, variant: str) -> None:
        super().__init__()
        self.family = family
        self.variant = variant
        self.feature_info = family.feature_info(variant)
        self.dims = family.dims(variant)


class BackboneFamily(ABC):
    """One encoder family and its variants (a variant name is unique across families)."""

    name: str  # recorded in checkpoints: "mit", "dinov2"
    label: str  # for people: "MiT", "DINOv2"
    publisher: str  # where its pretrained weights come from, for messages
    variant_table: Mapping[str, object]  # variant name -> the family's spec of it
    encoder_class: type[Encoder]  # built as encoder_class(variant, drop_path_rate=...)

    @property
    def variants(self) -> tuple[str, ...]:
        """The variant names a user can choose (`model.backbone`)."""
        return tuple(self.variant_table)

    def display_name(self, variant: str) -> str:
        """The variant as people write it ("MiT-B5")."""
        return f"{self.label}-{variant.upper()}"

    def build(self, variant: str, *, drop_path_rate: float) -> Encoder:
        """A randomly initialised encoder module of `variant` (see the module docstring)."""
        return self.encoder_class(variant, drop_path_rate=drop_path_rate)

    @abstractmethod
    def feature_info(self, variant: str) -> tuple[StageInfo, ...]:
        """Channels and stride of the four stage maps."""

    @abstractmethod
    def grid_side(self, size: int, variant: str) -> int:
        """Side of the last stage's map for an input side of `size` pixels (exact for every size)."""

    @abstractmethod
    def weight_file(self, variant: str) -> str:
        """The file name of the variant's pretrained weights as their publisher releases them."""

    @abstractmethod
    def encoder_state_dict(self, published: dict[str, torch.Tensor], encoder: nn.Module) -> dict[str, torch.Tensor]:
        """A weight file's tensors (publisher layout) in the names of `encoder` (the module's `.encoder`);
        what the publisher ships beside the encoder is dropped here, anything else is left for the
        load report."""

    @abstractmethod
    def variant_of(self, encoder_state: dict[str, torch.Tensor]) -> str:
        """The variant that made these encoder tensors (names without ENCODER_PREFIX). KeyError naming
        the first expected tensor that is absent; ValueError saying what was found when no variant fits."""

    def dims(self, variant: str) -> tuple[int, ...]:
        """C_1..C_4."""
        return tuple(stage.num_chs for stage in self.feature_info(variant))
