"""Evaluation of a segmentor on a labelled split (DESIGN.md section 3b).

`evaluate_dataset` is the loop shared by in-training evaluation and `allspark eval`: images at
native size, one of the inference modes of `engine.inference`, one confusion matrix summed over
the whole split and reduced once across DDP processes. Batching never changes the numbers: a
loaded batch is split into groups of equal image size, and each group goes through the model as
one tensor (no padding, which would change what the model sees); the model is per-image exact.

`evaluate_checkpoint` wraps it for a saved checkpoint (`allspark eval`): the protocol comes from
`protocol.resolve_protocol` (the options, then the checkpoint's settings), and the results are
written into the eval folder (metrics.json, per_class.csv, confusion.png; every file atomically).
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from allspark_cli.constants import IGNORE_INDEX, WEIGHTS_DIR
from allspark_cli.data.datasets import build_eval_dataset
from allspark_cli.data.fingerprint import fingerprint_differences, read_fingerprint, take_fingerprint
from allspark_cli.data.manifest import MANIFEST_NAME, load_manifest
from allspark_cli.engine.distributed import resolve_device
from allspark_cli.engine.inference.eval_report import (
    EvalReport,
    EvalResult,
    default_eval_dir,
    write_eval_folder,
)
from allspark_cli.engine.inference.inference import EvalMode, center_crop_box, segment
from allspark_cli.engine.inference.metrics import ConfusionMatrix
from allspark_cli.engine.inference.protocol import resolve_protocol
from allspark_cli.engine.inference.shared import (
    ProgressCallback,
    check_out_dir,
    load_inference_checkpoint,
)
from allspark_cli.engine.precision import (
    autocast_factory,
    check_amp,
    cudnn_benchmark_off,
)
from allspark_cli.engine.settings import AmpMode
from allspark_cli.errors import DataError, Interrupted, SettingsError
from allspark_cli.signals import StopRequest, ignore_stop_signals
from allspark_cli.text import plural

CLASS_DIM = 1


def _keep_samples(batch: list[Any]) -> list[Any]:
    # Images of a split differ in size, so they cannot be stacked by the default collate.
    return batch


def _size_groups(samples: list[tuple[torch.Tensor, torch.Tensor, str]]) -> Iterator[list[int]]:
    """Indices of `samples` grouped by image size, in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, (image, _, _) in enumerate(samples):
        groups.setdefault(tuple(image.shape), []).append(index)
    yield from groups.values()


def _shard(dataset: Dataset, dist: Any | None) -> Dataset:
    """This rank's share of the dataset: every world_size-th image (no padding, no duplicates)."""
    world_size = getattr(dist, "world_size", 1) if dist is not None else 1
    if world_size <= 1:
        return dataset
    return Subset(dataset, list(range(dist.rank, len(dataset), world_size)))


def _model_num_classes(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "num_classes", None)


