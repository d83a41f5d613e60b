"""Mixed precision: the autocast context and gradient scaler for `train.amp` (off | bf16 | fp16),
and the CUDA float32 math flags of a training run (`train.tf32`, `train.cudnn_benchmark`).

fp16 needs CUDA and a GradScaler (its small range underflows gradients); bf16 runs on CPU and CUDA
without scaling. `off` is the default and the reference's setting.

TF32: float32 matrix products and convolutions on tensor cores (Ampere and later), reading 10 of
the 23 mantissa bits of each input and accumulating in float32. torch runs convolutions in TF32 by
default but float32 matrix products without it, and MiT's work is mostly matrix products (its Linear
layers and the AllSpark maps). `cudnn.benchmark` times the convolution algorithms once per input
shape: worth it for the fixed training crop, wasted on whole-image evaluation, where every image
size is a new shape (`cudnn_benchmark_off`). Neither flag changes anything on CPU.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import ContextManager

import torch

from allspark_cli.errors import EnvError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(amp: str, device: torch.device) -> None:
    """EnvError when the device cannot run the mode (fp16 on CPU, bf16 on a GPU without it)."""
    if amp == "fp16" and device.type != "cuda":
        raise EnvError("--amp fp16 needs a CUDA device; use --amp bf16 or --amp off on CPU")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise EnvError(f"--amp bf16 is not supported by {torch.cuda.get_device_name(device)}; use --amp fp16")


def configure_cuda_math(*, tf32: bool, cudnn_benchmark: bool) -> None:
    """Process-wide CUDA math flags: TF32 for float32 matrix products, and cuDNN's per-shape
    algorithm search. Convolutions keep torch's default (TF32 allowed), as in the reference's runs
    (torch 1.12: matrix products in full float32, convolutions in TF32, cudnn.benchmark on)."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark


@contextlib.contextmanager
def cudnn_benchmark_off() -> Iterator[None]:
    """cuDNN's algorithm search off inside (inputs of many sizes), restored afterwards."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def autocast_factory(amp: str, device: torch.device) -> Callable[[], ContextManager]:
    """A zero-argument callable returning a fresh autocast context (a no-op context for `off`)."""
    if amp == "off":
        return contextlib.nullcontext
    dtype = AMP_DTYPES[amp]
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is enabled only for fp16 (disabled, it passes losses and steps through)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")
