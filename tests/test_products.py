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


def test_blocked_products_equal_torch_across_blocks_and_parts(monkeypatch):
    """Map products in several column blocks and weight-gradient sums in several row parts (as at
    coco's width) give torch's result, overwriting or accumulating."""
    monkeypatch.setattr(products, "OUTPUT_BLOCK_BYTES", 4 * 37 * 7)  # 7 columns per block
    monkeypatch.setattr(products, "ACCUMULATE_PART_BYTES", 4 * 50 * 3)  # 3 rows per part
    torch.manual_seed(0)
    left, right = torch.randn(37, 20), torch.randn(50, 20)
    out = torch.full((37, 50), float("nan"))
    torch.testing.assert_close(products.matmul_nt_into(left, right, out), left @ right.T, rtol=1e-5, atol=1e-5)
    total, start = torch.randn(11, 50), torch.randn(11, 50)
    total.copy_(start)
    weights, rows = torch.randn(11, 30), torch.randn(30, 50).T  # a transposed view, as in backward
    products.addmm_nt_(total, weights, rows, alpha=-0.5)
    torch.testing.assert_close(total, start - 0.5 * weights @ rows.T, rtol=1e-5, atol=1e-5)
    total.fill_(float("nan"))
    products.addmm_nt_(total, weights, rows, overwrite=True)
    torch.testing.assert_close(total, weights @ rows.T, rtol=1e-5, atol=1e-5)


def test_strided_blocks_take_the_torch_path_and_stay_exact(monkeypatch):
    """A column block of a wider matrix is neither contiguous nor transposed-contiguous: oneDNN would
    crawl on it, so torch's product is used (same result)."""
    calls = []
    monkeypatch.setattr(products, "_onednn_nt", lambda *a: calls.append(a) or torch.mm(a[0], a[1].T))
    torch.manual_seed(0)
    wide = torch.randn(30, 64)
    block = wide[:, 8:24].T  # (16, 30), strides (1, 64)
    left = torch.randn(5, 30)
    torch.testing.assert_close(products.matmul_nt(left, block), left @ block.T)
    total = torch.zeros(5, 16)
    products.addmm_nt_(total, left, block)
    torch.testing.assert_close(total, left @ block.T)
    assert calls == []
    products.matmul_nt(left, wide.T)  # transposed-contiguous: oneDNN, where this torch has it
    assert len(calls) == int(products._onednn_available())
