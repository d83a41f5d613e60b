"""The backbone registry: every encoder family by name, its variants, and the lookups the rest of the
toolkit goes through (DESIGN.md section 2; the interface is model/encoder.py).

A family lives in its own file (mit.py, dinov2.py) and implements `BackboneFamily`; adding one is
that file and its entry in `BACKBONES`: the settings, the CLI choices and the checkpoint validation
check names against the registry (`Backbone`, `BackboneFamilyName`).
"""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator
from torch import nn

from allspark_cli.model.dinov2 import DINOV2
from allspark_cli.model.encoder import BackboneFamily
from allspark_cli.model.mit import MIT

BACKBONES: dict[str, BackboneFamily] = {family.name: family for family in (MIT, DINOV2)}
_FAMILY_OF_VARIANT = {variant: family for family in BACKBONES.values() for variant in family.variants}
assert len(_FAMILY_OF_VARIANT) == sum(len(family.variants) for family in BACKBONES.values()), \
    "a variant name must be unique across families"
DEFAULT_BACKBONE = "b5"  # the paper's encoder
# The family of checkpoints written before checkpoints recorded it (MiT was the only one).
LEGACY_FAMILY = "mit"


def known_backbone(name: str) -> str:
    """`name` when it is a variant of a registered family; ValueError listing them otherwise."""
    if name not in _FAMILY_OF_VARIANT:
        raise ValueError(f"unknown backbone {name!r}; known: {backbone_choices()}")
    return name


def known_family(name: str) -> str:
    """`name` when it is a registered family; ValueError listing them otherwise."""
    if name not in BACKBONES:
        raise ValueError(f"unknown encoder family {name!r}; known: {', '.join(BACKBONES)}")
    return name


# A variant and a family name, checked against the registry when validated (an entry added to
# BACKBONES is accepted everywhere at once).
Backbone = Annotated[str, AfterValidator(known_backbone)]
BackboneFamilyName = Annotated[str, AfterValidator(known_family)]


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


def is_backbone(name: object) -> bool:
    """Whether `name` is a variant of a registered family."""
    return name in _FAMILY_OF_VARIANT
