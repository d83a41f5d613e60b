"""The labeled branch's attention: its formula, and two faster ways to the same values (DESIGN.md
section 1, step 4; paper Eq. 3).

For query channels q (B, R, N) and key/value channels k, v (L, N) shared by all B images,
`o[b] = dropout(softmax_keys(InstanceNorm(q[b] k^T))) v`. `labeled_attention` is shaped like timm's
`Attention.forward`: the plain lines at its end are that formula in autograd, the specification
every other path is tested against, and the two branches above them take a faster way:
- `sdpa`: `F.scaled_dot_product_attention`. The softmax is row-wise, so the instance norm's mean
  cancels in it: `softmax(IN(s)) = softmax(s / std)`, with the std of each map from N x N Gram
  matrices (`map_statistics`) and folded into the queries; the fused kernels then never form the
  map. The token axis N is their head size: it is padded with zeros to a multiple of
  `SDPA_HEAD_MULTIPLE` (zeros change neither q k^T nor the kept columns of o).
- `frugal`: `attention.projected_attention`, the custom autograd function that keeps one float map
  per image at most (dropout bits in its sign), recomputes the others in backward, and reuses its
  buffers between steps (`scratch.py`) and runs its float32 CPU products through oneDNN
  (`products.py`). The CPU default (tuned for it), and the CUDA fallback for maps that do not fit
  (wide memories, coco, small GPUs), its saved-map budget taken from the device's free memory.
`auto` (`choose_path`) is resolved once per model (`ChannelCrossAttention.settle_path`), not per
call: the paths draw their dropout masks differently, so a path that changed between steps would
change the random stream a run consumes. The frugal function's saved-map budget may change from
call to call: it decides which maps are recomputed, never their values or their dropout bits.

Dropout: each path draws its own masks (the frugal function redraws its bits from per-image seeds in
backward and quantises p to 1/32768; the others use torch's dropout), so the paths agree in value
and gradient for the same mask only in distribution: same mean, same variance (tested).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from allspark_cli.constants import AttentionPath, ChosenAttentionPath
from allspark_cli.model.attention import SAVED_MAPS_BUDGET_BYTES, projected_attention
from allspark_cli.model.attention_maps import float32_or_wider, map_statistics, normalized_attention_map
from allspark_cli.model.scratch import ScratchPool

FLOAT32_BYTES = 4
# Float32 maps alive per image on the eager path while its backward is pending: the product (kept by
# the instance norm), the softmax (kept by its backward), the dropout output (kept by the value
# product), its mask (1 byte per entry) and the transient normalised map of the forward: 4.25,
# rounded up to leave room for the allocator's fragmentation.
EAGER_MAPS_PER_IMAGE = 5
# Share of the free device memory that the eager maps may take: the rest of the step (the head's
# activations after the module, the gradients of backward) still has to fit beside them.
EAGER_FREE_MEMORY_SHARE = 0.5
# Share of the free device memory that the frugal function may keep as saved maps on CUDA (on CPU its
# own SAVED_MAPS_BUDGET_BYTES, sized for the development machine's RAM).
FRUGAL_FREE_MEMORY_SHARE = 0.25
# Head sizes of the fused attention kernels: multiples of 8 elements (16-byte aligned rows in half
# precision); the token axis N is padded to it.
SDPA_HEAD_MULTIPLE = 8


def eager_map_bytes(images: int, rows: int, keys: int) -> int:
    """Device memory the eager path needs for `images` maps of rows x keys (see EAGER_MAPS_PER_IMAGE)."""
    return images * rows * keys * FLOAT32_BYTES * EAGER_MAPS_PER_IMAGE


def choose_path(
    requested: AttentionPath, device_type: str, *, images: int, rows: int, keys: int, free_bytes: int
) -> ChosenAttentionPath:
    """The path for maps of images x rows x keys: `requested` unless it is `auto`; then CPU -> frugal
    (tuned for CPU), CUDA -> eager when its maps fit in EAGER_FREE_MEMORY_SHARE of `free_bytes`,
    else frugal."""
    if requested != "auto":
        return requested
    if device_type != "cuda":
        return "frugal"
    fits = eager_map_bytes(images, rows, keys) <= EAGER_FREE_MEMORY_SHARE * free_bytes
    return "eager" if fits else "frugal"


def frugal_budget(device_type: str, free_bytes: int) -> int:
    """Bytes of probability maps the frugal function keeps for backward on this device."""
    if device_type != "cuda":
        return SAVED_MAPS_BUDGET_BYTES
    return int(FRUGAL_FREE_MEMORY_SHARE * free_bytes)


def free_device_memory(device: torch.device) -> int:
    """Bytes a new tensor on `device` can still take: on CUDA the driver's free memory plus the
    blocks torch's caching allocator holds unused; 0 elsewhere (the CPU rules ignore it)."""
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def project_channels(weight: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """Key or value channels of the sources: weight (hC, C), sources (M, N, C) -> (M * hC, N),
    source-major (row m * hC + c: projected channel c of source m). The attention does not depend on
    the order of the channels as long as keys and values share it."""
    M, N, C = sources.shape
    return F.linear(sources, weight).transpose(1, 2).reshape(M * weight.shape[0], N)


def map_std(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Std (biased, eps included) of every map q[b] k^T without forming it (`map_statistics`):
    queries (B, R, N), keys (L, N) -> (B,), float32 or wider, differentiable."""
    wide = float32_or_wider(queries.dtype)
    with torch.autocast(queries.device.type, enabled=False):
        return map_statistics(queries.to(wide), keys.to(wide)).std


def sdpa_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, dropout_p: float = 0.0
) -> torch.Tensor:
    """The formula of `labeled_attention` through F.scaled_dot_product_attention (see the module
    docstring), on channels already projected: queries (B, R, N), keys and values (L, N) -> (B, R, N)."""
    B, R, N = queries.shape
    L = keys.shape[0]
    scaled = queries / map_std(queries, keys)[:, None, None]  # softmax(IN(s)) = softmax(s / std)
    pad = (0, -N % SDPA_HEAD_MULTIPLE)  # zero tokens at the end of the head axis
    scaled, keys, values = (F.pad(t, pad) for t in (scaled.to(queries.dtype), keys, values))
    width = N + pad[1]
    # One head per image; the shared keys/values are expanded (stride 0), not copied.
    mixed = F.scaled_dot_product_attention(
        scaled.unsqueeze(1), keys.expand(B, 1, L, width), values.expand(B, 1, L, width),
        dropout_p=dropout_p, scale=1.0,
    )  # (B, 1, R, N + pad)
    return mixed[:, 0, :, :N]


def labeled_attention(
    queries: torch.Tensor,
    sources: torch.Tensor,
    key_weight: torch.Tensor,
    value_weight: torch.Tensor,
    *,
    path: ChosenAttentionPath = "eager",
    dropout_p: float = 0.0,
    scratch: ScratchPool | None = None,
) -> torch.Tensor:
    """dropout(softmax_keys(IN(q[b] k^T))) v for every image b: queries (B, R, N), sources (M, N, C),
    key/value weights (R, C) -> (B, R, N); k, v (M * R, N) are the sources' projected channels.

    `path` changes how, not what (module docstring); `scratch` keeps the frugal function's CPU
    buffers from one call to the next. Under autocast the products run in its dtype, the norm and
    softmax in fp32."""
    if path == "frugal":  # keys and values projected inside, where their buffers are reused too
        budget = frugal_budget(queries.device.type, free_device_memory(queries.device))
        return projected_attention(queries, sources, key_weight, value_weight, dropout_p=dropout_p,
                                   saved_maps_budget=budget, scratch=scratch)
    keys, values = project_channels(key_weight, sources), project_channels(value_weight, sources)  # (L, N)
    if path == "sdpa":
        return sdpa_attention(queries, keys, values, dropout_p=dropout_p)
    scores = queries @ keys.transpose(0, 1)  # (B, R, L): the keys broadcast to every image, no copy
    attention = normalized_attention_map(scores)  # IN over each image's whole map, softmax over keys
    attention = F.dropout(attention, dropout_p) if dropout_p > 0 else attention
    return attention.to(values.dtype) @ values  # (B, R, N)
