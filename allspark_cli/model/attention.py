"""Channel-wise attention maps of AllSpark (DESIGN.md section 1, steps 3-4; paper Eq. 2-3).

Both branches compute `o = dropout(softmax_keys(InstanceNorm(q k))) v^T` where the map is
channel-to-channel (summed over tokens, no 1/sqrt(d) scale) and the instance norm runs over the
whole map of each (image, head): biased variance, eps 1e-5, no affine.

The labeled branch's map is large: `hC x (|src| * hC)` per image, 1024 x 21504 at the pascal
setting with the memory and 1024 x 82944 at coco. Plain autograd keeps four such maps per image
alive (the product, its normalisation, the softmax and the dropout output). `normalized_attention`
is one autograd function that:
- runs image by image, and within an image in row chunks (the softmax is row-wise), so its
  temporaries are chunk-sized; only the product of the image being processed is full-size;
- keeps the dropout masks as bools while they are small, and otherwise regenerates them in
  backward from a per-image seed;
- in backward, never materialises the full gradient map: the instance-norm correction terms
  `n k^T` and `q^T n` are rebuilt from the small N x N Gram matrices `k k^T` and `q^T q`;
- keeps the normalised maps of as many images as fit in `SAVED_MAPS_BUDGET_BYTES` for backward,
  and recomputes the others' products chunk by chunk in backward (one more matrix multiply each).
The keys and values are shared by all images (broadcast, never copied per image).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

INSTANCE_NORM_EPS = 1e-5
# Normalised maps kept for backward, at most this many bytes (whole images' maps); the maps of the
# other images are recomputed in backward (about 1/6 more matrix work for them, far less memory).
SAVED_MAPS_BUDGET_BYTES = 128 * 2**20
# Dropout masks kept for backward (as bools) while all of them fit in this many bytes; above it
# they are regenerated in backward from the per-image seed (one more random draw per map).
SAVED_MASKS_BUDGET_BYTES = 64 * 2**20
# Rows of a map processed at once: bounds the softmax/dropout/gradient temporaries.
CHUNK_BYTES = 32 * 2**20
_SEED_HIGH = 2**62


def _map_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norm and softmax run in float32 for half types, in the input's dtype otherwise."""
    return torch.promote_types(dtype, torch.float32)


