"""The oldest torch this toolkit runs on, checked once when the CLI starts or the model is imported.

The floor is set by the newest of the torch APIs the code calls (each line: the API, where, and the
release that introduced it):
- `torch.serialization.safe_globals` (reference checkpoints with numpy scalars, model/checkpoint.py): 2.5;
- `torch.OutOfMemoryError`, device-independent (engine/training/train.py): 2.5;
- `torch.get_autocast_dtype(device_type)` / `torch.is_autocast_enabled(device_type)`
  (model/attention.py): 2.4;
- `torch.amp.GradScaler(device_type)` (engine/precision.py): 2.3.
The version is read from the installed package's metadata, so the check does not import torch
(`allspark --version` and `--help` stay fast).
"""
from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

from allspark_cli.errors import EnvError

TORCH_FLOOR = (2, 5)
_RELEASE = re.compile(r"(\d+)\.(\d+)")


def torch_release(text: str) -> tuple[int, int] | None:
    """(major, minor) of a torch version string ('2.14.1+cu130' -> (2, 14)); None if unreadable."""
    match = _RELEASE.match(text.strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_torch_version(installed: str | None = None) -> None:
    """EnvError (exit 4) naming the installed and the required torch when it is too old or absent.

    `installed` defaults to the version of the installed torch package."""
    floor = ".".join(map(str, TORCH_FLOOR))
    if installed is None:
        try:
            installed = version("torch")
        except PackageNotFoundError:
            raise EnvError(f"torch is not installed; allspark needs torch>={floor} (pip install 'torch>={floor}')") from None
    release = torch_release(installed)
    if release is not None and release < TORCH_FLOOR:
        raise EnvError(f"torch {installed} is installed but allspark needs torch>={floor}; "
                       f"upgrade it (pip install 'torch>={floor}')")
