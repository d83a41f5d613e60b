"""`predict_folder`: segment the images of files, folders and globs into masks, colour maps and overlays.

Outputs mirror each image's relative path (engine/inference/sources.py) under `out_dir`/{masks,color,overlay};
every file is written atomically, an image whose outputs all exist is skipped (so a stopped or failed
run continues), and an unreadable image is reported and skipped.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, get_args

import numpy as np
import torch

from allspark_cli.data.imageio import read_image
from allspark_cli.engine.inference.predict import Predictor, check_image_size
from allspark_cli.engine.inference.shared import ProgressCallback, check_out_dir
from allspark_cli.errors import DataError, Interrupted, SettingsError
from allspark_cli.signals import StopRequest, ignore_stop_signals
from allspark_cli.text import plural
from allspark_cli.viz.overlay import MAX_OPACITY, MIN_OPACITY

SaveKind = Literal["mask", "color", "overlay"]


SAVE_KINDS: tuple[str, ...] = get_args(SaveKind)


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


# Output folder per saved kind; masks and colour maps are lossless PNG, overlays JPEG (photos).
KIND_FOLDERS = {"mask": "masks", "color": "color", "overlay": "overlay"}


KIND_SUFFIXES = {"mask": ".png", "color": ".png", "overlay": ".jpg"}


OVERLAY_JPEG_QUALITY = 92


# Images read ahead per chunk, as a multiple of the batch size: more same-size images to batch.
READ_AHEAD_BATCHES = 4


DEFAULT_OPACITY = 0.5


def predict_out_dir(runs_root: Path, name: str | None) -> Path:
    """`<runs_root>/predict/<name>`; without a name the first free of exp, exp2, ... (a given name
    is reused, so re-running with the same name resumes)."""
    from allspark_cli.engine.output_folders import run_dir_for

    return run_dir_for(runs_root, "predict", name, exist_ok=True)


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
            image = read_image(self.paths[position], exif_orientation=True)  # masks match the image as displayed
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
    stopping: Callable[[], None] | None = None,
) -> PredictSummary:
    """Predicts every image of `sources` (files, folders, globs) into `out_dir`/{masks,color,overlay}.

    Outputs mirror each image's relative path (engine.sources); every file is written atomically.
    An image whose requested outputs all exist is skipped unless `overwrite`. An unreadable image
    is recorded in `summary.failed` and skipped. Inputs are only read. progress(done, total) counts
    the images to process (skipped ones excluded), after each batch. A stop signal (Ctrl-C, SIGTERM)
    calls `stopping()` at once (the CLI acknowledges it) and raises Interrupted after the batch in
    progress, naming how many images are done.
    """
    import time

    from allspark_cli.engine.inference.sources import collect_images, output_stems

    if not save:
        raise SettingsError(f"nothing to save: pick at least one of {', '.join(SAVE_KINDS)}")
    unknown = [kind for kind in save if kind not in SAVE_KINDS]
    if unknown:
        raise SettingsError(f"--save: unknown output {unknown[0]!r}; expected {', '.join(SAVE_KINDS)}")
    if not MIN_OPACITY <= opacity <= MAX_OPACITY:
        raise SettingsError(f"--opacity must be in [{MIN_OPACITY:g}, {MAX_OPACITY:g}], got {opacity}")
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
    total = len(pending)
    with StopRequest(on_request=stopping).installed() as stop:

        def finished_batch() -> None:
            done = summary.predicted + len(summary.failed)
            if progress is not None:
                progress(done, total)
            if stop.requested and done < total:  # a stop after the last image changes nothing
                raise Interrupted(f"predict stopped after {done} of {plural(total, 'image')}, whose outputs are complete; "
                                  "run the same command again to continue (finished images are skipped)")

        for results in loader:
            _predict_chunk(results, pending, predictor, opacity, summary, finished_batch)
    summary.seconds = time.perf_counter() - start
    return summary


def _predict_chunk(results: list[_ReadResult], pending: list[tuple[Path, dict[str, Path]]], predictor: Predictor,
                   opacity: float, summary: PredictSummary, finished_batch: Callable[[], None]) -> None:
    """Predicts the readable images of one read-ahead chunk batch by batch, writes each batch's
    outputs, then calls `finished_batch` (where a stop takes effect)."""
    readable = [result for result in results if result.image is not None]
    for result in results:
        if result.error is not None:
            summary.failed.append((str(pending[result.position][0]), result.error))
    if len(readable) < len(results):
        finished_batch()
    for positions, masks in predictor.predict_batches([result.image for result in readable]):
        for result, mask in zip((readable[p] for p in positions), masks):
            _write_outputs(pending[result.position][1], result.image, mask, predictor, opacity)
            mode = predictor.mode_for(*mask.shape)
            summary.mode_counts[mode] = summary.mode_counts.get(mode, 0) + 1
        summary.predicted += len(positions)
        finished_batch()
