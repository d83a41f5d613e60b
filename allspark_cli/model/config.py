"""The model's settings, validated once, and the one builder that reads them."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from allspark_cli.constants import AttentionPath
from allspark_cli.model.mit import MIT_VARIANTS, stage_grid
from allspark_cli.model.segmentor import MEMORY_METHODS, AllSparkSegmentor, Method



def tokens_for_crop(crop: int | tuple[int, int]) -> int:
    """N = h*w of the stride-32 grid for a training crop (513 -> 17 x 17 = 289)."""
    height, width = (crop, crop) if isinstance(crop, int) else crop
    return stage_grid(height) * stage_grid(width)


class ModelConfig(BaseModel):
    """Architecture of a segmentor; stored in every checkpoint of this toolkit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: str = Field("b5", description="MiT variant: b0 .. b5")
    method: Method = Field("allspark", description="ablation variant (paper Table 5)")
    num_classes: int = Field(21, ge=2, le=1024)
    head_dim: int = Field(768, ge=8, le=4096, description="E, width of the SegFormer head")
    attention_heads: int = Field(2, ge=1, le=16, description="h of the AllSpark projections")
    memory_multiple: int = Field(1, ge=1, le=16, description="memory length S = multiple x C")
    memory_tokens: int = Field(0, ge=0, description="N of the training crop's stride-32 grid")
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0)
    attention_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    projection_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    decoder_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    attention_path: AttentionPath = Field("auto", description="labeled-branch attention: auto, eager, frugal, sdpa")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.backbone not in MIT_VARIANTS:
            raise ValueError(f"backbone must be one of {', '.join(MIT_VARIANTS)}, got {self.backbone!r}")
        if self.method in MEMORY_METHODS and self.memory_tokens < 1:
            raise ValueError(f"method {self.method!r} needs memory_tokens >= 1 (tokens_for_crop(training crop))")
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
