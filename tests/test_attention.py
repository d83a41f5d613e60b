"""The memory-lean attention function equals plain autograd (values and gradients)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from allspark_cli.model import attention
from allspark_cli.model.attention import normalized_attention, projected_attention
from allspark_cli.model.scratch import ScratchPool


def _plain(queries, keys, values):
    """queries (B, R, N), keys and values (L, N)."""
    scores = (queries @ keys.transpose(0, 1)).unsqueeze(1)  # (B, 1, R, L)
    attention = torch.softmax(F.instance_norm(scores, eps=1e-5).squeeze(1), dim=-1)
    return attention @ values


@pytest.mark.parametrize("saved_maps_budget", [0, 8 * 16 * 8, 2**30])
@pytest.mark.parametrize("rows_per_chunk", [3, None])
def test_values_and_gradients_match_plain_autograd(saved_maps_budget, rows_per_chunk, monkeypatch):
    """Budgets: recompute every map, keep one image's map (float64 8 x 16), keep all."""
    if rows_per_chunk is not None:  # several row chunks per map (the large-map path)
        monkeypatch.setattr(attention, "CHUNK_BYTES", 4 * 16 * rows_per_chunk)
        monkeypatch.setattr(attention, "MIN_CHUNK_ROWS", 1)
        monkeypatch.setattr(attention, "CENTRED_BLOCK_BYTES", 8 * 5 * 3)  # centred keys in blocks of 3 rows
    torch.manual_seed(0)
    q = torch.randn(3, 8, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(16, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(16, 5, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 8, 5, dtype=torch.float64)
    ours = normalized_attention(q, k, v, saved_maps_budget=saved_maps_budget)
    grads_ours = torch.autograd.grad(ours, (q, k, v), grad)
    plain = _plain(q, k, v)
    grads_plain = torch.autograd.grad(plain, (q, k, v), grad)
    torch.testing.assert_close(ours, plain)
    for a, b in zip(grads_ours, grads_plain):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("saved_maps_budget", [0, 2**30])
@pytest.mark.parametrize("rows_per_chunk", [3, None])
def test_dropout_mask_is_the_same_in_forward_and_backward(saved_maps_budget, rows_per_chunk, monkeypatch):
    """With dropout the gradient must be that of the forward's own mask: check against finite differences
    of a function whose mask is fixed by re-seeding torch before every evaluation. Masks either kept
    (in the saved maps) or redrawn from their seed in backward, in one or several chunks."""
    if rows_per_chunk is not None:
        monkeypatch.setattr(attention, "CHUNK_BYTES", 4 * 8 * rows_per_chunk)
        monkeypatch.setattr(attention, "MIN_CHUNK_ROWS", 1)
        monkeypatch.setattr(attention, "DRAWS_PER_PIECE", 3)  # random bits drawn in several pieces
    torch.manual_seed(0)
    q = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 7, 3, dtype=torch.float64)

    def run(queries, keys, values):
        torch.manual_seed(123)  # the same seeds, so the same masks, in every evaluation
        out = normalized_attention(queries, keys, values, dropout_p=0.5, saved_maps_budget=saved_maps_budget)
        return (out * weights).sum()

    assert torch.autograd.gradcheck(run, (q, k, v), eps=1e-6, atol=1e-5)


def test_dropout_drops_the_quantised_fraction_and_keeps_the_mean():
    """About p of the entries are dropped (p quantised to 1/32768), kept ones scaled by 1/(1-p):
    the output's expectation over masks is the dropout-free output."""
    threshold, effective = attention.quantized_dropout(0.1)
    assert threshold == 3277 and abs(effective - 0.1) < 1e-5
    torch.manual_seed(0)
    q, k = torch.randn(1, 64, 4), torch.randn(512, 4)
    ones = torch.ones(512, 4)
    # With values of ones, each output entry is the kept probability mass of its row / (1 - p).
    outs = torch.stack([normalized_attention(q, k, ones, dropout_p=0.1) for _ in range(40)])
    assert abs(outs.mean().item() - 1.0) < 2e-3
    # An all-equal map (zero queries): every row is 1/512 per entry, so the kept fraction is exact.
    flat = normalized_attention(torch.zeros(1, 64, 4), k, ones, dropout_p=0.1)
    kept_fraction = (flat * (1 - effective)).mean().item()
    assert abs(kept_fraction - 0.9) < 5e-3


def test_bf16_autocast_runs_and_returns_the_autocast_dtype():
    q = torch.randn(2, 8, 5, requires_grad=True)
    k = torch.randn(16, 5, requires_grad=True)
    v = torch.randn(16, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = normalized_attention(q, k, v, dropout_p=0.1)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and k.grad.dtype == torch.float32


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_float32_path_matches_float64(dropout_p):
    """The float32 path (oneDNN/MKL products, in-place softmax, buffers reused across chunks) agrees
    with the float64 computation of the same masks."""
    torch.manual_seed(0)
    q = torch.randn(2, 300, 17, dtype=torch.float64, requires_grad=True)
    k = torch.randn(640, 17, dtype=torch.float64, requires_grad=True)
    v = torch.randn(640, 17, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 300, 17, dtype=torch.float64)
    results = []
    for dtype in (torch.float64, torch.float32):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        torch.manual_seed(7)  # the same dropout masks for both dtypes
        out = normalized_attention(*inputs, dropout_p=dropout_p)
        results.append([out, *torch.autograd.grad(out, inputs, grad.to(dtype))])
    for exact, single in zip(*results):
        torch.testing.assert_close(single.double(), exact, rtol=1e-4, atol=1e-5)


def test_second_backward_recomputes_the_freed_maps():
    """Backward frees the kept maps as it goes; a retained graph's second backward recomputes them
    (same dropout masks) and gives the same gradients."""
    torch.manual_seed(0)
    q = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    out = normalized_attention(q, k, v, dropout_p=0.3)
    first = torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
    second = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)


def test_no_maps_are_kept_when_no_backward_can_run(monkeypatch):
    """Under no_grad (or without inputs that need grad) the function keeps no maps: up to
    SAVED_MAPS_BUDGET_BYTES would otherwise be allocated for nothing."""
    budgets = []
    original = attention._NormalizedAttention.apply

    def spy(queries, keys, values, sources, key_weight, value_weight, dropout_p, budget, scratch):
        budgets.append(budget)
        return original(queries, keys, values, sources, key_weight, value_weight, dropout_p, budget, scratch)

    monkeypatch.setattr(attention._NormalizedAttention, "apply", spy)
    q = torch.randn(1, 4, 3, requires_grad=True)
    k, v = torch.randn(8, 3), torch.randn(8, 3)
    with torch.no_grad():
        normalized_attention(q, k, v)
    normalized_attention(q.detach(), k, v)
    normalized_attention(q, k, v)
    assert budgets == [0, 0, attention.SAVED_MAPS_BUDGET_BYTES]


def test_dropout_probability_near_one_never_drops_everything():
    threshold, effective = attention.quantized_dropout(0.99999)
    assert threshold == 2**attention.DROPOUT_BITS - 1 and effective < 1.0


def test_bf16_autocast_is_about_as_accurate_as_plain_autocast():
    """Under bf16 autocast the maps are kept in bf16 (plain autocast rounds the probabilities to bf16
    before the product too): output and gradients stay within 2x plain autocast's error against float64."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 96, 17), torch.randn(384, 17), torch.randn(384, 17)
    grad = torch.randn(2, 96, 17)

    def run(function, dtype=torch.float32, autocast=False):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = function(*inputs)
        return [out.double(), *(g.double() for g in torch.autograd.grad(out, inputs, grad.to(out.dtype)))]

    exact = run(_plain, torch.float64)
    plain = run(_plain, autocast=True)
    ours = run(normalized_attention, autocast=True)
    for name, truth, theirs, mine in zip(("out", "grad q", "grad k", "grad v"), exact, plain, ours):
        plain_error = ((theirs - truth).norm() / truth.norm()).item()
        our_error = ((mine - truth).norm() / truth.norm()).item()
        assert our_error <= 2 * plain_error + 1e-3, (name, our_error, plain_error)


def _projected_plain(queries, sources, key_weight, value_weight):
    """Keys and values projected by plain autograd, channel-major (row c * M + m)."""
    M, N, C = sources.shape
    keys, values = (weight @ sources.reshape(M * N, C).T for weight in (key_weight, value_weight))  # (hC, M*N)
    return _plain(queries, keys.reshape(-1, N), values.reshape(-1, N))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_projected_attention_matches_plain_projection_and_attention(dtype):
    """Keys/values projected inside: output and the gradients of queries, sources and both weights
    equal plain autograd through the projections (float32: oneDNN/MKL products and blocks)."""
    torch.manual_seed(0)
    tensors = [torch.randn(2, 12, 6), torch.randn(3, 6, 5), torch.randn(12, 5) / 3, torch.randn(12, 5) / 3]
    grad = torch.randn(2, 12, 6, dtype=dtype)
    results = []
    for function in (projected_attention, _projected_plain):
        inputs = [t.to(dtype).requires_grad_() for t in tensors]
        out = function(*inputs)
        results.append([out, *torch.autograd.grad(out, inputs, grad)])
    tolerance = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    for ours, plain in zip(*results):
        torch.testing.assert_close(ours, plain, **tolerance)


def test_projected_attention_second_backward_recomputes_the_projections():
    """The projected keys/values go back to the pool after the first backward; a retained graph's
    second backward, after another forward has taken the pool's buffers, recomputes them."""
    torch.manual_seed(0)
    pool = ScratchPool()
    inputs = [t.double().requires_grad_() for t in (torch.randn(2, 8, 4), torch.randn(2, 4, 3), torch.randn(8, 3),
                                                     torch.randn(8, 3))]
    out = projected_attention(*inputs, dropout_p=0.3, scratch=pool)
    first = torch.autograd.grad(out.sum(), inputs, retain_graph=True)
    other = projected_attention(*(t.detach() * 2 for t in inputs[:2]), *inputs[2:], scratch=pool)
    second = torch.autograd.grad(out.sum(), inputs)
    other.sum().backward()
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)


def test_a_shared_pool_never_hands_out_buffers_still_in_use():
    """Two forwards before their backwards (gradient accumulation over two calls) with one pool: the
    second must not write into the first's kept maps or projections; both gradients stay exact."""
    torch.manual_seed(0)
    pool = ScratchPool()
    first_inputs = [t.double().requires_grad_() for t in (torch.randn(2, 8, 4), torch.randn(2, 4, 3),
                                                           torch.randn(8, 3), torch.randn(8, 3))]
    second_inputs = [t.detach().flip(0).clone().requires_grad_() for t in first_inputs]
    expected = [torch.autograd.grad(projected_attention(*x).sum(), x) for x in (first_inputs, second_inputs)]
    outs = [projected_attention(*x, scratch=pool) for x in (first_inputs, second_inputs)]
    got = [torch.autograd.grad(out.sum(), x) for out, x in zip(outs, (first_inputs, second_inputs))]
    for ours, plain in zip(got, expected):
        for a, b in zip(ours, plain):
            torch.testing.assert_close(a, b)
    assert pool.nbytes > 0  # the buffers came back for the next step
