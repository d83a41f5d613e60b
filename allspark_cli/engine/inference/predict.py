"""Prediction: the `Predictor` Python API and `predict_folder` behind `allspark predict`.

Masks come out at the image's original size, one class id per pixel (uint8). Batching never
changes a mask: images are grouped by size and each group runs as one tensor (no padding); the
model is per-image exact.

Inference mode when none is asked for: the checkpoint's evaluation mode when it was trained with a
sliding window (cityscapes), else per image: sliding window of the checkpoint's crop when the
image's longer side exceeds AUTO_SLIDE_FACTOR x crop, whole image otherwise. The model was trained
on crops, so a very large photo (e.g. 4000 px with a 513 crop) is better read window by window,
and its whole-image forward would need many times the memory.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, get_args

import numpy as np
import torch
from torch import nn

from allspark_cli.labels import default_class_names
from allspark_cli.data.imageio import read_image
from allspark_cli.data.transforms import normalize
from allspark_cli.engine.distributed import resolve_device
from allspark_cli.engine.inference.inference import default_stride, segment
from allspark_cli.engine.precision import autocast_factory, check_amp
from allspark_cli.engine.inference.protocol import SavedRecipe
from allspark_cli.engine.settings import AmpMode
from allspark_cli.signals import StopRequest, ignore_stop_signals
from allspark_cli.errors import DataError, Interrupted, SettingsError
from allspark_cli.labels import voc_palette

PredictMode = Literal["whole", "slide"]
SaveKind = Literal["mask", "color", "overlay"]
SAVE_KINDS: tuple[str, ...] = get_args(SaveKind)
# Whole-image inference up to this multiple of the training crop (longer side), windows beyond.
AUTO_SLIDE_FACTOR = 2
# Prediction places every sliding window at full crop size (the last one moved back to the border):
# arbitrary photos would otherwise end in thin clipped windows with little context. Evaluation
# keeps the reference's clipped windows (engine.inference), which the published numbers use.
PREDICT_PLACEMENT = "shift"
# The stride-32 MiT cannot process an image side shorter than this.
MIN_IMAGE_SIDE = 32
# A mask stores class ids in one byte.
MAX_MASK_CLASSES = 256
CLASS_DIM = 1
RGB_CHANNELS = 3
RGBA_CHANNELS = 4


class InferenceCheckpoint(NamedTuple):
    """What eval and predict need from a checkpoint: the eval-mode model and its metadata."""

    model: nn.Module
    class_names: list[str]
    palette: np.ndarray  # (K, 3) uint8 RGB
    saved: SavedRecipe  # what its training settings say about inference
    source: str


def load_inference_checkpoint(path: str | os.PathLike, device: torch.device) -> InferenceCheckpoint:
    """Reads a checkpoint of this toolkit or of the reference code for eval/predict.

    DataError (exit 3) when the file is missing or is not a checkpoint. Reference checkpoints carry
    no names or palette: the benchmark names matching K (21 VOC, 19 Cityscapes, 81 COCO, else
    class_<i>) and the VOC palette are used.
    """
    from allspark_cli.model.checkpoint import load_for_inference

    checkpoint, model = load_for_inference(path, device)
    num_classes = checkpoint.model_config.num_classes
    names = list(checkpoint.class_names or default_class_names(num_classes))
    palette = voc_palette(num_classes)
    if checkpoint.palette:
        palette = np.asarray(checkpoint.palette, dtype=np.uint8).reshape(-1, 3)
    if len(palette) < num_classes:
        palette = np.concatenate([palette, voc_palette(num_classes)[len(palette):]])
    return InferenceCheckpoint(model.eval(), names, palette, SavedRecipe.from_settings(checkpoint.settings), checkpoint.source)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA uint8 -> (H, W, 3) uint8 RGB."""
    if image.dtype != np.uint8:
        raise DataError(f"images must be uint8 arrays, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], RGB_CHANNELS, axis=2)
    if image.ndim == 3 and image.shape[2] in (RGB_CHANNELS, RGBA_CHANNELS):
        return np.ascontiguousarray(image[:, :, :RGB_CHANNELS])
    raise DataError(f"images must be (H, W), (H, W, 3) or (H, W, 4) arrays, got shape {image.shape}")


def check_image_size(image: np.ndarray, name: str = "image") -> None:
    """DataError for an image with a side shorter than MIN_IMAGE_SIDE (the backbone needs it)."""
    height, width = image.shape[:2]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise DataError(f"{name} is {width}x{height}; images need at least {MIN_IMAGE_SIDE} pixels per side")


class Predictor:
    """Segments images with a checkpoint (or an eval-mode model) into (H, W) uint8 class-id masks.

    `Predictor("best.pt").predict(["a.jpg", rgb_array])` -> [mask_a, mask_b]. Arrays are RGB uint8.
    mode: "whole", "slide", or None (automatic, see the module docstring). crop/stride: sliding
    window size (default: the checkpoint's crop) and step (default floor(2/3 crop)).
    tta: average with the horizontally flipped image. batch_size: images per forward (equal sizes).
    amp: autocast dtype of the forward ("off", "bf16", "fp16"; fp16 needs CUDA).
    """

    def __init__(
        self,
        checkpoint_or_model: str | os.PathLike | nn.Module,
        *,
        device: str | torch.device = "auto",
        mode: PredictMode | None = None,
        crop: int | None = None,
        stride: int | None = None,
        tta: bool = False,
        batch_size: int = 1,
        class_names: Sequence[str] | None = None,
        palette: np.ndarray | Sequence | None = None,
        amp: AmpMode = "off",
    ) -> None:
        if batch_size < 1:
            raise SettingsError(f"batch size must be >= 1, got {batch_size}")
        self.device = device if isinstance(device, torch.device) else resolve_device(str(device))
        check_amp(amp, self.device)
        self.autocast = autocast_factory(amp, self.device)
        if isinstance(checkpoint_or_model, nn.Module):
            model = checkpoint_or_model.to(self.device).eval()
            num_classes = getattr(getattr(model, "config", None), "num_classes", None)
            loaded = InferenceCheckpoint(model, default_class_names(num_classes or 0), voc_palette(), SavedRecipe(), "model")
        else:
            loaded = load_inference_checkpoint(checkpoint_or_model, self.device)
        self.model = loaded.model
        self.saved = loaded.saved
        self.class_names = list(class_names) if class_names is not None else loaded.class_names
        self.palette = np.asarray(palette if palette is not None else loaded.palette, dtype=np.uint8).reshape(-1, 3)
        if len(self.class_names) > MAX_MASK_CLASSES:
            raise SettingsError(
                f"{len(self.class_names)} classes do not fit in 8-bit masks (at most {MAX_MASK_CLASSES})"
            )
        self.mode = mode
        self.crop = crop or self.saved.window
        self.stride = stride or default_stride(self.crop)
        if self.stride > self.crop:
            raise SettingsError(
                f"--stride {self.stride} is larger than the window (--crop {self.crop}): pixels would be skipped"
            )
        self.tta = tta
        self.batch_size = batch_size

    def mode_for(self, height: int, width: int) -> PredictMode:
        """The inference mode used for an image of this size."""
        if self.mode is not None:
            return self.mode
        trained_with_slide = self.saved.eval_mode == "slide"
        if trained_with_slide or max(height, width) > AUTO_SLIDE_FACTOR * self.crop:
            return "slide"
        return "whole"

    def predict(self, images: Sequence[np.ndarray | str | os.PathLike]) -> list[np.ndarray]:
        """(H, W) uint8 class-id masks at each input's size, in input order (paths are read as RGB)."""
        arrays = [to_rgb(item) if isinstance(item, np.ndarray) else read_image(item) for item in images]
        return self.predict_arrays(arrays)

    @torch.no_grad()
    def predict_arrays(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Like `predict` for (H, W, 3) uint8 RGB arrays; equal sizes are batched together."""
        masks: list[np.ndarray | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            check_image_size(image)
            groups.setdefault(image.shape[:2], []).append(index)
        for (height, width), indices in groups.items():
            mode = self.mode_for(height, width)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch = torch.stack([normalize(images[i]) for i in chunk]).to(self.device)
                with self.autocast():
                    scores = segment(
                        self.model, batch, mode=mode, crop=self.crop, stride=self.stride, tta=self.tta,
                        placement=PREDICT_PLACEMENT,
                    )
                labels = scores.argmax(dim=CLASS_DIM).to(torch.uint8).cpu().numpy()
                for offset, index in enumerate(chunk):
                    masks[index] = labels[offset]
        return masks  # type: ignore[return-value]


@dataclass
class PredictSummary:
    """Counts of one `predict_folder` run. seconds: wall time of reading, predicting and writing."""

    out_dir: Path
    found: int = 0
    predicted: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    mode_counts: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.predicted / self.seconds if self.seconds > 0 else float("nan")


ProgressCallback = Callable[[int, int], None]

# Output folder per saved kind; masks and colour maps are lossless PNG, overlays JPEG (photos).
KIND_FOLDERS = {"mask": "masks", "color": "color", "overlay": "overlay"}
KIND_SUFFIXES = {"mask": ".png", "color": ".png", "overlay": ".jpg"}
OVERLAY_JPEG_QUALITY = 92
# Images read ahead per chunk, as a multiple of the batch size: more same-size images to batch.
READ_AHEAD_BATCHES = 4
DEFAULT_OPACITY = 0.5
OPACITY_RANGE = (0.0, 1.0)  # image only .. colours only


def predict_out_dir(runs_root: Path, name: str | None) -> Path:
    """`<runs_root>/predict/<name>`; without a name the first free of exp, exp2, ... (a given name
    is reused, so re-running with the same name resumes)."""
    from allspark_cli.engine.training.rundir import run_dir_for

    return run_dir_for(runs_root, "predict", name, exist_ok=True)


def check_out_dir(out_dir: Path) -> None:
    """SettingsError when the output folder, or a folder above it, exists as a file."""
    for parent in (out_dir, *out_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise SettingsError(f"output folder {out_dir}: {parent} exists and is a file")


class _ReadResult(NamedTuple):
    position: int
    image: np.ndarray | None
    error: str | None


class _ImageReader(torch.utils.data.Dataset):
    """Reads images in loader workers; a failure is returned, not raised, so one bad file skips itself."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> _ReadResult:
        try:
            image = read_image(self.paths[position])
            check_image_size(image, str(self.paths[position]))
            return _ReadResult(position, image, None)
        except DataError as error:
            return _ReadResult(position, None, str(error))


def _write_outputs(
    targets: dict[str, Path], image: np.ndarray, mask: np.ndarray, predictor: Predictor, opacity: float
) -> None:
    import cv2

    from allspark_cli.fileio import atomic_write_bytes, write_png
    from allspark_cli.viz.overlay import overlay_with_legend

    for kind, target in targets.items():
        if kind == "mask":
            write_png(target, mask)
        elif kind == "color":
            write_png(target, mask, predictor.palette)
        else:
            picture = overlay_with_legend(image, mask, predictor.class_names, predictor.palette, opacity)
            ok, data = cv2.imencode(".jpg", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR),
                                    [cv2.IMWRITE_JPEG_QUALITY, OVERLAY_JPEG_QUALITY])
            if not ok:
                raise DataError(f"could not encode the overlay {target}")
            atomic_write_bytes(target, data.tobytes())


def predict_folder(
    predictor: Predictor,
    sources: list[str],
    out_dir: Path,
    *,
    save: Sequence[SaveKind] = SAVE_KINDS,
    opacity: float = DEFAULT_OPACITY,
    overwrite: bool = False,
    workers: int = 0,
    progress: ProgressCallback | None = None,
) -> PredictSummary:
    """Predicts every image of `sources` (files, folders, globs) into `out_dir`/{masks,color,overlay}.

    Outputs mirror each image's relative path (engine.sources); every file is written atomically.
    An image whose requested outputs all exist is skipped unless `overwrite`. An unreadable image
    is recorded in `summary.failed` and skipped. Inputs are only read. progress(done, total) counts
    the images to process (skipped ones excluded).
    """
    import time

    from allspark_cli.engine.inference.sources import collect_images, output_stems

    if not save:
        raise SettingsError(f"nothing to save: pick at least one of {', '.join(SAVE_KINDS)}")
    unknown = [kind for kind in save if kind not in SAVE_KINDS]
    if unknown:
        raise SettingsError(f"--save: unknown output {unknown[0]!r}; expected {', '.join(SAVE_KINDS)}")
    if not OPACITY_RANGE[0] <= opacity <= OPACITY_RANGE[1]:
        raise SettingsError(f"--opacity must be in [0, 1], got {opacity}")
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    images = collect_images(sources)
    summary = PredictSummary(out_dir=out_dir, found=len(images))
    pending: list[tuple[Path, dict[str, Path]]] = []
    for image, stem in zip(images, output_stems(images)):
        targets = {kind: out_dir / KIND_FOLDERS[kind] / (stem + KIND_SUFFIXES[kind]) for kind in save}
        if not overwrite and all(target.is_file() for target in targets.values()):
            summary.skipped += 1
        else:
            pending.append((image.path, targets))
    start = time.perf_counter()
    reader = _ImageReader([path for path, _ in pending])
    chunk = predictor.batch_size * READ_AHEAD_BATCHES
    loader = torch.utils.data.DataLoader(reader, batch_size=chunk, num_workers=workers, collate_fn=list,
                                         worker_init_fn=ignore_stop_signals)
    done = 0
    with StopRequest().installed() as stop:
        for results in loader:
            _predict_chunk(results, pending, predictor, opacity, summary)
            done += len(results)
            if progress is not None:
                progress(done, len(pending))
            if stop.requested:
                raise Interrupted(f"predict stopped after {done} of {len(pending)} images, whose outputs are complete; "
                                  "run the same command again to continue (finished images are skipped)")
    summary.seconds = time.perf_counter() - start
    return summary


def _predict_chunk(results: list[_ReadResult], pending: list[tuple[Path, dict[str, Path]]], predictor: Predictor,
                   opacity: float, summary: PredictSummary) -> None:
    """Predicts the readable images of one read-ahead chunk and writes their outputs."""
    readable = [result for result in results if result.image is not None]
    for result in results:
        if result.error is not None:
            summary.failed.append((str(pending[result.position][0]), result.error))
    masks = predictor.predict_arrays([result.image for result in readable])
    for result, mask in zip(readable, masks):
        _write_outputs(pending[result.position][1], result.image, mask, predictor, opacity)
        mode = predictor.mode_for(*mask.shape)
        summary.mode_counts[mode] = summary.mode_counts.get(mode, 0) + 1
    summary.predicted += len(readable)
