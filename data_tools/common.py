"""Shared machinery of the dataset builders: a parallel, resumable map over samples.

Every builder turns a source dataset into masks, split lists and a `dataset.yaml` (DESIGN.md
section 4). The per-sample work (read, validate, convert, write one mask) runs through
`run_parallel`, which

- spreads the samples over a process pool (`workers`, default: all cores; 1 runs in-process),
- reports progress through a callback `progress(stage, done, total)` (the CLI draws it with rich;
  the core never prints),
- collects per-file errors instead of stopping at the first one, so a user sees every broken file
  of a run at once (the first few are named in one DataError line),
- is resumable: a task whose output already exists under its final name skips the work. Outputs
  are written with `allspark_cli.fileio` (temp file + rename), so a file under its final name is
  complete; a stale temp file of an interrupted run never counts as done and is cleaned up.

`OutputGuard` undoes what a failed run created: a run that stops on bad data leaves the output as
it found it (files completed by earlier runs stay, so resumption keeps working).
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from allspark_cli.errors import DataError

# progress(stage, done, total): called from the main process as samples finish.
ProgressFn = Callable[[str, int, int], None]
TaskStatus = Literal["written", "skipped", "checked"]
Task = TypeVar("Task")

# How many failing files one error line names before it says "and N more".
MAX_REPORTED_ERRORS = 5
# Samples handed to a worker at a time: large enough to amortise pickling, small enough for a smooth bar.
CHUNK_SIZE = 8
# JPEGs are verified at 1/8 scale: the decoder still walks the whole entropy-coded stream (so a
# truncated or corrupt file fails) but skips the inverse DCT of full-size blocks.
JPEG_DRAFT_SCALE = 8
TEMP_MARKER = ".tmp"


@dataclass(frozen=True)
class TaskResult:
    """What one task did: wrote `output`, found it already complete, or only checked its inputs."""

    status: TaskStatus
    output: Path | None = None


@dataclass
class MapReport:
    """Totals of one `run_parallel` stage; `written` lists the outputs created by this run."""

    total: int = 0
    skipped: int = 0
    checked: int = 0
    written: list[Path] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class PrepareSummary:
    """What a builder produced, for the CLI summary table.

    `split_sizes` maps a manifest split name to (labeled, unlabeled) line counts (unlabeled None
    for `full` and eval splits); `notes` are the things a user should know (scaled split sizes,
    fallbacks), one sentence each.
    """

    name: str
    manifest_path: Path
    masks_written: int = 0
    masks_skipped: int = 0
    samples_checked: int = 0
    split_sizes: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def default_workers(workers: int | None) -> int:
    """`workers` if given (>= 1), else every core of the machine."""
    if workers is None:
        return max(1, os.cpu_count() or 1)
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    return workers


def _call(task_fn: Callable[[Task], TaskResult], task: Task) -> TaskResult | str:
    """Runs one task; a DataError becomes its one-line message so the run can go on."""
    try:
        return task_fn(task)
    except DataError as error:
        return str(error)


def _imap(task_fn: Callable[[Task], TaskResult], tasks: Sequence[Task], workers: int) -> Iterator[TaskResult | str]:
    if workers == 1 or len(tasks) <= 1:
        for task in tasks:
            yield _call(task_fn, task)
        return
    # "spawn" because the CLI process may hold threads (torch, rich) that a fork would copy mid-lock.
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, len(tasks))) as pool:
        call = _BoundCall(task_fn)
        yield from pool.imap_unordered(call, tasks, chunksize=CHUNK_SIZE)


@dataclass(frozen=True)
class _BoundCall:
    """Picklable `_call` with the task function bound (a lambda cannot cross process boundaries)."""

    task_fn: Callable

    def __call__(self, task: object) -> TaskResult | str:
        return _call(self.task_fn, task)


def run_parallel(
    task_fn: Callable[[Task], TaskResult],
    tasks: Sequence[Task],
    *,
    stage: str,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> MapReport:
    """Applies `task_fn` to every task, in parallel, and reports what happened.

    `task_fn` must be a module-level function (or functools.partial of one) so it can be sent to
    worker processes; it returns a TaskResult or raises DataError naming the file and the rule
    it breaks. Errors are collected, not raised: the caller decides (see `raise_if_errors`).
    """
    report = MapReport(total=len(tasks))
    if progress is not None:
        progress(stage, 0, len(tasks))
    for done, result in enumerate(_imap(task_fn, tasks, default_workers(workers)), start=1):
        if isinstance(result, str):
            report.errors.append(result)
        elif result.status == "written" and result.output is not None:
            report.written.append(result.output)
        elif result.status == "skipped":
            report.skipped += 1
        else:
            report.checked += 1
        if progress is not None:
            progress(stage, done, len(tasks))
    report.errors.sort()
    return report


def raise_if_errors(errors: Sequence[str], what: str) -> None:
    """One DataError line naming the first few problems (sorted, so the message is reproducible)."""
    if not errors:
        return
    shown = "; ".join(errors[:MAX_REPORTED_ERRORS])
    more = f" (and {len(errors) - MAX_REPORTED_ERRORS} more)" if len(errors) > MAX_REPORTED_ERRORS else ""
    raise DataError(f"{len(errors)} {what} failed: {shown}{more}")


def is_complete(path: Path) -> bool:
    """An output exists under its final name; atomic writes guarantee it is whole."""
    return path.is_file() and path.stat().st_size > 0


def remove_stale_temps(folder: Path, name_pattern: str = "*") -> int:
    """Deletes temp files `.<name>.<random>.tmp<suffix>` that an interrupted run left in `folder`.

    Only names made by `allspark_cli.fileio.atomic_path` for targets matching `name_pattern` are
    touched. Returns how many were removed.
    """
    if not folder.is_dir():
        return 0
    removed = 0
    for path in folder.glob(f".{name_pattern}.*{TEMP_MARKER}*"):
        if path.is_file():
            path.unlink()
            removed += 1
    return removed


def verify_image(path: Path) -> tuple[int, int]:
    """(height, width) of an image after decoding it completely; DataError naming the file otherwise.

    Catches missing files, non-images, corrupt and truncated files (Pillow refuses a JPEG or PNG
    cut short).
    """
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.format == "JPEG":
                image.draft("RGB", (max(1, width // JPEG_DRAFT_SCALE), max(1, height // JPEG_DRAFT_SCALE)))
            image.load()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DataError(f"image is corrupt or unreadable ({error}): {path}") from None
    return height, width


def check_same_size(mask_shape: tuple[int, ...], image_size: tuple[int, int], mask_path: Path, image_path: Path) -> None:
    """DataError when a (H, W) mask does not cover its image pixel for pixel."""
    if tuple(mask_shape[:2]) != tuple(image_size):
        raise DataError(
            f"mask size {mask_shape[1]}x{mask_shape[0]} differs from its image {image_path.name} "
            f"({image_size[1]}x{image_size[0]}): {mask_path}"
        )


def check_values(mask: np.ndarray, allowed_max: int, ignore_index: int, path: Path) -> None:
    """DataError when a mask holds values other than 0..allowed_max and `ignore_index`."""
    values = np.unique(mask)
    bad = values[(values > allowed_max) & (values != ignore_index)]
    if bad.size:
        raise DataError(
            f"mask values {bad.tolist()[:MAX_REPORTED_ERRORS]} are outside the classes "
            f"(0..{allowed_max} or {ignore_index} ignore): {path}"
        )


def require_dir(path: Path, what: str) -> Path:
    """`path` as an absolute folder; DataError naming it and what it should be otherwise."""
    if not path.is_dir():
        kind = "is not a folder" if path.exists() else "does not exist"
        raise DataError(f"{what} {kind}: {path}")
    return path.absolute()


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return path


class OutputGuard:
    """Records what a build creates, and deletes it again if the build fails on bad data.

    Files completed by earlier runs are never recorded, so they survive (resumption); an output
    folder that did not exist before the run is removed with everything in it.
    """

    def __init__(self) -> None:
        self._files: list[Path] = []
        self._dirs: list[Path] = []

    def make_dir(self, path: Path) -> Path:
        missing = []
        current = path.absolute()
        while not current.exists():
            missing.append(current)
            current = current.parent
        path.mkdir(parents=True, exist_ok=True)
        self._dirs.extend(reversed(missing))
        return path

    def add_files(self, paths: Sequence[Path]) -> None:
        self._files.extend(paths)

    def add_link(self, path: Path) -> None:
        self._files.append(path)

    def claim(self, path: Path) -> None:
        """Records `path` as created by this run if nothing exists there yet (call before writing)."""
        if not path.exists() and not path.is_symlink():
            self._files.append(path)

    def rollback(self) -> None:
        for path in reversed(self._files):
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
        for folder in reversed(self._dirs):
            if folder.is_dir():
                shutil.rmtree(folder)
        self._files.clear()
        self._dirs.clear()


@contextlib.contextmanager
def guarded_output() -> Iterator[OutputGuard]:
    """A guard that rolls back on DataError (bad data) but not on Ctrl-C (the run is resumable)."""
    guard = OutputGuard()
    try:
        yield guard
    except DataError:
        guard.rollback()
        raise


def link_dir(source: Path, link: Path, guard: OutputGuard) -> Literal["linked", "copied", "present"]:
    """Makes `link` point at the folder `source` (symlink; a copy only where symlinks are impossible).

    An existing link to the same folder is left alone; anything else under `link` is refused
    rather than replaced, since it may be the user's data.
    """
    source = source.resolve()
    if link.is_symlink() or link.exists():
        if link.resolve() == source:
            return "present"
        raise DataError(f"{link} already exists and is not a link to {source}; choose another --out folder")
    try:
        os.symlink(source, link, target_is_directory=True)
        guard.add_link(link)
        return "linked"
    except OSError:
        staging = link.with_name(f".{link.name}{TEMP_MARKER}")
        if staging.exists():
            shutil.rmtree(staging)
        shutil.copytree(source, staging)
        os.replace(staging, link)
        guard.add_link(link)
        return "copied"
