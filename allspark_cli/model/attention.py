"""The labeled branch's attention, memory-frugal: the `frugal` path of `attention_paths.py`.

It computes what the plain formula there computes (DESIGN.md section 1, step 4; paper Eq. 3),
`o[b] = dropout(softmax_keys(InstanceNorm(q[b] k^T))) v` for query channels q (B, R, N) and
key/value channels k, v (L, N) shared by all images, and is tested against it. The map is large:
`hC x (|src| * hC)` per image, 1024 x 21504 at the pascal setting with the memory and 1024 x 82944
at coco. Plain autograd keeps four such maps per image alive (the product, its normalisation, the
softmax and the dropout output) and walks each of them several times. `normalized_attention` is one
autograd function built on three facts:
- the softmax is row-wise, so the mean of the instance norm cancels in it:
  `softmax(IN(s)) = softmax(s / std)`. The std comes from N x N Gram matrices (`map_statistics`,
  attention_maps.py) and `1/std` is folded into the queries, so each map is produced in row chunks
  straight into its final buffer by one product and an in-place softmax;
- the dropout decision of each entry is kept in the sign bit of the saved probabilities (negative:
  dropped), so one float map per image serves backward: `dropped = max(p, 0)`, `probs = |p|`;
- in backward the instance-norm terms need only `sum(grad * z)`, which is `<grad k, q>` (the
  mean-gradient term is zero because every softmax row sums to 1), and the `z k` and `q^T z`
  products come from the Gram matrices. No full gradient map ever exists.
Maps of as many images as fit in `SAVED_MAPS_BUDGET_BYTES` are kept (none when no backward can
run), each handed back once backward is done with its image; the others are recomputed in backward
(one more product each, with the dropout bits redrawn from a per-image seed). Maps and chunk buffers
come from a `ScratchPool` (`scratch.py`) that the caller may keep from one step to the next, so that
they do not page-fault anew in every step.
Dropout bits are 15-bit words cut from 64-bit draws (four entries per draw, several times cheaper
than `uniform_` on CPU), so the drop probability is quantised to 1/32768 (0.1 -> 0.100006); the
kept entries are scaled by the exact 1 / (1 - quantised p).
The keys and values are shared by all images (broadcast, never copied per image); they come as
(L, N) rows, which the map products read in row blocks (`products.py`).
Under autocast (bf16/fp16) the maps and their gradients are stored in the autocast dtype: plain
autocast rounds the probabilities to that dtype before the product and returns the map gradient
of a half-precision product in it as well, so this keeps its precision (tested against float64)
at half the memory traffic of float32 maps. The softmax itself computes in float32 internally.
"""
from __future__ import annotations

import torch

from allspark_cli.model.attention_maps import float32_or_wider, map_statistics
from allspark_cli.model.products import add_product_, addmm_nt_, matmul_nt, matmul_nt_into
from allspark_cli.model.scratch import ScratchPool

# Probability maps kept for backward, at most this many bytes (whole images' maps); the maps of
# the other images are recomputed in backward (one more product each, about 1/6 more matrix work
# for that image). 660 MiB keeps both float32 maps of a batch of 2 up to coco's width (81 x hC =
# 648 MiB) and one at pascal with a 4x C memory (84 x hC = 672 MiB), so that setting stays under
# the reference's 1x C peak.
SAVED_MAPS_BUDGET_BYTES = 660 * 2**20
# Rows of a map processed at once: bounds each chunk-sized work buffer (a few are alive at once).
CHUNK_BYTES = 48 * 2**20
# Fewer rows than this make the products with the wide keys/values inefficient (each product
# streams the whole N x L operand for few rows): measured 42-119 GFLOP/s at 147 rows x L = 82944
# against 130-150 at 256-512.
MIN_CHUNK_ROWS = 256
# Row blocks of the centred keys for their Gram matrix: a whole centred copy of the keys would be
# one more (L, N) buffer (25 MB at pascal, 96 MB at coco).
CENTRED_BLOCK_BYTES = 8 * 2**20
DROPOUT_BITS = 15  # bits of a random word per dropout decision (the top bit of a draw is not random)
_WORDS_PER_DRAW = 4  # 16-bit words in one 64-bit draw
DRAWS_PER_PIECE = 2**20  # random draws buffered at once (8 MiB), not a whole chunk's worth
_SEED_HIGH = 2**62


