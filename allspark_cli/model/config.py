"""The model's settings, validated once, and the one builder that reads them."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from allspark_cli.constants import AttentionPath
from allspark_cli.model.backbones import (
    BACKBONES,
    DEFAULT_BACKBONE,
    LEGACY_FAMILY,
    Backbone,
    BackboneFamilyName,
    backbone_choices,
    family_of,
    is_backbone,
)
from allspark_cli.model.methods import DEFAULT_METHOD, METHODS, Method
from allspark_cli.model.segmentor import AllSparkSegmentor


def grid_for_crop(crop: int | tuple[int, int], backbone: Backbone = DEFAULT_BACKBONE) -> tuple[int, int]:
    """(h, w) of the backbone's last-stage grid for a training crop (MiT, stride 32: 513 -> (17, 17);
    DINOv2, stride 14: 518 -> (37, 37))."""
    height, width = (crop, crop) if isinstance(crop, int) else crop
    family = family_of(backbone)
    return family.grid_side(height, backbone), family.grid_side(width, backbone)


def tokens_for_crop(crop: int | tuple[int, int], backbone: Backbone = DEFAULT_BACKBONE) -> int:
    """N = h*w of the last-stage grid for a training crop (MiT: 513 -> 17 x 17 = 289)."""
    height, width = grid_for_crop(crop, backbone)
    return height * width


class ArchitectureChoices(BaseModel):
    """The architecture fields a user chooses: declared and bounded here once, shared by the
    training settings (`model:` section) and ModelConfig, so a value out of range is refused when
    the settings are validated, before any dataset or model is touched."""

    model_config = ConfigDict(extra="forbid")

    backbone: Backbone = Field(DEFAULT_BACKBONE, description=f"encoder variant ({backbone_choices()})")
    method: Method = Field(DEFAULT_METHOD, description="ablation variant (paper Table 5)")
    head_dim: int = Field(768, ge=8, le=4096, description="SegFormer head embedding width E")
    attention_heads: int = Field(2, ge=1, le=16, description="h of the AllSpark projections")
    memory_multiple: int = Field(1, ge=1, le=16, description="memory length S = multiple x C")
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0, description="stochastic depth of the encoder blocks")
    attention_path: AttentionPath = Field(
        "auto",
        description="labeled-branch attention: eager (plain autograd), sdpa (fused kernels), frugal (the "
        "memory-lean function); auto = decided once per run: frugal on CPU, on CUDA eager when its maps fit in "
        "free memory, else frugal",
    )


class ModelConfig(ArchitectureChoices):
    """Architecture of a segmentor; stored in every checkpoint of this toolkit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone_family: BackboneFamilyName = Field(
        LEGACY_FAMILY,
        description="the encoder family of `backbone`; filled in from it (checkpoints written before it was stored: mit)"
    )
    num_classes: int = Field(21, ge=2, le=1024)
    memory_tokens: int = Field(0, ge=0, description="N of the training crop's last-stage grid")
    memory_grid: tuple[int, int] | None = Field(
        None, description="(h, w) of that grid, h * w = N (None in checkpoints written before it was stored)"
    )
    attention_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    projection_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    decoder_dropout: float = Field(0.1, ge=0.0, lt=1.0)

    @model_validator(mode="before")
    @classmethod
    def _family_from_backbone(cls, data: Any) -> Any:
        # Variant names are unique across families, so an absent family follows from the backbone.
        if isinstance(data, dict) and "backbone_family" not in data:
            backbone = data.get("backbone", DEFAULT_BACKBONE)
            if is_backbone(backbone):
                data = {**data, "backbone_family": family_of(backbone).name}
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        family = BACKBONES[self.backbone_family]
        if self.backbone not in family.variants:
            raise ValueError(f"backbone {self.backbone!r} is not a {family.label} variant ({', '.join(family.variants)})")
        if METHODS[self.method].semantic_memory and self.memory_tokens < 1:
            raise ValueError(f"method {self.method!r} needs memory_tokens >= 1 (tokens_for_crop(training crop))")
        if self.memory_grid is not None and self.memory_grid[0] * self.memory_grid[1] != self.memory_tokens:
            raise ValueError(f"memory_grid {self.memory_grid} does not hold memory_tokens = {self.memory_tokens}")
        return self


def build_model(config: ModelConfig) -> AllSparkSegmentor:
    """The segmentor described by `config` (random init; load weights separately)."""
    model = AllSparkSegmentor(
        config.backbone,
        config.num_classes,
        method=config.method,
        head_dim=config.head_dim,
        attention_heads=config.attention_heads,
        memory_multiple=config.memory_multiple,
        memory_tokens=config.memory_tokens,
        drop_path_rate=config.drop_path_rate,
        attention_dropout=config.attention_dropout,
        projection_dropout=config.projection_dropout,
        decoder_dropout=config.decoder_dropout,
        attention_path=config.attention_path,
    )
    model.config = config
    return model
