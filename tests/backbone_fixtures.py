"""A DINOv2 small enough for CPU tests, and weight files in Meta's release layout.

`shrink_dinov2(monkeypatch)` swaps the `dinov2-s` row of the variant table for TINY_DINOV2: the
same code path (patch 14, 37 x 37 position grid, LayerScale, four read-out blocks), a few thousand
times less arithmetic. `meta_release_layout` lists the tensors of Meta's `dinov2_vit*14_pretrain.pth`
as the DINOv2 repository builds them (DinoVisionTransformer, block_chunks=0, no registers), written
out here by name so that the test does not take the names from the model it loads into.
"""
from __future__ import annotations

from pathlib import Path

import torch

from allspark_cli.model.dinov2 import DINOV2_VARIANTS, PATCH_SIZE, PRETRAIN_SIZE, DinoV2Spec

TINY_DINOV2 = DinoV2Spec(embed_dim=32, depth=4, num_heads=2, stage_blocks=(0, 1, 2, 3),
                         weight_file=DINOV2_VARIANTS["dinov2-s"].weight_file)
MLP_RATIO = 4  # every DINOv2 ViT below giant
RGB = 3
WEIGHT_STD = 0.02  # the scale of timm's ViT initialisation, so that a run started from such a file trains


def shrink_dinov2(monkeypatch) -> None:
    """`dinov2-s` builds TINY_DINOV2 until the test ends."""
    monkeypatch.setitem(DINOV2_VARIANTS, "dinov2-s", TINY_DINOV2)


def meta_release_layout(spec: DinoV2Spec) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in Meta's release file of a ViT of this size."""
    C, hidden, grid = spec.embed_dim, MLP_RATIO * spec.embed_dim, PRETRAIN_SIZE // PATCH_SIZE
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, C), "pos_embed": (1, 1 + grid * grid, C), "mask_token": (1, C),
        "patch_embed.proj.weight": (C, RGB, PATCH_SIZE, PATCH_SIZE), "patch_embed.proj.bias": (C,),
    }
    block = {"norm1.weight": (C,), "norm1.bias": (C,), "attn.qkv.weight": (3 * C, C), "attn.qkv.bias": (3 * C,),
             "attn.proj.weight": (C, C), "attn.proj.bias": (C,), "ls1.gamma": (C,),
             "norm2.weight": (C,), "norm2.bias": (C,), "mlp.fc1.weight": (hidden, C), "mlp.fc1.bias": (hidden,),
             "mlp.fc2.weight": (C, hidden), "mlp.fc2.bias": (C,), "ls2.gamma": (C,)}
    for index in range(spec.depth):
        shapes.update({f"blocks.{index}.{name}": shape for name, shape in block.items()})
    shapes.update({"norm.weight": (C,), "norm.bias": (C,)})
    return shapes


def write_meta_release(path: Path, spec: DinoV2Spec, seed: int = 0) -> Path:
    """A release-layout file of random tensors (what torch.save of Meta's state dict gives)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(shape, generator=generator) * WEIGHT_STD
               for name, shape in meta_release_layout(spec).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, path)
    return path
