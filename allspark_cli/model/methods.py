"""The method table: the paper's Table 5 ablation variants, each declared once (DESIGN.md section 1).

A method says what the segmentor is built with and what a training step feeds it: whether it
trains on unlabeled images (the pseudo-label pass and the unlabeled loss), whether the AllSpark
module's channel-wise cross-attention sits on the stage-4 map, whether that module keeps a Semantic
Memory, and whether the memory groups the channels by class (CSG) or enqueues them blindly. The
segmentor, the loaders, the banner, `ablate`, the checkpoint reader and the presets' baseline
recipes ask these properties, never a method's name, so a new method is one entry of `METHODS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator


@dataclass(frozen=True)
class MethodSpec:
    """One ablation variant. Each component needs the one before it: class grouping sorts a
    Semantic Memory, the memory is read by the AllSpark module, and the module takes its training
    keys and values from unlabeled images (without them it would train as absent and infer as present)."""

    name: str  # as `--method` and the settings write it
    label: str  # its row of the paper's Table 5
    unlabeled: bool  # trains on unlabeled images: pseudo labels and an unlabeled loss
    channel_attention: bool  # the AllSpark module (channel-wise cross-attention) on the stage-4 map
    semantic_memory: bool  # the module keeps a Semantic Memory of unlabeled channels
    class_grouping: bool  # the memory groups channels by class (CSG); otherwise it enqueues them blindly
    # The reference trains it with a baseline script of its own, whose recipe a preset may record
    # (a preset's `baselines`, applied under `train.baseline_recipe: reference`).
    reference_baseline: bool = False

    def __post_init__(self) -> None:
        needs = ((self.class_grouping, self.semantic_memory, "class grouping needs a Semantic Memory"),
                 (self.semantic_memory, self.channel_attention, "a Semantic Memory needs the AllSpark module"),
                 (self.channel_attention, self.unlabeled, "the AllSpark module needs unlabeled images"))
        for component, required, reason in needs:
            if component and not required:
                raise ValueError(f"method {self.name!r}: {reason}")


# In the paper's order: each row adds one component to the one above it.
METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("sup", "supervised", unlabeled=False, channel_attention=False, semantic_memory=False,
               class_grouping=False, reference_baseline=True),
    MethodSpec("semi", "pseudo-labeling baseline", unlabeled=True, channel_attention=False, semantic_memory=False,
               class_grouping=False, reference_baseline=True),
    MethodSpec("cca", "+ channel-wise cross-attention", unlabeled=True, channel_attention=True,
               semantic_memory=False, class_grouping=False),
    MethodSpec("cca+smem", "+ Semantic Memory (no grouping)", unlabeled=True, channel_attention=True,
               semantic_memory=True, class_grouping=False),
    MethodSpec("allspark", "AllSpark", unlabeled=True, channel_attention=True, semantic_memory=True,
               class_grouping=True),
)}
DEFAULT_METHOD = "allspark"


def known_method(name: str) -> str:
    """`name` when it is a method of the table; ValueError listing the known ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return name


# The settings' and ModelConfig's method: checked against the table when it is validated (so an
# entry added to METHODS is accepted everywhere at once).
Method = Annotated[str, AfterValidator(known_method)]


def method_of_weights(*, channel_attention: bool, semantic_memory: bool) -> str | None:
    """The method of a reference checkpoint whose weights have (or lack) the AllSpark module and
    its memory: the reference trains every model on unlabeled images and groups its memory by
    class, so of the methods with such weights it is the one that does (None: no such method)."""
    for spec in METHODS.values():
        if (spec.unlabeled, spec.channel_attention, spec.semantic_memory, spec.class_grouping) == (
                True, channel_attention, semantic_memory, semantic_memory):
            return spec.name
    return None