def _row_chunks(rows: int, width: int) -> list[slice]:
    """Equal row chunks of about CHUNK_BYTES (float32) each but at least MIN_CHUNK_ROWS rows: a
    short chunk runs its products at a poorer rate (each product streams all of the keys)."""
    count = max(1, min(-(-rows * width * 4 // CHUNK_BYTES), rows // MIN_CHUNK_ROWS))
    step = -(-rows // count)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def quantized_dropout(p: float) -> tuple[int, float]:
    """(threshold on a DROPOUT_BITS-bit word, effective drop probability) for drop probability p."""
    threshold = min(round(p * 2**DROPOUT_BITS), 2**DROPOUT_BITS - 1)  # never drop everything
    return threshold, threshold / 2**DROPOUT_BITS


def _generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _drop_signs(generator: torch.Generator, threshold: int, draws: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Fills the flat float `out` with >= 0 (keep) or < 0 (drop, probability threshold / 2**bits),
    piece by piece through the int64 buffer `draws` (the same pieces in forward and backward)."""
    piece = draws.numel() * _WORDS_PER_DRAW
    for start in range(0, out.numel(), piece):
        target = out[start : start + piece]
        count = target.numel()
        words = draws[: -(-count // _WORDS_PER_DRAW)].random_(generator=generator).view(torch.int16)[:count]
        words.bitwise_and_(2**DROPOUT_BITS - 1).sub_(threshold)
        target.copy_(words)
    return out


def _softmax_rows_(scores: torch.Tensor) -> torch.Tensor:
    if scores.device.type == "cpu":  # the CPU kernel reads every row before writing it
        return torch.softmax(scores, dim=-1, out=scores)
    return scores.copy_(torch.softmax(scores, dim=-1))


class _Workspace:
    """Chunk-sized buffers taken from a `ScratchPool` on first use and reused by every chunk and
    image: a fresh large allocation is served by mmap and page-faults on first touch, which costs as
    much as the elementwise work itself. A buffer of a path not taken (`signed` when every map is
    kept) is never taken.

    Maps, their softmax and the map gradients are in the product dtype (bf16 under autocast); the key
    and value gradients are summed in `total_dtype` (float32 for half types), each half-precision
    product passing through `part` (N x L)."""

    def __init__(
        self, pool: ScratchPool, rows: int, width: int, tokens: int, dtype: torch.dtype, total_dtype: torch.dtype, device
    ):
        self.pool, self.width, self.device, self.narrow_totals = pool, width, device, dtype != total_dtype
        draws = min(DRAWS_PER_PIECE, -(-rows * width // _WORDS_PER_DRAW))
        self._sizes = {"signed": (rows * width, dtype), "dropped": (rows * width, dtype), "grad": (rows * width, dtype),
                       "draws": (draws, torch.int64), "part": (tokens * width, dtype)}
        self._taken: dict[str, torch.Tensor] = {}

    def buffer(self, name: str) -> torch.Tensor:
        """The flat buffer `name` (signed, dropped, grad: one chunk; draws; part), taken on first use."""
        if name not in self._taken:
            numel, dtype = self._sizes[name]
            self._taken[name] = self.pool.take(numel, dtype, self.device)
        return self._taken[name]

    def view(self, name: str, rows: int) -> torch.Tensor:
        return self.buffer(name)[: rows * self.width].view(rows, self.width)

    def release(self) -> None:
        """Hands every buffer back to the pool; the workspace is unusable afterwards."""
        self.pool.give(*self._taken.values())
        self._taken = {}

    def accumulate(
        self, total: torch.Tensor, left: torch.Tensor, right: torch.Tensor, *, alpha: float = 1.0, first: bool = False
    ) -> None:
        """total ((N, L), total dtype) += alpha * left @ right^T for right (L, K), in place; the
        `first` product overwrites whatever `total` held (no zero fill, no addition)."""
        if not self.narrow_totals:
            addmm_nt_(total, left, right, alpha=alpha, overwrite=first)
            return
        product = matmul_nt_into(left, right, self.buffer("part")[: total.numel()].view(total.shape))
        add_product_(total, product, alpha=alpha, overwrite=first)

    def signed_probs(
        self, scaled_queries: torch.Tensor, keys: torch.Tensor, out: torch.Tensor, generator, threshold: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """softmax rows of (q / std) k^T into `out` (R_c, L), negated where dropout drops the entry;
        returns (signed probs, dropped probs); the dropped ones live in the `dropped` buffer."""
        _softmax_rows_(matmul_nt_into(scaled_queries, keys, out))
        if generator is None:
            return out, out
        dropped = self.view("dropped", out.shape[0])
        out.copysign_(_drop_signs(generator, threshold, self.buffer("draws"), dropped.view(-1)).view_as(out))
        return out, torch.clamp(out, min=0, out=dropped)

    def dropped_probs(self, signed: torch.Tensor) -> torch.Tensor:
        return torch.clamp(signed, min=0, out=self.view("dropped", signed.shape[0]))


def _project(pool: ScratchPool, weight: torch.Tensor, sources: torch.Tensor, tokens: int) -> torch.Tensor:
    """Channels of the sources through a bias-free projection: weight (hC, C), sources (M * N, C)
    (source-major tokens) -> (hC * M, N), channel-major (row c * M + m: projected channel c of
    source m), in a buffer from the pool. The attention does not depend on the order of the
    channels (keys and values share it); this one is a single product whose output is already the
    (L, N) row layout that the map products read."""
    out = pool.take(weight.shape[0] * sources.shape[0], weight.dtype, weight.device)
    return matmul_nt_into(weight, sources, out.view(weight.shape[0], sources.shape[0])).view(-1, tokens)


def _projection_gradients(
    pool: ScratchPool, grad_keys: torch.Tensor, grad_values: torch.Tensor, sources, key_weight, value_weight, needs
):
    """Gradients of the sources and both weights from the key/value gradients, given (N, L) as they
    are summed (see `_project` for the channel order); `needs` = needs_input_grad of (sources,
    key_weight, value_weight)."""
    N = grad_keys.shape[0]
    hC, P = key_weight.shape[0], sources.shape[0]  # key_weight: (hC, C)
    # One (hC, M * N) buffer, keys then values: it fits in a map buffer handed back by then.
    layout = pool.take(hC * P, sources.dtype, sources.device).view(hC, P // N, N)
    grad_sources, grad_weights = None, []
    for total, weight, need_weight in zip((grad_keys, grad_values), (key_weight, value_weight), needs[1:]):
        layout.copy_(total.view(N, hC, P // N).permute(1, 2, 0))  # (N, hC * M) -> (hC, M, N)
        flat = layout.view(hC, P)
        grad_weights.append(flat @ sources if need_weight else None)
        if needs[0]:
            part = flat.transpose(0, 1) @ weight  # (P, C)
            grad_sources = part if grad_sources is None else grad_sources.add_(part)
    pool.give(layout)
    return grad_sources, *grad_weights


class _NormalizedAttention(torch.autograd.Function):
    """out[b] = dropout(softmax(IN(q[b] @ keys^T))) @ values for every image b (see module docstring).

    Keys and values come either as tensors or as projections of source tokens (`sources`,
    `key_weight`, `value_weight`), which are then computed here, in pooled buffers, and whose
    weight and source gradients are computed here too: the (L, N) key/value gradients never leave
    the function, so their buffers are reused from step to step as well."""

    @staticmethod
    def forward(
        ctx, queries, keys, values, sources, key_weight, value_weight, dropout_p: float, saved_maps_budget: int,
        scratch: ScratchPool | None,
    ):
        # queries (B, R, N); keys, values (L, N) or None; sources (M * N, C) and weights (hC, C) or None;
        # returns (B, R, N). Products and maps in the inputs' dtype (bf16 under autocast), statistics
        # and gradient sums in float32 (or float64).
        B, R, N = queries.shape
        dtype, wide, device = queries.dtype, float32_or_wider(queries.dtype), queries.device
        pool = ScratchPool() if scratch is None else scratch
        projected = sources is not None
        if projected:
            keys, values = (_project(pool, weight, sources, N) for weight in (key_weight, value_weight))
        else:
            keys, values = keys.contiguous(), values.contiguous()  # row blocks of the keys feed the products
        L = keys.shape[0]
        wide_queries = queries.to(wide)
        centred = pool.take(max(N, CENTRED_BLOCK_BYTES * 8 // torch.finfo(wide).bits), wide, device)
        stats = map_statistics(wide_queries, keys, centred=centred)
        pool.give(centred)
        # softmax(IN(q k^T)) = softmax(q k^T / std): the mean shifts every row equally.
        scaled = (wide_queries / stats.std[:, None, None]).to(dtype)
        threshold, drop_p = quantized_dropout(dropout_p)
        seeds = [int(torch.randint(_SEED_HIGH, (1,)).item()) for _ in range(B)] if drop_p > 0 else []
        map_bytes = R * L * torch.finfo(dtype).bits // 8
        kept = min(B, saved_maps_budget // map_bytes)
        maps = [pool.take(R * L, dtype, device).view(R, L) for _ in range(kept)]
        chunks = _row_chunks(R, L)
        work = _Workspace(pool, chunks[0].stop, L, N, dtype, wide, device)
        out = queries.new_empty(B, R, N)
        for b in range(B):
            generator = _generator(device, seeds[b]) if seeds else None
            for rows in chunks:
                count = rows.stop - rows.start
                target = maps[b][rows] if b < kept else work.view("signed", count)
                _, dropped = work.signed_probs(scaled[b, rows], keys, target, generator, threshold)
                out[b, rows] = matmul_nt(dropped, values.transpose(0, 1))
        work.release()
        if seeds:
            out.div_(1.0 - drop_p)
        ctx.drop = (threshold, drop_p, seeds)
        ctx.scratch = scratch
        # The kept maps (and projected keys/values) live on ctx, not in save_for_backward, so that
        # backward can hand each back to the pool as soon as it is done with it. A second backward
        # (retain_graph) finds none and recomputes them.
        ctx.kept_maps = maps
        ctx.projected = (keys, values) if projected else ()
        if projected:
            keys = values = None
        ctx.save_for_backward(queries, scaled, keys, values, sources, key_weight, value_weight, out, *stats)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        queries, scaled, keys, values, sources, key_weight, value_weight, out, *statistics = ctx.saved_tensors
        mean, std, key_gram, key_sums, query_grams = statistics
        maps, ctx.kept_maps = ctx.kept_maps, []
        threshold, drop_p, seeds = ctx.drop
        B, R, N = queries.shape
        dtype, wide, device = queries.dtype, float32_or_wider(queries.dtype), queries.device
        pool = ScratchPool() if ctx.scratch is None else ctx.scratch
        if sources is not None:
            keys, values = ctx.projected or (_project(pool, weight, sources, N) for weight in (key_weight, value_weight))
            ctx.projected = ()
        L = keys.shape[0]
        # c = <upstream, dropped v> per row = <grad_out, out>: the 1/(1-p) of upstream and of out cancel.
        grad_out = grad_out.to(wide)
        row_sums = (grad_out * out.to(wide)).sum(-1).to(dtype)  # (B, R)
        grad_out = (grad_out / (1.0 - drop_p)).to(dtype)  # the forward's 1/(1-p)
        grad_q = torch.empty(queries.shape, dtype=wide, device=device)
        # Key/value gradients are accumulated as (N, L): rows of N x R_c by R_c x L products.
        grad_k, grad_v = (pool.take(N * L, wide, device).view(N, L) for _ in range(2))
        chunks = _row_chunks(R, L)
        work = _Workspace(pool, chunks[0].stop, L, N, dtype, wide, device)
        # The instance-norm terms of grad_k, summed over images and applied once at the end.
        gram_coef = torch.zeros(N, N, dtype=wide, device=device)
        sums_coef = torch.zeros(N, dtype=wide, device=device)
        for b in range(B):
            generator = _generator(device, seeds[b]) if seeds else None
            for rows in chunks:
                count = rows.stop - rows.start
                if b < len(maps):
                    signed = maps[b][rows]
                    dropped = work.dropped_probs(signed) if seeds else signed
                else:
                    target = work.view("signed", count)
                    signed, dropped = work.signed_probs(scaled[b, rows], keys, target, generator, threshold)
                upstream = grad_out[b, rows]  # (R_c, N)
                first = b == 0 and rows.start == 0
                work.accumulate(grad_v, upstream.transpose(0, 1), dropped.transpose(0, 1), first=first)
                # g = d(loss)/d(dropped) = upstream v^T; softmax backward on the kept entries:
                # grad_z = dropped * g - c * probs with c = <g, dropped>_row = <upstream, dropped v>_row
                # (precomputed from the forward's output), and with signed probs
                # |signed| = 2 dropped - signed, so grad_z = dropped * (g - 2c) + c * signed.
                grad = matmul_nt_into(upstream, values, work.view("grad", count))
                row_dots = row_sums[b, rows, None]
                if seeds:
                    grad.sub_(2 * row_dots).mul_(dropped).addcmul_(signed, row_dots)
                else:
                    grad.sub_(row_dots).mul_(signed)
                grad_q[b, rows] = matmul_nt(grad, keys.transpose(0, 1))  # grad_z k; norm terms below
                # q^T grad_z / std
                work.accumulate(grad_k, scaled[b, rows].transpose(0, 1), grad.transpose(0, 1), first=first)
            if b < len(maps):
                pool.give(maps[b])  # reusable for the weight-gradient re-layout below and next step
                signed = dropped = maps[b] = None
            # Instance norm: d(s) = (grad_z - z * mean(grad_z * z)) / std (mean(grad_z) = 0), with
            # sum(grad_z * z) = <grad_z k, q> / std and z k = (q k^T k - mean 1 (k^T 1)^T) / std.
            query = queries[b].to(wide)
            grad_z_k = grad_q[b]
            mean_gz = (grad_z_k * query).sum() / (std[b] * R * L)
            z_k = (query @ key_gram - mean[b] * key_sums) / std[b]
            grad_q[b] = (grad_z_k - mean_gz * z_k) / std[b]
            # q^T z = (q^T q k^T - mean (q^T 1) 1^T) / std, accumulated for one product at the end.
            coef = mean_gz / std[b] ** 2
            gram_coef += coef * query_grams[b]
            sums_coef += coef * mean[b] * query.sum(0)
        work.accumulate(grad_k, gram_coef.to(dtype), keys, alpha=-1.0)
        work.release()
        grad_k += sums_coef[:, None]
        if sources is None:  # the (N, L) sums leave as (L, N) views; they are not pooled
            grads_kv = tuple(total.transpose(0, 1).to(dtype) for total in (grad_k, grad_v))
            return grad_q.to(dtype), *grads_kv, None, None, None, None, None, None
        pool.give(keys, values)
        needs = ctx.needs_input_grad[3:6]
        grads = _projection_gradients(pool, grad_k, grad_v, sources, key_weight, value_weight, needs)
        pool.give(grad_k, grad_v)
        return grad_q.to(dtype), None, None, *grads, None, None, None


def _compute_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _maps_budget(saved_maps_budget: int | None, inputs: tuple[torch.Tensor, ...]) -> int:
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
        return 0  # no backward will run: keep no maps (ctx.needs_input_grad ignores no_grad)
    return SAVED_MAPS_BUDGET_BYTES if saved_maps_budget is None else int(saved_maps_budget)


def normalized_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    dropout_p: float = 0.0,
    saved_maps_budget: int | None = None,
    scratch: ScratchPool | None = None,
) -> torch.Tensor:
    """Channel cross-attention with shared keys: (B, R, N) query channels, (L, N) key/value channels
    -> (B, R, N): `dropout(softmax_rows(InstanceNorm(q[b] k^T))) v` for every image b.

    `saved_maps_budget` bytes of probability maps are kept for backward (default
    `SAVED_MAPS_BUDGET_BYTES`; 0 recomputes every map). The maps and chunk buffers are taken from
    `scratch` and given back to it when done with (a fresh pool per call when None). Under autocast
    the products run in the autocast dtype (bf16/fp16) and the maps are kept in it; the
    statistics, the softmax's arithmetic and the key/value/query gradient sums run in fp32.
    """
    dtype = _compute_dtype(queries.device)
    if dtype is not None:
        queries, keys, values = queries.to(dtype), keys.to(dtype), values.to(dtype)
    budget = _maps_budget(saved_maps_budget, (queries, keys, values))
    with torch.autocast(queries.device.type, enabled=False):
        return _NormalizedAttention.apply(queries, keys, values, None, None, None, float(dropout_p), budget, scratch)


def projected_attention(
    queries: torch.Tensor,
    sources: torch.Tensor,
    key_weight: torch.Tensor,
    value_weight: torch.Tensor,
    *,
    dropout_p: float = 0.0,
    saved_maps_budget: int | None = None,
    scratch: ScratchPool | None = None,
) -> torch.Tensor:
    """`normalized_attention` with keys and values projected from source tokens inside: queries
    (B, R, N), sources (M, N, C), key_weight and value_weight (hC, C) -> (B, R, N). The key/value
    channels are `weight @ sources[m]^T` for every source m (L = hC * M of them, order as in
    `_project`). Keeping the projections inside lets the (L, N) keys, values and their gradients
    live in `scratch` buffers too; the result and all gradients equal `normalized_attention` on the
    projected channels."""
    M, N, C = sources.shape
    dtype = _compute_dtype(queries.device)
    if dtype is not None:
        queries, sources = queries.to(dtype), sources.to(dtype)
        key_weight, value_weight = key_weight.to(dtype), value_weight.to(dtype)
    flat = sources.reshape(M * N, C).contiguous()
    budget = _maps_budget(saved_maps_budget, (queries, flat, key_weight, value_weight))
    with torch.autocast(queries.device.type, enabled=False):
        return _NormalizedAttention.apply(
            queries, None, None, flat, key_weight, value_weight, float(dropout_p), budget, scratch
        )
