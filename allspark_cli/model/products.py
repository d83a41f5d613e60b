"""Float32 matrix products of the attention function on CPU, through oneDNN where it is faster.

`torch.mm` hands float32 CPU products to MKL's BLAS, which on AMD processors runs its generic code
path. oneDNN (bundled with every x86/aarch64 torch build, and what torch's own compiler emits for
CPU linear layers) JIT-compiles for the processor it finds. On the 2-core AMD EPYC (AVX-512)
development machine the attention's products with a long inner dimension (`probs @ values^T`,
`grad @ keys^T`) run at about 165-200 GFLOP/s through oneDNN against about 130-150 through MKL.
Products whose output is large (the map chunks, inner dimension N, and the N x L weight-gradient
accumulations) stay on `torch.mm(out=...)` / `addmm_`: they write into reused buffers, while the
oneDNN operator allocates its output, and a fresh large allocation page-faults (measured slower
at coco's width).

The oneDNN entry point, `torch.ops.mkldnn._linear_pointwise`, is an internal operator: it is used
only after it has computed a small product equal to `torch.mm` once in this process, and every
other case (other devices or dtypes, a torch without it) uses `torch.mm`.
"""
from __future__ import annotations

import functools

import torch

# Relative error allowed between the two libraries on the probe product (float32 rounding).
_PROBE_TOLERANCE = 1e-4


@functools.cache
def _onednn_available() -> bool:
    try:
        operator = torch.ops.mkldnn._linear_pointwise
        generator = torch.Generator().manual_seed(0)
        left = torch.randn(8, 16, generator=generator)
        right = torch.randn(4, 16, generator=generator)
        result = operator(left, right, None, "none", [], "")
    except (AttributeError, RuntimeError, TypeError):
        return False
    expected = left @ right.transpose(0, 1)
    return result.shape == expected.shape and bool(
        torch.allclose(result, expected, rtol=_PROBE_TOLERANCE, atol=_PROBE_TOLERANCE)
    )


def _use_onednn(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and _onednn_available()


def matmul_nt(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left @ right^T for 2-d tensors: (M, K) x (N, K) -> (M, N). Either may be a transposed view."""
    if _use_onednn(left, right):
        return torch.ops.mkldnn._linear_pointwise(left, right, None, "none", [], "")
    return left @ right.transpose(0, 1)
