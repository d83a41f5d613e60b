"""MiT (SegFormer's Mix Transformer) encoders B0-B5 on timm's `PyramidVisionTransformerV2`.

DESIGN.md section 2: overlapping patch embeddings (7/4, then 3/2 three times), efficient
self-attention with spatial-reduction ratios 8/4/2/1, Mix-FFN with mlp ratio 4 in every stage,
qkv bias, heads 1/2/5/8. timm's PVTv2 is exactly this network once built with `mlp_ratios=4`
(timm's own pvt_v2 variants use 8/8/4/4, and their pretrained weights are PVTv2 ImageNet weights,
not MiT weights). Its LayerNorm epsilons already match MiT: 1e-6 in blocks and after each stage,
1e-5 in the patch embeddings and the spatial-reduction norms.

`MIT` is the family's side of the backbone seam (model/encoder.py): pretrained weights are the
SegFormer release files (`mit_b0.pth` .. `mit_b5.pth`) or Hugging Face `nvidia/mit-b*`, remapped
in model/weights.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.pvt_v2 import PyramidVisionTransformerV2
from torch import nn

from allspark_cli.model.encoder import BackboneFamily, Encoder, StageInfo
from allspark_cli.model.weights import timm_names_from_segformer

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


_WIDE = (64, 128, 320, 512)
MIT_VARIANTS: dict[str, MiTSpec] = {
    "b0": MiTSpec(dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "b1": MiTSpec(dims=_WIDE, depths=(2, 2, 2, 2)),
    "b2": MiTSpec(dims=_WIDE, depths=(3, 4, 6, 3)),
    "b3": MiTSpec(dims=_WIDE, depths=(3, 4, 18, 3)),
    "b4": MiTSpec(dims=_WIDE, depths=(3, 8, 27, 3)),
    "b5": MiTSpec(dims=_WIDE, depths=(3, 6, 40, 3)),
}


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


class MiTBackbone(Encoder):
    """MiT encoder returning the four stage maps `[(B, C_i, H_i, W_i)]` at strides 4, 8, 16, 32."""

    def __init__(self, variant: str = "b0", *, drop_path_rate: float = 0.1) -> None:
        super().__init__(MIT, variant)
        spec = MIT_VARIANTS[variant]
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

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder.forward_intermediates(images, intermediates_only=True)


class MiTFamily(BackboneFamily):
    """MiT-B0..B5 behind the backbone seam."""

    name = "mit"
    label = "MiT"
    publisher = "the SegFormer release (or Hugging Face nvidia/mit-b*, model.safetensors)"
    variant_table = MIT_VARIANTS
    encoder_class = MiTBackbone

    def feature_info(self, variant: str) -> tuple[StageInfo, ...]:
        dims = MIT_VARIANTS[variant].dims
        return tuple(StageInfo(dim, stride, f"encoder.stages.{i}") for i, (dim, stride) in enumerate(zip(dims, MIT_STRIDES)))

    def grid_side(self, size: int, variant: str) -> int:
        return stage_grid(size)

    def weight_file(self, variant: str) -> str:
        return f"mit_{variant}.pth"

    def encoder_state_dict(self, published: dict[str, torch.Tensor], encoder: nn.Module) -> dict[str, torch.Tensor]:
        return timm_names_from_segformer(published)

    def variant_of(self, encoder_state: dict[str, torch.Tensor]) -> str:
        # The widths are the output channels of the four patch embeddings, the depths the block counts.
        dims = [encoder_state["patch_embed.proj.weight"].shape[0]]
        dims += [encoder_state[f"stages.{i}.downsample.proj.weight"].shape[0] for i in (1, 2, 3)]
        depths = [len({k.split(".")[3] for k in encoder_state if k.startswith(f"stages.{i}.blocks.")}) for i in range(4)]
        variant = variant_for(tuple(dims), tuple(depths))
        if variant is None:
            raise ValueError(f"MiT widths {dims} and depths {depths} match no MiT-B0..B5")
        return variant


MIT = MiTFamily()