def _row_chunks(rows: int, width: int) -> list[slice]:
    step = max(1, CHUNK_BYTES // (4 * width))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _keep_mask(like: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor | None:
    """Boolean keep mask (True with probability 1 - p) drawn from `generator`, or None without
    dropout. uniform_ + compare is about twice as fast as bernoulli_ on CPU."""
    if generator is None:
        return None
    return torch.empty_like(like).uniform_(generator=generator) < (1.0 - p)


def _normalize_(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place: scores -> (scores - mean) / std over the whole map; returns (map, mean, std).

    Two passes (mean, then the dot product of the centred map with itself): ten times faster than
    var_mean on CPU and as exact as centring allows."""
    mean = scores.mean()
    centred = scores.sub_(mean).flatten()
    std = torch.sqrt(torch.dot(centred, centred) / centred.numel() + INSTANCE_NORM_EPS)
    return scores.div_(std), mean, std


class _NormalizedAttention(torch.autograd.Function):
    """out[b] = dropout(softmax(IN(q[b] @ keys))) @ values^T for every image b (see module docstring)."""

    @staticmethod
    def forward(ctx, queries, keys, values, dropout_p: float, saved_maps_budget: int):
        # queries (B, R, N); keys, values (N, L); returns (B, R, N). Matmuls in the inputs' dtype
        # (bf16 under autocast), normalisation and softmax in float32 (float64 for float64 inputs).
        B, R, N = queries.shape
        map_dtype = _map_dtype(queries.dtype)
        seeds = [int(torch.randint(_SEED_HIGH, (1,)).item()) for _ in range(B)]
        out = queries.new_empty(B, R, N)
        saved, stats = [], []
        L = keys.shape[1]
        map_bytes = R * L * torch.finfo(map_dtype).bits // 8
        keep_masks = queries.new_empty((0,), dtype=torch.bool)  # empty: regenerate in backward
        if dropout_p > 0 and B * R * L <= SAVED_MASKS_BUDGET_BYTES:
            keep_masks = torch.empty(B, R, L, dtype=torch.bool, device=queries.device)
        for b in range(B):
            # (R, L): the one full-size temporary
            normed, mean, std = _normalize_((queries[b] @ keys).to(map_dtype))
            generator = _generator(queries.device, seeds[b]) if dropout_p > 0 else None
            for rows in _row_chunks(R, normed.shape[1]):
                probs = torch.softmax(normed[rows], dim=-1)
                keep = _keep_mask(probs, dropout_p, generator)
                if keep is not None:
                    probs.mul_(keep).div_(1.0 - dropout_p)
                    if keep_masks.numel():
                        keep_masks[b, rows] = keep
                out[b, rows] = probs.to(values.dtype) @ values.transpose(0, 1)
            stats.append(torch.stack([mean, std]))
            if (len(saved) + 1) * map_bytes <= saved_maps_budget:
                saved.append(normed)  # the first images' maps; the rest are recomputed in backward
        ctx.dropout_p, ctx.seeds = dropout_p, seeds
        ctx.save_for_backward(queries, keys, values, torch.stack(stats), keep_masks, *saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        queries, keys, values, stats, keep_masks, *saved = ctx.saved_tensors
        B, R, N = queries.shape
        dtype, map_dtype = queries.dtype, _map_dtype(queries.dtype)
        grad_out = grad_out.to(dtype)
        keys_t = keys.transpose(0, 1)
        grad_q = torch.empty(queries.shape, dtype=map_dtype, device=queries.device)
        grad_k = torch.zeros(keys.shape, dtype=map_dtype, device=keys.device)
        grad_v = torch.zeros(values.shape, dtype=map_dtype, device=values.device)
        keys_m = keys.to(map_dtype)
        key_gram, key_sums = keys_m @ keys_m.transpose(0, 1), keys_m.sum(1)  # (N, N), (N,)
        for b in range(B):
            mean, std = stats[b]
            query = queries[b]
            regenerate = ctx.dropout_p > 0 and not keep_masks.numel()
            generator = _generator(queries.device, ctx.seeds[b]) if regenerate else None
            sum_g = torch.zeros((), dtype=map_dtype, device=queries.device)
            sum_gn = torch.zeros((), dtype=map_dtype, device=queries.device)
            for rows in _row_chunks(R, keys.shape[1]):
                if b < len(saved):
                    normed = saved[b][rows]
                else:
                    normed = (query[rows] @ keys).to(map_dtype).sub_(mean).div_(std)
                probs = torch.softmax(normed, dim=-1)
                keep = keep_masks[b, rows] if keep_masks.numel() else _keep_mask(probs, ctx.dropout_p, generator)
                dropped = probs.clone() if keep is None else (probs * keep).div_(1.0 - ctx.dropout_p)
                grad_v += (grad_out[b, rows].transpose(0, 1) @ dropped.to(dtype)).to(map_dtype)
                # d(loss)/d(dropped probs), written over `dropped` (no longer needed): one chunk less.
                grad = torch.mm(grad_out[b, rows], values, out=dropped) if dtype == map_dtype else (
                    grad_out[b, rows] @ values).to(map_dtype)
                if keep is not None:
                    grad.mul_(keep).div_(1.0 - ctx.dropout_p)
                del keep
                # softmax backward: p * (g - <g, p>_row), row dots without a full-size temporary.
                grad.sub_(torch.bmm(grad.unsqueeze(1), probs.unsqueeze(2)).view(-1, 1)).mul_(probs)
                sum_g += grad.sum()
                sum_gn += torch.dot(grad.flatten(), normed.flatten())
                grad = grad.div_(std).to(dtype)
                grad_q[b, rows] = (grad @ keys_t).to(map_dtype)
                grad_k += (query[rows].transpose(0, 1) @ grad).to(map_dtype)
            # Instance-norm backward: d(z) = (g - mean(g) - n * mean(g * n)) / std. The g terms are
            # done above; the mean terms use n = (q k - mean) / std through the Gram matrices.
            numel = R * keys.shape[1]
            mean_g, mean_gn = sum_g / numel, sum_gn / numel
            query_m = query.to(map_dtype)
            query_sums = query_m.sum(0)  # (N,)
            n_kt = (query_m @ key_gram - mean * key_sums) / std  # n @ keys^T, (R, N)
            grad_q[b] -= (mean_g * key_sums + mean_gn * n_kt) / std
            q_t_n = ((query_m.transpose(0, 1) @ query_m) @ keys_m - mean * query_sums[:, None]) / std  # (N, L)
            grad_k -= (mean_g * query_sums[:, None] + mean_gn * q_t_n) / std
        return grad_q.to(dtype), grad_k.to(keys.dtype), grad_v.to(values.dtype), None, None


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
    saved_maps_budget: int | None = None,
) -> torch.Tensor:
    """Channel cross-attention with shared keys: (B, R, N) queries, (N, L) keys/values -> (B, R, N).

    `saved_maps_budget` bytes of normalised maps are kept for backward (default
    `SAVED_MAPS_BUDGET_BYTES`; 0 recomputes every map). Under autocast the products run in the
    autocast dtype (bf16/fp16), the norm and softmax in fp32.
    """
    dtype = _compute_dtype(queries.device)
    if dtype is not None:
        queries, keys, values = queries.to(dtype), keys.to(dtype), values.to(dtype)
    budget = SAVED_MAPS_BUDGET_BYTES if saved_maps_budget is None else saved_maps_budget
    with torch.autocast(queries.device.type, enabled=False):
        return _NormalizedAttention.apply(queries, keys, values, float(dropout_p), int(budget))


def normalized_attention_map(scores: torch.Tensor) -> torch.Tensor:
    """softmax_keys(InstanceNorm(scores)) for (..., R, L) maps, each map normalised on its own.

    Plain autograd: used for the small maps (unlabeled self-attention C x C per head, inference).
    """
    lead = scores.shape[:-2]
    flat = scores.to(_map_dtype(scores.dtype)).reshape(-1, 1, *scores.shape[-2:])
    normed = F.instance_norm(flat, eps=INSTANCE_NORM_EPS).reshape(*lead, *scores.shape[-2:])
    return torch.softmax(normed, dim=-1)
