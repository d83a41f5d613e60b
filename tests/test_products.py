"""The float32 CPU products (oneDNN where available) equal torch's own, and other dtypes fall back."""
from __future__ import annotations

import torch

from allspark_cli.model import products


def test_matmul_nt_equals_torch_for_float32_views_and_other_dtypes():
    torch.manual_seed(0)
    left, right = torch.randn(37, 300), torch.randn(45, 300)
    torch.testing.assert_close(products.matmul_nt(left, right), left @ right.T, rtol=1e-5, atol=1e-4)
    # transposed views, as the attention's weight-gradient products use them
    left_t, right_t = torch.randn(300, 37).T, torch.randn(300, 45).T
    torch.testing.assert_close(products.matmul_nt(left_t, right_t), left_t @ right_t.T, rtol=1e-5, atol=1e-4)
    doubles = left.double(), right.double()
    assert torch.equal(products.matmul_nt(*doubles), doubles[0] @ doubles[1].T)


def test_falls_back_to_torch_when_onednn_is_missing(monkeypatch):
    monkeypatch.setattr(products, "_onednn_available", lambda: False)
    left, right = torch.randn(5, 7), torch.randn(3, 7)
    assert torch.equal(products.matmul_nt(left, right), left @ right.T)
