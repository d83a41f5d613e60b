"""Channel-wise attention maps of AllSpark (DESIGN.md section 1, steps 3-4; paper Eq. 2-3).

Both branches compute `o = dropout(softmax_keys(InstanceNorm(q k))) v^T` where the map is
channel-to-channel (summed over tokens, no 1/sqrt(d) scale) and the instance norm runs over the
whole map of each (image, head): biased variance, eps 1e-5, no affine.

The labeled branch's map is large: `hC x (|src| * hC)` per image, 1024 x 21504 at the pascal
setting with the memory and 1024 x 82944 at coco. Plain autograd keeps four such maps per image
alive (the product, its normalisation, the softmax and the dropout output). `normalized_attention`
is one autograd function that keeps at most one map per image for the backward pass (or none: it
then recomputes the product, one extra matrix multiply), runs image by image so the temporaries
are one image's maps, and regenerates the dropout mask from a saved seed instead of storing it.
The keys and values are shared by all images (broadcast, never copied per image).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

INSTANCE_NORM_EPS = 1e-5
# Keep the normalised maps for backward while they take at most this many bytes; above it
# recompute the q k product in backward (about 1/6 more matrix work, far less memory).
SAVE_MAPS_MAX_BYTES = 256 * 2**20
_SEED_HIGH = 2**62


def _normalize_map(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: (R, L) scores -> instance-normalised float32 map, and its std (0-dim)."""
    var, mean = torch.var_mean(scores, unbiased=False)
    std = torch.sqrt(var + INSTANCE_NORM_EPS)
    return scores.sub_(mean).div_(std), std


def _dropout_(probs: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """In-place inverted dropout whose mask is a pure function of `seed` (so backward can rebuild it)."""
    if p <= 0.0:
        return probs
    generator = torch.Generator(device=probs.device)
    generator.manual_seed(seed)
    keep = torch.empty_like(probs).bernoulli_(1.0 - p, generator=generator)
    return probs.mul_(keep).div_(1.0 - p)


class _NormalizedAttention(torch.autograd.Function):
    """o[b] = dropout(softmax(IN(q[b] @ keys))) @ values^T for every image b (see module docstring)."""

    @staticmethod
    def forward(ctx, queries, keys, values, dropout_p: float, save_maps: bool):
        # queries (B, R, N); keys, values (N, L); returns (B, R, N). Matmuls in the inputs' dtype
        # (bf16 under autocast), normalisation and softmax in float32.
        B, R, N = queries.shape
        seeds = [int(torch.randint(_SEED_HIGH, (1,)).item()) for _ in range(B)] if dropout_p > 0 else [0] * B
        out = queries.new_empty(B, R, N)
        saved, stds = [], []
        for b in range(B):
            normed, std = _normalize_map((queries[b] @ keys).float())
            stds.append(std)
            if save_maps:
                saved.append(normed)
            probs = _dropout_(torch.softmax(normed, dim=-1), dropout_p, seeds[b])
            out[b] = probs.to(values.dtype) @ values.transpose(0, 1)
        ctx.dropout_p, ctx.seeds = dropout_p, seeds
        ctx.save_for_backward(queries, keys, values, torch.stack(stds), *saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        queries, keys, values, stds, *saved = ctx.saved_tensors
        B = queries.shape[0]
        dtype = queries.dtype
        grad_out = grad_out.to(dtype)
        grad_q = torch.empty_like(queries)
        grad_k = torch.zeros(keys.shape, dtype=torch.float32, device=keys.device)
        grad_v = torch.zeros(values.shape, dtype=torch.float32, device=values.device)
        for b in range(B):
            if saved:
                normed = saved[b]
            else:
                normed, _ = _normalize_map((queries[b] @ keys).float())
            probs = torch.softmax(normed, dim=-1)
            dropped = _dropout_(probs.clone(), ctx.dropout_p, ctx.seeds[b]).to(dtype)
            grad_v += (grad_out[b].transpose(0, 1) @ dropped).float()  # (N, R) @ (R, L)
            del dropped
            # d(dropout): the same mask, scaled; computed in place on the upstream gradient.
            grad_map = _dropout_((grad_out[b] @ values).float(), ctx.dropout_p, ctx.seeds[b])
            # d(softmax): p * (g - <g, p>_row), row dots without a full-size temporary.
            row_dot = torch.bmm(grad_map.unsqueeze(1), probs.unsqueeze(2)).view(-1, 1)
            grad_map.sub_(row_dot).mul_(probs)
            del probs
            # d(instance norm): (g - mean(g) - n * mean(g * n)) / std over the whole map.
            numel = normed.numel()
            mean_g = grad_map.sum() / numel
            mean_gn = torch.dot(grad_map.flatten(), normed.flatten()) / numel
            grad_map.sub_(mean_g).addcmul_(normed, -mean_gn).div_(stds[b])
            del normed
            grad_map = grad_map.to(dtype)
            grad_q[b] = grad_map @ keys.transpose(0, 1)
            grad_k += (queries[b].transpose(0, 1) @ grad_map).float()
        return grad_q, grad_k.to(keys.dtype), grad_v.to(values.dtype), None, None


def _compute_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def normalized_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    dropout_p: float = 0.0,
    save_maps: bool | None = None,
) -> torch.Tensor:
    """Channel cross-attention with shared keys: (B, R, N) queries, (N, L) keys/values -> (B, R, N).

    `save_maps=None` keeps the maps for backward when they fit in `SAVE_MAPS_MAX_BYTES`.
    Under autocast the products run in the autocast dtype (bf16/fp16), the norm and softmax in fp32.
    """
    dtype = _compute_dtype(queries.device)
    if dtype is not None:
        queries, keys, values = queries.to(dtype), keys.to(dtype), values.to(dtype)
    if save_maps is None:
        B, R, _ = queries.shape
        save_maps = B * R * keys.shape[1] * 4 <= SAVE_MAPS_MAX_BYTES
    with torch.autocast(queries.device.type, enabled=False):
        return _NormalizedAttention.apply(queries, keys, values, float(dropout_p), bool(save_maps))


def normalized_attention_map(scores: torch.Tensor) -> torch.Tensor:
    """softmax_keys(InstanceNorm(scores)) for (..., R, L) maps, each map normalised on its own.

    Plain autograd: used for the small maps (unlabeled self-attention C x C per head, inference).
    """
    lead = scores.shape[:-2]
    flat = scores.float().reshape(-1, 1, *scores.shape[-2:])
    normed = F.instance_norm(flat, eps=INSTANCE_NORM_EPS).reshape(*lead, *scores.shape[-2:])
    return torch.softmax(normed, dim=-1)
