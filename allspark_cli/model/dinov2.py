"""DINOv2 ViT-S/14, ViT-B/14 and ViT-L/14 encoders (Oquab et al. 2023) on timm's VisionTransformer.

DESIGN.md section 2 describes the MiT encoder of the paper; this is a second family behind the same
seam (model/encoder.py). A plain ViT has one resolution: every block's tokens lie on the stride-14
patch grid. As in DINOv2's own dense heads, the four "stages" are the outputs of four evenly spaced
blocks (2/5/8/11 of ViT-S and B, 4/11/17/23 of ViT-L), each passed through the final LayerNorm and
stripped of its class token. All four maps have stride 14, which the SegFormer head takes as they
are (it resizes every stage to the first one's size); the AllSpark module runs on the last.

Any input size works: the image gets PATCH_SIZE - 1 zero rows and columns on the bottom and the right,
so the stride-14 patch convolution makes ceil(H / 14) x ceil(W / 14) patches (the patches of timm's
`dynamic_img_pad`), and the position embeddings, pretrained on a 37 x 37 grid (518 pixels), are
resized bicubically to that grid in every forward. A crop that is a multiple of 14 uses every pixel
without padding; the memory's N is ceil(crop / 14) squared.

We run the ViT's modules in our own forward instead of timm's `forward_intermediates` or
`features_only`: those work the grid out in Python numbers, which `torch.jit.trace` (the ONNX and
TorchScript export) freezes at the tracing size; here every size comes from a tensor's shape.

Weights: Meta's release files (`dinov2_vits14_pretrain.pth`, ...: `cls_token`, `pos_embed`,
`mask_token`, `patch_embed.proj.*`, `blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,
mlp.fc2,ls2.gamma}.*`, `norm.*`) or timm's copies of them, mapped by timm's own ViT checkpoint
filter (which drops the training-only `mask_token`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from allspark_cli.model.encoder import BackboneFamily, Encoder, StageInfo

PATCH_SIZE = 14
PRETRAIN_SIZE = 518  # the publisher's training resolution: a 37 x 37 position-embedding grid
LAYER_SCALE_INIT = 1e-5  # DINOv2's LayerScale initial value (the released weights overwrite it)
CLASS_TOKENS = 1  # DINOv2 without registers: one class token ahead of the patch tokens


@dataclass(frozen=True)
class DinoV2Spec:
    """One ViT size: width, depth, heads, the blocks read out as the four stages, the release file."""

    embed_dim: int
    depth: int
    num_heads: int
    stage_blocks: tuple[int, int, int, int]
    weight_file: str


DINOV2_VARIANTS: dict[str, DinoV2Spec] = {
    "dinov2-s": DinoV2Spec(384, 12, 6, (2, 5, 8, 11), "dinov2_vits14_pretrain.pth"),
    "dinov2-b": DinoV2Spec(768, 12, 12, (2, 5, 8, 11), "dinov2_vitb14_pretrain.pth"),
    "dinov2-l": DinoV2Spec(1024, 24, 16, (4, 11, 17, 23), "dinov2_vitl14_pretrain.pth"),
}


def resize_position_grid(pos_embed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(1, CLASS_TOKENS + g*g, C) position embeddings -> (1, height*width, C) for the patch tokens
    (bicubic, as DINOv2 interpolates them); the class token's embedding is not part of the result."""
    grid = pos_embed[:, CLASS_TOKENS:]
    _, tokens, C = grid.shape
    side = math.isqrt(tokens)  # the stored grid is square
    grid = grid.reshape(1, side, side, C).permute(0, 3, 1, 2)  # (1, C, g, g)
    grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


class DinoV2Backbone(Encoder):
    """DINOv2 ViT returning four block outputs as maps `[(B, C, ceil(H/14), ceil(W/14))]`."""

    def __init__(self, variant: str = "dinov2-s", *, drop_path_rate: float = 0.1) -> None:
        super().__init__(DINOV2, variant)
        spec = DINOV2_VARIANTS[variant]
        self.stage_blocks = spec.stage_blocks
        self.encoder = VisionTransformer(
            img_size=PRETRAIN_SIZE,
            patch_size=PATCH_SIZE,
            embed_dim=spec.embed_dim,
            depth=spec.depth,
            num_heads=spec.num_heads,
            init_values=LAYER_SCALE_INIT,
            num_classes=0,
            drop_path_rate=drop_path_rate,
            dynamic_img_size=True,
        )

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        B = images.shape[0]
        vit = self.encoder
        # 13 zero rows and columns: the stride-14 patch convolution then makes ceil(side / 14)
        # patches and leaves out the padding no patch needs (a fixed pad, so the export traces it).
        padded = F.pad(images, (0, PATCH_SIZE - 1, 0, PATCH_SIZE - 1))
        patches = vit.patch_embed.proj(padded)  # (B, C, h, w)
        _, C, h, w = patches.shape
        tokens = patches.flatten(2).transpose(1, 2) + resize_position_grid(vit.pos_embed, h, w)  # (B, h*w, C)
        class_token = (vit.cls_token + vit.pos_embed[:, :CLASS_TOKENS]).expand(B, -1, -1)
        tokens = torch.cat([class_token, tokens], dim=1)  # (B, 1 + h*w, C)
        maps = []
        for index, block in enumerate(vit.blocks):
            tokens = block(tokens)
            if index in self.stage_blocks:
                patch_tokens = vit.norm(tokens)[:, CLASS_TOKENS:]  # (B, h*w, C)
                maps.append(patch_tokens.transpose(1, 2).reshape(B, C, h, w))
        return maps


class DinoV2Family(BackboneFamily):
    """DINOv2 ViT-S/B/L with patch 14 behind the backbone seam."""

    name = "dinov2"
    label = "DINOv2"
    publisher = "Meta's DINOv2 release (dl.fbaipublicfiles.com/dinov2/<name>/<name>_pretrain.pth)"
    variant_table = DINOV2_VARIANTS
    encoder_class = DinoV2Backbone

    def display_name(self, variant: str) -> str:
        return f"{self.label}-{variant.removeprefix(self.name + '-').upper()}"

    def feature_info(self, variant: str) -> tuple[StageInfo, ...]:
        spec = DINOV2_VARIANTS[variant]
        return tuple(StageInfo(spec.embed_dim, PATCH_SIZE, f"encoder.blocks.{i}") for i in spec.stage_blocks)

    def grid_side(self, size: int, variant: str) -> int:
        return -(-size // PATCH_SIZE)  # ceil: the padded last patch counts

    def weight_file(self, variant: str) -> str:
        return DINOV2_VARIANTS[variant].weight_file

    def encoder_state_dict(self, published: dict[str, torch.Tensor], encoder: nn.Module) -> dict[str, torch.Tensor]:
        return checkpoint_filter_fn(dict(published), encoder)

    def variant_of(self, encoder_state: dict[str, torch.Tensor]) -> str:
        width = encoder_state["patch_embed.proj.weight"].shape[0]
        depth = len({k.split(".")[1] for k in encoder_state if k.startswith("blocks.")})
        for variant, spec in DINOV2_VARIANTS.items():
            if (spec.embed_dim, spec.depth) == (width, depth):
                return variant
        raise ValueError(f"a ViT of width {width} and depth {depth} matches no {', '.join(map(self.display_name, DINOV2_VARIANTS))}")


DINOV2 = DinoV2Family()
