"""TensorBoard events of a run (`RUN_DIR/tensorboard/`), with the reference code's tags.

Optional: needs the `tensorboard` package (`pip install "allspark[tensorboard]"`). `run.tensorboard`
is `auto` (write when the package is installed), `on` (refuse to start without it) or `off`.
Rank 0 only. Tags: `train/loss_all`, `train/loss_x`, `train/loss_u`, `train/lr` per logged
iteration; `eval/mIoU`, `eval/pixel_accuracy` and `eval/<class>_IoU` per evaluation (x: the
iteration reached, so the two sets share an axis); `eval/val_mosaic` as an image.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import numpy as np

from allspark_cli.errors import EnvError

TENSORBOARD_DIR = "tensorboard"


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def wanted(mode: str) -> bool:
    """Whether a run with `run.tensorboard = mode` writes events; EnvError for `on` without the package."""
    if mode == "off":
        return False
    if tensorboard_available():
        return True
    if mode == "on":
        raise EnvError('run.tensorboard: on needs the tensorboard package: pip install "allspark[tensorboard]"')
    return False


class TensorBoardLog:
    """A SummaryWriter on `RUN_DIR/tensorboard`, flushed after every evaluation."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))

    def step(self, iteration: int, *, loss: float, loss_x: float, loss_u: float | None, lr: float) -> None:
        self.writer.add_scalar("train/loss_all", loss, iteration)
        self.writer.add_scalar("train/loss_x", loss_x, iteration)
        if loss_u is not None:
            self.writer.add_scalar("train/loss_u", loss_u, iteration)
        self.writer.add_scalar("train/lr", lr, iteration)

    def health(self, iteration: int, summary, class_names: list[str]) -> None:
        """The pseudo labels' health (engine/training/pseudo_labels.py HealthSummary) of a logged window."""
        if not math.isnan(summary.pass_share):
            self.writer.add_scalar("pseudo/pass_share", summary.pass_share, iteration)
        for name, pseudo, labeled, confidence in zip(class_names, summary.pseudo_share, summary.labeled_share,
                                                     summary.confidence):
            for tag, value in (("pseudo_share", pseudo), ("labeled_share", labeled), ("confidence", confidence)):
                if not math.isnan(value):
                    self.writer.add_scalar(f"pseudo/{tag}_{name}", value, iteration)

    def evaluation(self, iteration: int, *, miou: float, pixel_accuracy: float, iou: list[float],
                   class_names: list[str], mosaic: np.ndarray | None = None) -> None:
        self.writer.add_scalar("eval/mIoU", miou, iteration)
        self.writer.add_scalar("eval/pixel_accuracy", pixel_accuracy, iteration)
        for name, value in zip(class_names, iou):
            if not math.isnan(value):  # a class absent from truth and prediction has no IoU
                self.writer.add_scalar(f"eval/{name}_IoU", value, iteration)
        if mosaic is not None:
            self.writer.add_image("eval/val_mosaic", mosaic, iteration, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_log(mode: str, run_dir: Path, main: bool) -> Any:
    """The run's TensorBoardLog, or None (off, package missing under auto, or not rank 0)."""
    return TensorBoardLog(run_dir) if main and wanted(mode) else None
