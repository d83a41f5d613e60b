"""The float32 CPU products (oneDNN where available) against products written out here, element by
element in float64, and against hand-computed numbers; other dtypes, strided blocks and a torch
without the oneDNN operator take torch's own product, the last with one warning per process."""
from __future__ import annotations

import types
import warnings

import pytest
import torch

from allspark_cli.model import products
from allspark_cli.model.attention_paths import labeled_attention

# Two small matrices and left @ right^T worked out by hand: 1*5 + 2*6 = 17, 1*7 + 2*8 = 23, ...
HAND_LEFT = [[1.0, 2.0], [3.0, 4.0], [-1.0, 0.5]]
HAND_RIGHT = [[5.0, 6.0], [7.0, 8.0]]
HAND_PRODUCT = [[17.0, 23.0], [39.0, 53.0], [-2.0, -3.0]]


def _nt(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left @ right^T as sums of elementwise products in float64 (no matrix-product library)."""
    return (left.double()[:, None, :] * right.double()[None, :, :]).sum(-1)


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.fixture
def fresh_probe():
    """The oneDNN probe (cached for the process) runs again in the test and after it."""
    products._onednn_available.cache_clear()
    yield
    products._onednn_available.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_products_give_the_hand_computed_numbers(dtype):
    left, right = torch.tensor(HAND_LEFT, dtype=dtype), torch.tensor(HAND_RIGHT, dtype=dtype)
    expected = torch.tensor(HAND_PRODUCT, dtype=dtype)
    assert torch.equal(products.matmul_nt(left, right), expected)
    assert torch.equal(products.matmul_nt_into(left, right, torch.full((3, 2), float("nan"), dtype=dtype)), expected)
    total = torch.ones(3, 2, dtype=dtype)
    assert torch.equal(products.addmm_nt_(total, left, right, alpha=-1.0), 1 - expected)


def test_matmul_nt_equals_the_written_out_product_for_views_and_other_dtypes():
    torch.manual_seed(0)
    left, right = torch.randn(37, 300), torch.randn(45, 300)
    _close(products.matmul_nt(left, right), _nt(left, right))
    # transposed views, as the attention's weight-gradient products use them
    left_t, right_t = torch.randn(300, 37).T, torch.randn(300, 45).T
    _close(products.matmul_nt(left_t, right_t), _nt(left_t, right_t))
    doubles = left.double(), right.double()
    torch.testing.assert_close(products.matmul_nt(*doubles), _nt(*doubles))


def test_blocked_products_are_right_across_blocks_and_parts(monkeypatch):
    """Map products in several column blocks and weight-gradient sums in several row parts (as at
    coco's width), overwriting or accumulating."""
    monkeypatch.setattr(products, "OUTPUT_BLOCK_BYTES", 4 * 37 * 7)  # 7 columns per block
    monkeypatch.setattr(products, "ACCUMULATE_PART_BYTES", 4 * 50 * 3)  # 3 rows per part
    torch.manual_seed(0)
    left, right = torch.randn(37, 20), torch.randn(50, 20)
    out = torch.full((37, 50), float("nan"))
    _close(products.matmul_nt_into(left, right, out), _nt(left, right))
    total, start = torch.randn(11, 50), torch.randn(11, 50)
    total.copy_(start)
    weights, rows = torch.randn(11, 30), torch.randn(30, 50).T  # a transposed view, as in backward
    products.addmm_nt_(total, weights, rows, alpha=-0.5)
    _close(total, start.double() - 0.5 * _nt(weights, rows))
    total.fill_(float("nan"))
    products.addmm_nt_(total, weights, rows, overwrite=True)
    _close(total, _nt(weights, rows))


def test_strided_blocks_take_the_torch_path_and_stay_right(monkeypatch):
    """A column block of a wider matrix is neither contiguous nor transposed-contiguous: oneDNN would
    crawl on it, so torch's product is used."""
    calls = []
    monkeypatch.setattr(products, "_onednn_nt", lambda *a: calls.append(a) or torch.mm(a[0], a[1].T))
    torch.manual_seed(0)
    wide = torch.randn(30, 64)
    block = wide[:, 8:24].T  # (16, 30), strides (1, 64)
    left = torch.randn(5, 30)
    _close(products.matmul_nt(left, block), _nt(left, block))
    total = torch.zeros(5, 16)
    products.addmm_nt_(total, left, block)
    _close(total, _nt(left, block))
    assert calls == []
    products.matmul_nt(left, wide.T)  # transposed-contiguous: oneDNN, where this torch has it
    assert len(calls) == int(products._onednn_available())


def test_without_the_onednn_operator_the_attention_is_unchanged_and_says_so_once(monkeypatch, fresh_probe):
    """A torch that no longer has the private operator: the frugal path's products fall back to
    torch's, its output equals the plain path's, and one warning says so however many products run."""
    monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace())  # no _linear_pointwise
    generator = torch.Generator().manual_seed(0)
    queries, sources = torch.randn(2, 16, 9, generator=generator), torch.randn(3, 9, 8, generator=generator)
    key_weight, value_weight = torch.randn(16, 8, generator=generator), torch.randn(16, 8, generator=generator)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning raised is recorded: "once" must come from the code
        frugal = [labeled_attention(queries, sources, key_weight, value_weight, path="frugal") for _ in range(2)]
        left, right = torch.tensor(HAND_LEFT), torch.tensor(HAND_RIGHT)
        assert torch.equal(products.matmul_nt(left, right), torch.tensor(HAND_PRODUCT))
    notes = [w for w in caught if issubclass(w.category, RuntimeWarning) and "_linear_pointwise" in str(w.message)]
    assert len(notes) == 1, [str(w.message) for w in caught]
    assert "torch.mm" in str(notes[0].message)
    plain = labeled_attention(queries, sources, key_weight, value_weight, path="eager")
    for out in frugal:
        torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
