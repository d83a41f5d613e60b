"""The backbone registry: every encoder family by name, its variants, and the lookups the rest of the
toolkit goes through (DESIGN.md section 2; the interface is model/encoder.py).

A family lives in its own file (mit.py, dinov2.py) and implements `BackboneFamily`; adding one is
that file, its entry in `BACKBONES` and its variant names in the `Backbone` literal below (the
settings, the CLI choices and the checkpoint validation read that literal).
"""
from __future__ import annotations

from typing import Literal, get_args

from torch import nn

from allspark_cli.model.dinov2 import DINOV2
from allspark_cli.model.encoder import BackboneFamily
from allspark_cli.model.mit import MIT

Backbone = Literal["b0", "b1", "b2", "b3", "b4", "b5", "dinov2-s", "dinov2-b", "dinov2-l"]
BackboneFamilyName = Literal["mit", "dinov2"]
BACKBONES: dict[str, BackboneFamily] = {family.name: family for family in (MIT, DINOV2)}
DEFAULT_BACKBONE: Backbone = "b5"  # the paper's encoder
# The family of checkpoints written before checkpoints recorded it (MiT was the only one).
LEGACY_FAMILY: BackboneFamilyName = "mit"

_FAMILY_OF_VARIANT = {variant: family for family in BACKBONES.values() for variant in family.variants}
assert get_args(Backbone) == tuple(_FAMILY_OF_VARIANT)  # one list of variant names, each in one family
assert get_args(BackboneFamilyName) == tuple(BACKBONES)


def family_of(variant: str) -> BackboneFamily:
    """The family of a variant name ("b5" -> MiT, "dinov2-s" -> DINOv2)."""
    return _FAMILY_OF_VARIANT[variant]


def build_backbone(variant: str, *, drop_path_rate: float) -> nn.Module:
    """A randomly initialised encoder module of `variant` (the contract: model/encoder.py)."""
    return family_of(variant).build(variant, drop_path_rate=drop_path_rate)


def display_name(variant: str) -> str:
    """"MiT-B5", "DINOv2-S"."""
    return family_of(variant).display_name(variant)


def backbone_choices() -> str:
    """Every family with its variants, for help texts: "MiT: b0, ..., b5; DINOv2: dinov2-s, ..."."""
    return "; ".join(f"{family.label}: {', '.join(family.variants)}" for family in BACKBONES.values())
