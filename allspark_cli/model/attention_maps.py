"""The channel attention map in plain form, and its statistics (DESIGN.md section 1, steps 3-4; paper Eq. 2-3).

Both branches normalise a channel-to-channel map `s = q k^T` (summed over the N tokens, no
1/sqrt(d) scale) by an instance norm over the whole map of each (image, head) (biased variance, eps
1e-5, no affine) and take the softmax over its keys: `normalized_attention_map`, in plain autograd.

The labeled branch's maps are large, and its faster paths never normalise a formed map: the softmax
is row-wise, so the norm's mean cancels in it (`softmax(IN(s)) = softmax(s / std)`), and the std of
every map comes from N x N Gram matrices instead. `map_statistics` is that computation, the one both
faster paths use: the fused path folds the std into its queries (differentiably), and the frugal
function also keeps the Gram matrices for its backward.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

INSTANCE_NORM_EPS = 1e-5


def float32_or_wider(dtype: torch.dtype) -> torch.dtype:
    """Statistics, the instance norm and sums of products run in float32 for half types."""
    return torch.promote_types(dtype, torch.float32)


def normalized_attention_map(scores: torch.Tensor) -> torch.Tensor:
    """softmax_keys(InstanceNorm(scores)) for (..., R, L) maps, each map normalised on its own.

    Plain autograd: the specification, and what the small maps use (unlabeled self-attention C x C
    per head, inference).
    """
    scores = scores.to(float32_or_wider(scores.dtype))
    if torch.onnx.is_in_onnx_export():  # ONNX has no instance norm of an unknown channel count
        return torch.softmax(_instance_norm_plain(scores), dim=-1)
    lead = scores.shape[:-2]
    flat = scores.reshape(-1, 1, *scores.shape[-2:])
    normed = F.instance_norm(flat, eps=INSTANCE_NORM_EPS).reshape(*lead, *scores.shape[-2:])
    return torch.softmax(normed, dim=-1)


def _instance_norm_plain(scores: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the last two dims (biased variance): F.instance_norm's math."""
    mean = scores.mean(dim=(-2, -1), keepdim=True)
    centred = scores - mean
    variance = (centred * centred).mean(dim=(-2, -1), keepdim=True)
    return centred * torch.rsqrt(variance + INSTANCE_NORM_EPS)


class MapStatistics(NamedTuple):
    """The statistics of B maps q[b] k^T (R x L each), and the Gram pieces they come from."""

    mean: torch.Tensor  # (B,)
    std: torch.Tensor  # (B,), biased, eps included
    key_gram: torch.Tensor  # (N, N): k^T k
    key_sums: torch.Tensor  # (N,): k^T 1
    query_grams: torch.Tensor  # (B, N, N): q^T q per image


def map_statistics(queries: torch.Tensor, keys: torch.Tensor, *, centred: torch.Tensor | None = None) -> MapStatistics:
    """Mean and std of every map `queries[b] @ keys^T` without forming it: queries (B, R, N) in
    float32 (or float64), keys (L, N) in any float dtype. Differentiable; `centred`, a flat buffer of
    the queries' dtype and at least N elements, has the centred keys made in row blocks inside it
    instead (no autograd then), so that no whole centred copy of the keys is ever allocated.

    With keys centred over their L channels (k = k_c + 1 m^T), each map row is `(q k_c^T)_r + u_r`,
    u = q m, and `(q k_c^T)_r` sums to zero, so the centred sum of squares is
    `sum(q^T q * k_c^T k_c)` plus `L * |u - mean(u)|^2`: two non-negative terms, no cancellation."""
    B, R, N = queries.shape
    L = keys.shape[0]
    key_means = keys.mean(0, dtype=queries.dtype)  # (N,)
    step = L if centred is None else centred.numel() // N
    centred_gram = queries.new_zeros(N, N)
    for start in range(0, L, step):  # k_c^T k_c over row blocks of the centred keys
        rows = keys[start : start + step]
        if centred is None:
            block = rows - key_means
        else:
            block = torch.sub(rows, key_means, out=centred[: rows.shape[0] * N].view(-1, N))
        centred_gram.addmm_(block.transpose(0, 1), block)
    row_offsets = queries @ key_means  # (B, R): the mean of each map row
    mean = row_offsets.mean(1)
    query_grams = queries.transpose(1, 2) @ queries
    within_rows = (query_grams * centred_gram).sum((1, 2))
    between_rows = L * (row_offsets - mean[:, None]).square().sum(1)
    std = torch.sqrt((within_rows + between_rows) / (R * L) + INSTANCE_NORM_EPS)
    key_gram = centred_gram + L * torch.outer(key_means, key_means)
    return MapStatistics(mean, std, key_gram, L * key_means, query_grams)
