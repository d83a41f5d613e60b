"""Dataset checking: every file a manifest lists exists, decodes and agrees with its partner.

`check_dataset` never raises for bad samples; it collects them as `Problem(file, rule, detail)`
in a `CheckReport` (plus per-class pixel statistics) so the CLI can show everything at once.
`raise_if_problems` turns a report into one DataError line for code paths that must stop
(training start-up). Rules:

- `split-file`: a split list is missing, empty or malformed;
- `missing`: a listed image or mask file does not exist;
- `unreadable`: a file does not decode (corrupt JPEG, truncated PNG, not an image);
- `mask-not-single-channel`: a mask is a colour image instead of class ids;
- `size-mismatch`: image and mask differ in size;
- `mask-values`: a mask holds values outside 0..K-1 and the ignore index;
- `labeled-and-unlabeled`: an image is in both lists of one training split;
- `train-in-eval`: a training image (labeled or unlabeled) is also in an evaluation split.

`fast=True` reads only file headers (existence, sizes, mask mode) and decodes an evenly spaced
sample of FAST_MASK_SAMPLE masks for the value check and statistics.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from allspark_cli.data.imageio import read_image, read_mask, read_size
from allspark_cli.data.manifest import DatasetManifest, load_manifest
from allspark_cli.data.splits import SplitEntry, read_split
from allspark_cli.errors import DataError
from allspark_cli.text import plural

FAST_MASK_SAMPLE = 100
# Below this many files a process pool costs more than it saves.
MIN_FILES_FOR_POOL = 256
MAX_DEFAULT_WORKERS = 8
CHUNK_SIZE = 16
# Problems named in the one-line error of `raise_if_problems`.
SUMMARY_FILES = 3
_HIST_BINS = 256
_SHOWN_BAD_VALUES = 5
_SINGLE_CHANNEL_MODES = frozenset({"P", "L", "1", "I", "I;16", "I;16B", "I;16L"})
TRAIN_GROUP = "train"
SPLIT_FILE_RULE = "split-file"  # a split list is missing or malformed


@dataclass(frozen=True)
class Problem:
    """One failed rule: `file` is relative to the dataset root (or the split file's path)."""

    file: str
    rule: str
    detail: str = ""


@dataclass
class ClassStats:
    """Per-class statistics of a group of masks (K classes; ignore pixels counted apart)."""

    pixels: np.ndarray
    images: np.ndarray
    ignored_pixels: int = 0
    masks: int = 0

    @classmethod
    def empty(cls, num_classes: int) -> ClassStats:
        return cls(np.zeros(num_classes, dtype=np.int64), np.zeros(num_classes, dtype=np.int64))

    @property
    def pixel_share(self) -> np.ndarray:
        """(K,) float64 fraction of labeled (non-ignore) pixels per class; zeros when no pixels."""
        total = self.pixels.sum()
        return self.pixels / total if total else np.zeros(len(self.pixels))

    def add(self, histogram: np.ndarray, ignore_index: int) -> None:
        num_classes = len(self.pixels)
        self.pixels += histogram[:num_classes]
        self.images += histogram[:num_classes] > 0
        self.ignored_pixels += int(histogram[ignore_index])
        self.masks += 1


@dataclass
class CheckReport:
    """Outcome of `check_dataset`; `ok` is True when no rule failed."""

    manifest: DatasetManifest
    fast: bool
    split_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (labeled, unlabeled)
    stats: dict[str, ClassStats] = field(default_factory=dict)  # "train" and each eval split name
    problems: list[Problem] = field(default_factory=list)
    images_checked: int = 0
    masks_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def rule_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for problem in self.problems:
            counts[problem.rule] = counts.get(problem.rule, 0) + 1
        return counts


@dataclass(frozen=True)
class _Item:
    image: str
    mask: str | None
    decode_image: bool
    decode_mask: bool


def _check_item(
    root: Path, item: _Item, num_classes: int, ignore_index: int, exif_orientation: bool = False
) -> tuple[list[Problem], np.ndarray | None]:
    """Checks one (image, mask) pair; returns its problems and its mask histogram (if decoded)."""
    problems: list[Problem] = []
    image_size = mask_size = histogram = None
    image_path = root / item.image
    if not image_path.is_file():
        problems.append(Problem(item.image, "missing", "image file does not exist"))
    else:
        try:
            if item.decode_image:
                image_size = read_image(image_path, exif_orientation=exif_orientation).shape[:2][::-1]
            else:
                image_size = read_size(image_path, exif_orientation=exif_orientation)[:2]
        except DataError as error:
            problems.append(Problem(item.image, "unreadable", str(error)))
    if item.mask is not None:
        mask_path = root / item.mask
        if not mask_path.is_file():
            return [*problems, Problem(item.mask, "missing", "mask file does not exist")], None
        try:
            width, height, mode = read_size(mask_path, "mask")
            if mode not in _SINGLE_CHANNEL_MODES:
                detail = f"mode {mode}; masks must hold class ids (palette or grey PNG)"
                return [*problems, Problem(item.mask, "mask-not-single-channel", detail)], None
            mask_size = (width, height)
            if item.decode_mask:
                mask = read_mask(mask_path)
                histogram = np.bincount(mask.ravel(), minlength=_HIST_BINS).astype(np.int64)
        except DataError as error:
            return [*problems, Problem(item.mask, "unreadable", str(error))], None
    if image_size is not None and mask_size is not None and tuple(image_size) != tuple(mask_size):
        detail = f"image {image_size[0]}x{image_size[1]}, mask {mask_size[0]}x{mask_size[1]}"
        problems.append(Problem(item.mask, "size-mismatch", detail))
    if histogram is not None:
        values = np.flatnonzero(histogram)
        bad = values[(values >= num_classes) & (values != ignore_index)]
        if bad.size:
            shown = ", ".join(str(v) for v in bad[:_SHOWN_BAD_VALUES])
            detail = f"values {shown} outside 0..{num_classes - 1} and {ignore_index}"
            problems.append(Problem(item.mask, "mask-values", detail))
    return problems, histogram


def _check_item_star(args: tuple) -> tuple[list[Problem], np.ndarray | None]:
    return _check_item(*args)


def _read_lists(manifest: DatasetManifest, report: CheckReport) -> tuple[dict, dict]:
    """Reads every split list; returns {train split: (labeled, unlabeled)} and {eval split: entries}."""

    def read(relpath: str, require_mask: bool, field: str) -> list[SplitEntry]:
        try:
            return read_split(manifest.split_file(relpath), require_mask=require_mask)
        except DataError as error:  # the field that names the list: what to fix in dataset.yaml
            report.problems.append(Problem(relpath, SPLIT_FILE_RULE, f"dataset.yaml field {field}: {error}"))
            return []

    train = {}
    for name, split in manifest.train_splits.items():
        labeled = read(split.labeled, True, f"train_splits.{name}.labeled")
        unlabeled = read(split.unlabeled, False, f"train_splits.{name}.unlabeled") if split.unlabeled is not None else []
        train[name] = (labeled, unlabeled)
        report.split_sizes[name] = (len(labeled), len(unlabeled))
    evals = {name: read(relpath, True, f"eval_splits.{name}") for name, relpath in manifest.eval_splits.items()}
    for name, entries in evals.items():
        report.split_sizes[name] = (len(entries), 0)
    return train, evals


def _check_membership(train: dict, evals: dict, report: CheckReport) -> None:
    for name, (labeled, unlabeled) in train.items():
        unlabeled_images = {entry.image for entry in unlabeled}
        for image in sorted({entry.image for entry in labeled} & unlabeled_images):
            report.problems.append(Problem(image, "labeled-and-unlabeled", f"in both lists of split '{name}'"))
    train_images = {entry.image for labeled, unlabeled in train.values() for entry in [*labeled, *unlabeled]}
    for name, entries in evals.items():
        for image in sorted(train_images & {entry.image for entry in entries}):
            report.problems.append(Problem(image, "train-in-eval", f"training image also in eval split '{name}'"))


def _run(tasks: list[tuple], workers: int | None, progress: Callable[[int, int], None] | None) -> Iterable:
    if workers is None:
        workers = min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS) if len(tasks) >= MIN_FILES_FOR_POOL else 1
    if workers <= 1:
        results: Iterable = map(_check_item_star, tasks)
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        results = pool.map(_check_item_star, tasks, chunksize=CHUNK_SIZE)
    try:
        for done, result in enumerate(results, start=1):
            if progress is not None:
                progress(done, len(tasks))
            yield result
    finally:
        if workers > 1:
            pool.shutdown(cancel_futures=True)


