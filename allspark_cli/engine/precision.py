"""Mixed precision: the autocast context and gradient scaler for `train.amp` (off | bf16 | fp16).

fp16 needs CUDA and a GradScaler (its small range underflows gradients); bf16 runs on CPU and CUDA
without scaling. `off` is the default and the reference's setting.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
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


def autocast_factory(amp: str, device: torch.device) -> Callable[[], ContextManager]:
    """A zero-argument callable returning a fresh autocast context (a no-op context for `off`)."""
    if amp == "off":
        return contextlib.nullcontext
    dtype = AMP_DTYPES[amp]
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is enabled only for fp16 (disabled, it passes losses and steps through)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")
