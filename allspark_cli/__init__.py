"""allspark: AllSpark semi-supervised semantic segmentation (CVPR 2024) as a toolkit.

`from allspark_cli import load_model` gives an eval-mode segmentor from a checkpoint of this
toolkit or of the paper's reference code, without importing the CLI.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("allspark")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "load_model"]


def __getattr__(name: str):
    # Lazy so that `import allspark_cli` (e.g. for --version) does not import torch.
    if name == "load_model":
        from allspark_cli.model.checkpoint import load_model

        return load_model
    raise AttributeError(f"module 'allspark_cli' has no attribute {name!r}")
