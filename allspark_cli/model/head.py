"""SegFormer's all-MLP decoder head (DESIGN.md section 2; SegFormer, Xie et al. 2021, section 3.2).

Per stage a Linear(C_i -> E) on the tokens, everything resized to stride 4, concatenated in the
order c4, c3, c2, c1, fused by Conv1x1(4E -> E, no bias; kaiming-normal fan-out init as the reference) + BatchNorm + ReLU, Dropout2d, and a
Conv1x1(E -> K) classifier. Submodule names follow the SegFormer release so that reference
checkpoints map by prefix alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLPProjection(nn.Module):
    """(B, C_in, h, w) -> (B, E, h, w) through a Linear on the flattened tokens."""

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        B, _, h, w = features.shape
        tokens = self.proj(features.flatten(2).transpose(1, 2))  # (B, h*w, E)
        return tokens.transpose(1, 2).reshape(B, -1, h, w)


class ConvBNReLU(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_dim)
        self.act = nn.ReLU(inplace=True)
        # The reference builds this as an mmcv ConvModule: kaiming normal (fan_out, ReLU gain), BN 1/0.
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SegFormerHead(nn.Module):
    """Four stage maps (strides 4..32) -> class logits (B, K, H/4, W/4)."""

    def __init__(self, in_dims: tuple[int, ...], num_classes: int, embed_dim: int = 768, *, dropout: float = 0.1):
        super().__init__()
        self.linear_c1, self.linear_c2, self.linear_c3, self.linear_c4 = (MLPProjection(d, embed_dim) for d in in_dims)
        self.linear_fuse = ConvBNReLU(4 * embed_dim, embed_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        c1, c2, c3, c4 = features
        size = c1.shape[-2:]
        projected = [
            F.interpolate(proj(c), size=size, mode="bilinear", align_corners=False)
            for proj, c in ((self.linear_c4, c4), (self.linear_c3, c3), (self.linear_c2, c2))
        ]
        fused = self.linear_fuse(torch.cat([*projected, self.linear_c1(c1)], dim=1))
        return self.linear_pred(self.dropout(fused))
