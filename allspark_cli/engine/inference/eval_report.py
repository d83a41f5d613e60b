"""The results of an evaluation and the eval folder `allspark eval` writes: metrics.json,
per_class.csv and confusion.png (every file atomically), by default in `<run>/eval/<split>`.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from allspark_cli.engine.inference.metrics import SegmentationMetrics
from allspark_cli.engine.inference.protocol import EvalProtocol
from allspark_cli.fileio import atomic_write_text, write_png
from allspark_cli.viz.confusion import confusion_figure


@dataclass(frozen=True)
class EvalResult:
    """Outcome of one evaluation (identical on every DDP rank after the reduction).

    confusion: (K, K) int64, rows = ground truth, columns = prediction, ignore pixels excluded.
    out_of_range_pixels: labelled pixels whose mask value was not a class id of the model (skipped).
    num_images / seconds: over all ranks / this rank's wall time of the loop.
    """

    metrics: SegmentationMetrics
    confusion: np.ndarray
    num_images: int
    seconds: float
    out_of_range_pixels: int = 0

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else float("nan")


# Files of the eval folder.
METRICS_FILE = "metrics.json"


PER_CLASS_FILE = "per_class.csv"


CONFUSION_FILE = "confusion.png"


PER_CLASS_COLUMNS = ("class_id", "name", "iou", "accuracy", "gt_pixels", "predicted_pixels")


RUN_WEIGHTS_DIR = "weights"


@dataclass(frozen=True)
class EvalReport:
    """What `evaluate_checkpoint` did: the result, the protocol, the class names and the folder written."""

    result: EvalResult
    split: str
    protocol: EvalProtocol
    tta: bool
    class_names: list[str]
    out_dir: Path
    manifest_path: Path


def default_eval_dir(checkpoint: Path, split: str, runs_root: Path) -> Path:
    """`<run>/eval/<split>` for a checkpoint in a run's weights/ folder, else `<runs_root>/eval/<stem>`."""
    checkpoint = Path(checkpoint).resolve()
    if checkpoint.parent.name == RUN_WEIGHTS_DIR:
        return checkpoint.parent.parent / "eval" / split
    return Path(runs_root) / "eval" / checkpoint.stem


def write_eval_folder(report: EvalReport, checkpoint: Path, source: str) -> None:
    """metrics.json, per_class.csv and confusion.png of `report` into `report.out_dir` (atomic writes)."""
    result, names = report.result, report.class_names
    gt_pixels = result.confusion.sum(axis=1).tolist()
    predicted_pixels = result.confusion.sum(axis=0).tolist()
    metrics = result.metrics.to_dict()
    classes = [
        {"class_id": k, "name": name, "iou": metrics["iou"][k], "accuracy": metrics["accuracy"][k],
         "gt_pixels": gt_pixels[k], "predicted_pixels": predicted_pixels[k]}
        for k, name in enumerate(names)
    ]
    document = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_source": source,
        "manifest": str(report.manifest_path),
        "split": report.split,
        **asdict(report.protocol),
        "tta": report.tta,
        "num_images": result.num_images,
        "miou": metrics["miou"],
        "pixel_accuracy": metrics["pixel_accuracy"],
        "images_per_second": round(result.images_per_second, 3),
        "out_of_range_pixels": result.out_of_range_pixels,
        "classes": classes,
        "confusion": result.confusion.tolist(),
    }
    atomic_write_text(report.out_dir / METRICS_FILE, json.dumps(document, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PER_CLASS_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row, "iou": _csv_float(row["iou"]), "accuracy": _csv_float(row["accuracy"])} for row in classes)
    atomic_write_text(report.out_dir / PER_CLASS_FILE, buffer.getvalue())
    title = f"{Path(checkpoint).name} on {report.split}: mIoU {result.metrics.miou:.2f}"
    write_png(report.out_dir / CONFUSION_FILE, confusion_figure(result.confusion, names, title))


def _csv_float(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
