"""The memory-lean attention function equals plain autograd (values and gradients)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from allspark_cli.model import attention
from allspark_cli.model.attention import normalized_attention


def _plain(queries, keys, values):
    scores = (queries @ keys).unsqueeze(1)  # (B, 1, R, L)
    attention = torch.softmax(F.instance_norm(scores, eps=1e-5).squeeze(1), dim=-1)
    return attention @ values.transpose(0, 1)


@pytest.mark.parametrize("saved_maps_budget", [0, 8 * 16 * 8, 2**30])
@pytest.mark.parametrize("rows_per_chunk", [3, None])
def test_values_and_gradients_match_plain_autograd(saved_maps_budget, rows_per_chunk, monkeypatch):
    """Budgets: recompute every map, keep one image's map (float64 8 x 16), keep all."""
    if rows_per_chunk is not None:  # several row chunks per map (the large-map path)
        monkeypatch.setattr(attention, "CHUNK_BYTES", 4 * 16 * rows_per_chunk)
    torch.manual_seed(0)
    q = torch.randn(3, 8, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 8, 5, dtype=torch.float64)
    ours = normalized_attention(q, k, v, saved_maps_budget=saved_maps_budget)
    grads_ours = torch.autograd.grad(ours, (q, k, v), grad)
    plain = _plain(q, k, v)
    grads_plain = torch.autograd.grad(plain, (q, k, v), grad)
    torch.testing.assert_close(ours, plain)
    for a, b in zip(grads_ours, grads_plain):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("saved_masks_budget", [0, 2**30])
def test_dropout_mask_is_the_same_in_forward_and_backward(saved_masks_budget, monkeypatch):
    """With dropout the gradient must be that of the forward's own mask: check against finite differences
    of a function whose mask is fixed by re-seeding torch before every evaluation. Masks either kept
    for backward or regenerated from their seed."""
    monkeypatch.setattr(attention, "SAVED_MASKS_BUDGET_BYTES", saved_masks_budget)
    q = torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 8, dtype=torch.float64)
    v = torch.randn(3, 8, dtype=torch.float64)

    def run(queries):
        torch.manual_seed(123)  # the same seeds, so the same masks, in every evaluation
        return normalized_attention(queries, k, v, dropout_p=0.5).sum()

    assert torch.autograd.gradcheck(run, (q,), eps=1e-6, atol=1e-5)


def test_bf16_autocast_runs_and_returns_the_autocast_dtype():
    q = torch.randn(2, 8, 5, requires_grad=True)
    k = torch.randn(5, 16, requires_grad=True)
    v = torch.randn(5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = normalized_attention(q, k, v, dropout_p=0.1)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and k.grad.dtype == torch.float32
