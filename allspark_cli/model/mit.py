"""MiT (SegFormer's Mix Transformer) encoders B0-B5 on timm's `PyramidVisionTransformerV2`.

DESIGN.md section 2: overlapping patch embeddings (7/4, then 3/2 three times), efficient
self-attention with spatial-reduction ratios 8/4/2/1, Mix-FFN with mlp ratio 4 in every stage,
qkv bias, heads 1/2/5/8. timm's PVTv2 is exactly this network once built with `mlp_ratios=4`
(timm's own pvt_v2 variants use 8/8/4/4, and their pretrained weights are PVTv2 ImageNet weights,
not MiT weights). Its LayerNorm epsilons already match MiT: 1e-6 in blocks and after each stage,
1e-5 in the patch embeddings and the spatial-reduction norms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from timm.models.pvt_v2 import PyramidVisionTransformerV2
from torch import nn

MIT_HEADS = (1, 2, 5, 8)
MIT_SR_RATIOS = (8, 4, 2, 1)
MIT_MLP_RATIO = 4.0
# Output stride of each stage: the 7/4 stem, then one 3/2 patch embedding per stage.
MIT_STRIDES = (4, 8, 16, 32)


@dataclass(frozen=True)
class MiTSpec:
    """Widths and depths of one MiT variant (heads, sr ratios and mlp ratio are shared)."""

    dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]


Backbone = Literal["b0", "b1", "b2", "b3", "b4", "b5"]
_WIDE = (64, 128, 320, 512)
MIT_VARIANTS: dict[Backbone, MiTSpec] = {
    "b0": MiTSpec(dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "b1": MiTSpec(dims=_WIDE, depths=(2, 2, 2, 2)),
    "b2": MiTSpec(dims=_WIDE, depths=(3, 4, 6, 3)),
    "b3": MiTSpec(dims=_WIDE, depths=(3, 4, 18, 3)),
    "b4": MiTSpec(dims=_WIDE, depths=(3, 8, 27, 3)),
    "b5": MiTSpec(dims=_WIDE, depths=(3, 6, 40, 3)),
}
assert tuple(MIT_VARIANTS) == get_args(Backbone)  # one list of variant names


def variant_for(dims: tuple[int, ...], depths: tuple[int, ...]) -> str | None:
    """The MiT variant name with these widths and depths, or None."""
    for name, spec in MIT_VARIANTS.items():
        if spec.dims == tuple(dims) and spec.depths == tuple(depths):
            return name
    return None


def stage_grid(size: int, stage: int = 3) -> int:
    """Side of stage `stage`'s feature map for an input side `size` (any size, not only multiples of 32).

    Each patch embedding is a convolution with padding k // 2: out = (in + 2 * (k // 2) - k) // s + 1.
    """
    for kernel, stride in [(7, 4)] + [(3, 2)] * stage:
        size = (size + 2 * (kernel // 2) - kernel) // stride + 1
    return size


class MiTBackbone(nn.Module):
    """MiT encoder returning the four stage maps `[(B, C_i, H_i, W_i)]` at strides 4, 8, 16, 32."""

    def __init__(self, variant: str = "b0", *, drop_path_rate: float = 0.1) -> None:
        super().__init__()
        spec = MIT_VARIANTS[variant]
        self.variant = variant
        self.dims = spec.dims
        self.encoder = PyramidVisionTransformerV2(
            num_classes=0,
            depths=spec.depths,
            embed_dims=spec.dims,
            num_heads=MIT_HEADS,
            sr_ratios=MIT_SR_RATIOS,
            mlp_ratios=(MIT_MLP_RATIO,) * 4,
            qkv_bias=True,
            linear=False,
            drop_path_rate=drop_path_rate,
        )
        self.feature_info = [
            {"num_chs": dim, "reduction": stride, "module": f"encoder.stages.{i}"}
            for i, (dim, stride) in enumerate(zip(spec.dims, MIT_STRIDES))
        ]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder.forward_intermediates(images, intermediates_only=True)