@torch.no_grad()
def evaluate_dataset(
    model: nn.Module,
    dataset: Dataset,
    *,
    mode: EvalMode = "whole",
    crop: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    amp: AmpMode = "off",
    dist: Any | None = None,
    progress: ProgressCallback | None = None,
    tta: bool = False,
    num_classes: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    workers: int = 0,
    stop: StopRequest | None = None,
) -> EvalResult:
    """Evaluates `model` on `dataset` and returns the metrics of the whole split.

    dataset: yields (image float32 (3, H, W) ImageNet-normalised, mask int64 (H, W), relpath), e.g.
    `data.datasets.EvalDataset`. model: the plain module (not a DDP wrapper); it is put in eval mode
    and restored to its previous mode afterwards. mode/crop/stride/tta: see `inference.segment`
    (center-crop scores the same central region of the mask). device: defaults to the model's.
    amp: autocast dtype for the forward ("off", "bf16", "fp16"); scores are accumulated in float32.
    dist: the run's DistInfo; each rank evaluates every world_size-th image and the confusion
    matrix is summed once at the end, so every rank returns the same result.
    stop: an installed StopRequest checked after each batch (`allspark eval`): Interrupted then.
    num_classes: K, defaulting to `model.config.num_classes`, else to the scores' channel count.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    check_amp(amp, device)
    autocast = autocast_factory(amp, device)
    shard = _shard(dataset, dist)
    # Pinned host memory lets the non-blocking copies below overlap the previous image's compute.
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_keep_samples,
                        worker_init_fn=ignore_stop_signals, pin_memory=device.type == "cuda")
    num_classes = num_classes or _model_num_classes(model)
    confusion = ConfusionMatrix(num_classes, ignore_index) if num_classes else None
    was_training = model.training
    model.eval()
    done, total = 0, len(shard)
    start = time.perf_counter()
    try:
        with cudnn_benchmark_off():  # every image size would be a new shape to time
            for samples in loader:
                for group in _size_groups(samples):
                    # Copied one by one from their pinned buffers, stacked on the device.
                    images = torch.stack([samples[i][0].to(device, non_blocking=True) for i in group])
                    masks = torch.stack([samples[i][1].to(device, non_blocking=True) for i in group])
                    with autocast():
                        scores = segment(model, images, mode=mode, crop=crop, stride=stride, tta=tta)
                    if mode == "center-crop":
                        rows, cols = center_crop_box(masks.shape[-2], masks.shape[-1], crop)
                        masks = masks[:, rows, cols]
                    if confusion is None:
                        confusion = ConfusionMatrix(scores.shape[CLASS_DIM], ignore_index)
                    confusion.update(masks, scores.argmax(dim=CLASS_DIM))
                done += len(samples)
                if progress is not None:
                    progress(done, total)
                if stop is not None and stop.requested:
                    raise Interrupted(f"evaluation stopped after {done} of {plural(total, 'image')}; nothing was written: "
                                      "run the same command again")
    finally:
        model.train(was_training)
    if confusion is None:  # an empty shard of a model without a config: nothing to count
        raise ValueError("evaluate_dataset needs num_classes when the dataset (shard) is empty")
    confusion.all_reduce_(dist)
    matrix = confusion.to_numpy()  # the one wait for the device: the time below includes its queue
    seconds = time.perf_counter() - start
    num_images = _global_count(done, dist, device)
    return EvalResult(
        metrics=confusion.compute(),
        confusion=matrix,
        num_images=num_images,
        seconds=seconds,
        out_of_range_pixels=confusion.out_of_range,
    )


def _global_count(count: int, dist: Any | None, device: torch.device) -> int:
    world_size = getattr(dist, "world_size", 1) if dist is not None else 1
    if world_size <= 1:
        return count
    total = torch.tensor([count], dtype=torch.int64, device=getattr(dist, "device", device))
    torch.distributed.all_reduce(total)
    return int(total.item())


def _check_run_dataset(checkpoint: Path, manifest, manifest_path, split: str) -> None:
    """A run's checkpoint is scored on its recorded dataset only when that is still the dataset the
    run recorded (RUN_DIR/dataset.json): a swapped one is refused unless named with --data."""
    run_dir = checkpoint.resolve().parent.parent
    recorded = read_fingerprint(run_dir) if checkpoint.resolve().parent.name == WEIGHTS_DIR else None
    if recorded is None:
        return
    now = take_fingerprint(manifest, Path(manifest_path).resolve())
    differences = fingerprint_differences(recorded, now, [f"eval:{split}"])
    if differences:
        raise DataError(f"{now.manifest} is not the dataset run {run_dir} was trained and recorded on: "
                        f"{'; '.join(differences)}; to evaluate on it anyway, name it with --data")


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    split: str = "val",
    mode: EvalMode | None = None,
    crop: int | None = None,
    stride: int | None = None,
    tta: bool = False,
    batch_size: int = 1,
    device: str = "auto",
    amp: AmpMode = "off",
    out: str | os.PathLike | None = None,
    runs_root: str | os.PathLike = "runs",
    workers: int = 0,
    progress: ProgressCallback | None = None,
) -> EvalReport:
    """Evaluates a checkpoint on a split of a prepared dataset and writes the eval folder.

    data: the dataset.yaml (or its folder); defaults to the one recorded in the checkpoint's
    settings (reference checkpoints record none: SettingsError asking for --data).
    SettingsError when the checkpoint's class count differs from the dataset's; DataError (exit 3)
    when the checkpoint file is not a checkpoint. Nothing is written before the evaluation succeeds.
    """

    checkpoint = Path(checkpoint)
    torch_device = resolve_device(device)
    loaded = load_inference_checkpoint(checkpoint, torch_device)
    manifest_path = data or loaded.saved.manifest
    if manifest_path is None:
        raise SettingsError(f"{checkpoint} does not record its dataset; pass --data path/to/dataset.yaml")
    manifest = load_manifest(manifest_path)
    if data is None:
        _check_run_dataset(checkpoint, manifest, manifest_path, split)
    num_classes = len(loaded.class_names)
    if num_classes != manifest.num_classes:
        raise SettingsError(
            f"checkpoint {checkpoint} predicts {num_classes} classes but dataset '{manifest.name}' "
            f"({manifest_path}) has {manifest.num_classes}"
        )
    protocol = resolve_protocol(manifest, mode=mode, crop=crop, stride=stride, run=loaded.saved)
    out_dir = Path(out) if out is not None else default_eval_dir(checkpoint, split, Path(runs_root))
    check_out_dir(out_dir)
    dataset = build_eval_dataset(manifest, split)
    with StopRequest().installed() as stop:
        result = evaluate_dataset(
            loaded.model, dataset, mode=protocol.mode, crop=protocol.crop, stride=protocol.stride, tta=tta,
            batch_size=batch_size, device=torch_device, amp=amp, progress=progress, num_classes=num_classes,
            ignore_index=manifest.ignore_index, workers=workers, stop=stop,
        )
    manifest_file = Path(manifest_path)
    manifest_file = (manifest_file / MANIFEST_NAME if manifest_file.is_dir() else manifest_file).resolve()
    report = EvalReport(result, split, protocol, tta, list(manifest.classes), out_dir, manifest_file)
    write_eval_folder(report, checkpoint, loaded.source)
    return report
