"""Float32 matrix products of the attention function on CPU, through oneDNN where it is faster.

`torch.mm` hands float32 CPU products to MKL's BLAS, which on AMD processors runs its generic code
path. oneDNN (bundled with every x86/aarch64 torch build, and what torch's own compiler emits for
CPU linear layers) JIT-compiles for the processor it finds. On the 2-core AMD EPYC (AVX-512)
development machine the attention's products run at about 175-200 GFLOP/s through oneDNN against
about 105-145 through MKL in isolation, and at 140-195 against 95-135 inside a training step.

The oneDNN operator allocates its output. An allocation larger than glibc's largest dynamic mmap
threshold (32 MiB) is a fresh mapping every time and page-faults on every page it writes: a
512 x 21504 map chunk then ran at 119-137 GFLOP/s instead of 177-196. So large outputs are made
in blocks that the heap recycles: `matmul_nt_into` writes column blocks of about
`OUTPUT_BLOCK_BYTES` into the caller's buffer (a copy that stays mostly in cache), and `addmm_nt_`
adds row parts of at most `ACCUMULATE_PART_BYTES`. Each part of `addmm_nt_` reads the whole right
operand again, hence the larger parts.

The oneDNN entry point, `torch.ops.mkldnn._linear_pointwise`, is an internal operator: it is used
only after it has computed a small product equal to `torch.mm` once in this process, and every
other case (other devices or dtypes) uses `torch.mm` / `addmm_` directly. A torch whose operator is
missing or wrong gets the same values through `torch.mm`, slower on some processors, with one
`RuntimeWarning` per process that says so.
"""
from __future__ import annotations

import functools
import warnings

import torch

# Relative error allowed between the two libraries on the probe product (float32 rounding).
_PROBE_TOLERANCE = 1e-4
# Output column blocks of `matmul_nt_into`: measured 183-188 GFLOP/s at 2-16 MiB blocks.
OUTPUT_BLOCK_BYTES = 8 * 2**20
# Row parts of `addmm_nt_`, below glibc's 32 MiB mmap threshold cap (with room for alignment).
ACCUMULATE_PART_BYTES = 30 * 2**20


@functools.cache  # one probe, and at most one warning, per process
def _onednn_available() -> bool:
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(8, 16, generator=generator)
    right = torch.randn(4, 16, generator=generator)
    try:
        result = torch.ops.mkldnn._linear_pointwise(left, right, None, "none", [], "")
    except (AttributeError, RuntimeError, TypeError) as error:
        return _without_onednn(f"{type(error).__name__}: {error}")
    expected = left @ right.transpose(0, 1)
    agrees = result.shape == expected.shape and torch.allclose(result, expected, rtol=_PROBE_TOLERANCE,
                                                                atol=_PROBE_TOLERANCE)
    if not agrees:
        return _without_onednn("its probe product differs from torch.mm")
    return True


def _without_onednn(reason: str) -> bool:
    warnings.warn(
        f"oneDNN's matrix product torch.ops.mkldnn._linear_pointwise is not usable in torch "
        f"{torch.__version__} ({reason}); the attention's float32 CPU products use torch.mm instead: "
        "same values, slower on some processors",
        RuntimeWarning,
    )
    return False


def _use_onednn(right: torch.Tensor, *others: torch.Tensor) -> bool:
    """Float32 CPU operands, oneDNN present, and a right operand that is contiguous or a transposed
    contiguous matrix: any other stride pattern (a column block of a wider matrix, say) made oneDNN
    fall back to a path about 50x slower."""
    float32_cpu = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (right, *others))
    rows_or_columns = right.is_contiguous() or right.transpose(0, 1).is_contiguous()
    return float32_cpu and rows_or_columns and _onednn_available()


def add_product_(target: torch.Tensor, product: torch.Tensor, *, alpha: float = 1.0, overwrite: bool = False) -> None:
    """target = alpha * product (`overwrite`) or target += alpha * product; product may be of a
    narrower dtype (a bf16 product into a float32 sum)."""
    if not overwrite:
        target.add_(product, alpha=alpha)
        return
    target.copy_(product)
    if alpha != 1.0:
        target.mul_(alpha)


def _onednn_nt(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    # A transposed view as the left operand runs at half speed; it is small wherever it occurs.
    return torch.ops.mkldnn._linear_pointwise(left.contiguous(), right, None, "none", [], "")


def matmul_nt(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left @ right^T for 2-d tensors: (M, K) x (N, K) -> (M, N). `right` may be a transposed view."""
    if _use_onednn(right, left):
        return _onednn_nt(left, right)
    return left @ right.transpose(0, 1)


def matmul_nt_into(left: torch.Tensor, right: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = left @ right^T: (M, K) x (L, K) -> out (M, L), in place; returns `out`."""
    # Row blocks of a contiguous `right` are contiguous; those of a transposed one would be strided.
    if not (_use_onednn(right, left, out) and right.is_contiguous()):
        return torch.mm(left, right.transpose(0, 1), out=out)
    step = max(1, OUTPUT_BLOCK_BYTES // (out.shape[0] * out.element_size()))
    for start in range(0, out.shape[1], step):
        out[:, start : start + step].copy_(_onednn_nt(left, right[start : start + step]))
    return out


def addmm_nt_(
    total: torch.Tensor, left: torch.Tensor, right: torch.Tensor, *, alpha: float = 1.0, overwrite: bool = False
) -> torch.Tensor:
    """total += alpha * left @ right^T (total = alpha * left @ right^T with `overwrite`, whatever
    `total` held): total (M, L), left (M, K), right (L, K) (a transposed view of a contiguous (K, L)
    is fine); in place, returns `total`."""
    if not _use_onednn(right, left, total):
        return total.addmm_(left, right.transpose(0, 1), beta=0.0 if overwrite else 1.0, alpha=alpha)
    rows = total.shape[0]
    parts = max(1, -(-rows * total.shape[1] * total.element_size() // ACCUMULATE_PART_BYTES))
    step = -(-rows // parts)  # equal parts
    for start in range(0, rows, step):
        product = _onednn_nt(left[start : start + step], right)
        add_product_(total[start : start + step], product, alpha=alpha, overwrite=overwrite)
    return total
