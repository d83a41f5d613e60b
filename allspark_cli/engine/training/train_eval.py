"""In-training evaluation: the eval developer's `evaluate_dataset` on the validation split, then the
bookkeeping (best mIoU, results.csv, plots/results.png, plots/val_mosaic.png on rank 0).

The published number is the best validation mIoU over the epochs (DESIGN.md section 3b).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from allspark_cli.data.manifest import DatasetManifest
from allspark_cli.engine.distributed import DistInfo
from allspark_cli.engine.inference.evaluate import evaluate_dataset
from allspark_cli.engine.inference.inference import segment
from allspark_cli.engine.inference.protocol import EvalProtocol
from allspark_cli.engine.inference.shared import ProgressCallback
from allspark_cli.engine.settings import TrainSettings
from allspark_cli.engine.training.rundir import MOSAIC_PLOT, RESULTS_PLOT, RunFolder
from allspark_cli.engine.training.state import TrainState
from allspark_cli.fileio import write_png
from allspark_cli.viz.plots import plot_results, validation_mosaic



class EpochEval(NamedTuple):
    miou: float
    pixel_accuracy: float
    improved: bool
    seconds: float


def _last_losses(history_losses: dict[str, float] | None) -> dict[str, float | None]:
    return history_losses or {"loss_x": None, "loss_u": None}


@torch.no_grad()
def _mosaic(model: nn.Module, dataset, settings: TrainSettings, protocol: EvalProtocol, device: torch.device) -> list:
    samples = []
    was_training = model.training
    model.eval()
    for index in range(min(settings.eval.mosaic_images, len(dataset))):
        image, target, _ = dataset[index]
        scores = segment(model, image.unsqueeze(0).to(device), mode=protocol.mode, crop=protocol.crop,
                         stride=protocol.stride)
        prediction = scores.argmax(dim=1)[0].cpu().numpy()
        if prediction.shape != tuple(target.shape):  # center-crop mode scores only the central region
            continue
        samples.append((image.numpy(), target.numpy(), prediction))
    model.train(was_training)
    return samples


def evaluate_epoch(
    model: nn.Module,
    dataset,
    settings: TrainSettings,
    protocol: EvalProtocol,
    dist: DistInfo,
    manifest: DatasetManifest,
    run_folder: RunFolder,
    state: TrainState,
    *,
    lr: float,
    main: bool,
    losses: dict[str, float] | None = None,
    tensorboard=None,
    progress: ProgressCallback | None = None,
) -> EpochEval:
    """Evaluates after epoch `state.epoch` (already advanced), updates `state` (best, history).
    progress(done, total): after each batch, over this process's share of the validation images."""
    result = evaluate_dataset(model, dataset, mode=protocol.mode, crop=protocol.crop, stride=protocol.stride,
                              batch_size=settings.eval.batch_size, device=dist.device, amp=settings.train.amp,
                              dist=dist if dist.is_distributed else None, workers=settings.data.workers,
                              progress=progress)
    miou, pixel_accuracy = float(result.metrics.miou), float(result.metrics.pixel_accuracy)
    epoch = state.epoch - 1
    improved = not math.isnan(miou) and miou > state.best_miou
    if improved:
        state.best_miou, state.best_epoch = miou, epoch
    state.last_miou = miou
    row = {"epoch": epoch + 1, "iteration": state.iteration, "lr": lr, **_last_losses(losses),
           "miou": miou, "pixel_accuracy": pixel_accuracy, "iou": [float(v) for v in result.metrics.iou]}
    state.history = [*state.history, row]
    if main:
        run_folder.write_results(state.history)
        run_folder.log(f"epoch {epoch + 1}: mIoU {miou:.2f} pixel accuracy {pixel_accuracy:.2f}")
        plot_results(state.history, run_folder.plots / RESULTS_PLOT, steps=run_folder.read_metrics(),
                     class_names=list(manifest.classes))
        samples = _mosaic(model, dataset, settings, protocol, dist.device)
        mosaic = validation_mosaic(samples, manifest.palette, manifest.classes) if samples else None
        if mosaic is not None:
            write_png(run_folder.plots / MOSAIC_PLOT, mosaic)
        if tensorboard is not None:
            tensorboard.evaluation(state.iteration, miou=miou, pixel_accuracy=pixel_accuracy,
                                   iou=list(result.metrics.iou), class_names=list(manifest.classes), mosaic=mosaic)
    return EpochEval(miou, pixel_accuracy, improved, result.seconds)