def check_dataset(
    manifest_or_dir: DatasetManifest | str | os.PathLike,
    *,
    fast: bool = False,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CheckReport:
    """Checks a prepared dataset (a manifest, a `dataset.yaml` path or its folder).

    `workers`: processes for decoding (None: one per core up to MAX_DEFAULT_WORKERS for large
    datasets, 1 for small ones); `progress(done, total)` is called after each file pair.
    Raises DataError only when the manifest itself cannot be loaded.
    """
    if isinstance(manifest_or_dir, DatasetManifest):
        manifest = manifest_or_dir
    else:
        manifest = load_manifest(manifest_or_dir)
    report = CheckReport(manifest=manifest, fast=fast)
    train, evals = _read_lists(manifest, report)
    _check_membership(train, evals, report)

    groups: dict[tuple[str, str | None], set[str]] = {}
    for labeled, _ in train.values():
        for entry in labeled:
            groups.setdefault((entry.image, entry.mask), set()).add(TRAIN_GROUP)
    for name, entries in evals.items():
        for entry in entries:
            groups.setdefault((entry.image, entry.mask), set()).add(name)
    with_masks = {image for image, _ in groups}
    for _, unlabeled in train.values():
        # Unlabeled lists may carry a mask column that is never read; only the image is checked,
        # once, and not again when a labeled list already holds it.
        for entry in unlabeled:
            if entry.image not in with_masks:
                groups.setdefault((entry.image, None), set())
    pairs = list(groups)
    with_mask = [index for index, (_, mask) in enumerate(pairs) if mask is not None]
    if fast and len(with_mask) > FAST_MASK_SAMPLE:
        sampled = {with_mask[i] for i in np.linspace(0, len(with_mask) - 1, FAST_MASK_SAMPLE).astype(int)}
    else:
        sampled = set(with_mask)
    tasks = [
        (manifest.root, _Item(image, mask, not fast, index in sampled), manifest.num_classes, manifest.ignore_index,
         manifest.exif_orientation)
        for index, (image, mask) in enumerate(pairs)
    ]
    report.stats = {TRAIN_GROUP: ClassStats.empty(manifest.num_classes)}
    report.stats.update({name: ClassStats.empty(manifest.num_classes) for name in evals})
    for pair, (problems, histogram) in zip(pairs, _run(tasks, workers, progress)):
        report.problems.extend(problems)
        report.images_checked += 1
        if histogram is not None:
            report.masks_checked += 1
            for group in groups[pair]:
                report.stats[group].add(histogram, manifest.ignore_index)
    return report


def raise_if_problems(report: CheckReport, *, listed: bool = False) -> None:
    """Raises DataError with a one-line summary naming the first offending files; no-op when ok.

    `listed`: the caller has just shown every problem (`prepare check`), so the line does not send
    the user to `prepare check` for the full list."""
    if report.ok:
        return
    # A split list's problem says which dataset.yaml field names it and where it was looked for.
    shown = "; ".join(f"{p.file} ({p.rule}): {p.detail}" if p.rule == SPLIT_FILE_RULE else f"{p.file} ({p.rule})"
                      for p in report.problems[:SUMMARY_FILES])
    more = len(report.problems) - SUMMARY_FILES
    tail = f"; and {more} more" if more > 0 else ""
    hint = " (listed above)" if listed else " (run 'allspark prepare check' for the full list)"
    raise DataError(
        f"dataset '{report.manifest.name}' at {report.manifest.root} has {plural(len(report.problems), 'problem')}: "
        f"{shown}{tail}{hint}"
    )
