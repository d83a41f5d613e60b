"""Shared machinery of the dataset builders: the steps every builder takes, implemented once.

Every builder turns a source dataset into masks, split lists and a `dataset.yaml` (DESIGN.md
section 4), in the same order:

1. check the sources and plan the split lists (reference lists included) before writing anything;
2. `refuse_out_inside_sources`: the output never lies inside a source folder (sources are never
   modified);
3. `guarded_output()`: the output folder, links to the sources, `claim_mask_folder` (the options
   that determine the masks are recorded, a rerun with other options is refused or rebuilt with
   --overwrite), `allspark_cli.fileio.remove_stale_temps`;
4. `convert_all`: the per-sample work (read, validate, convert, write one mask) through
   `run_parallel`, which
   - spreads the samples over a process pool (`workers`, default: all cores; 1 runs in-process),
   - reports progress through a callback `progress(stage, done, total)` (the CLI draws it with
     rich; the core never prints),
   - collects per-file errors instead of stopping at the first one, so a user sees every broken
     file of a run at once, and keeps every mask converted correctly (the rerun skips them),
   - is resumable: a task whose output already exists under its final name skips the work.
     Outputs are written with `write_output` (temp file + rename), so a file under its final name
     is complete; a stale temp file of an interrupted run never counts as done and is cleaned up,
   - stops cleanly on SIGINT/SIGTERM/SIGHUP, sent to the main process or its whole process group
     (the pool workers ignore them, `allspark_cli.signals`): Interrupted, exit 130, with the
     resume hint; and on the first failed write (disk full, permission lost): WriteError, exit 6;
5. the split lists, then `dataset.yaml` last (its presence marks a complete build).

`OutputGuard` undoes what a failed run created, except the masks it converted correctly.
"""
from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import contextlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from allspark_cli.data.manifest import MANIFEST_NAME
from allspark_cli.errors import AllsparkError, DataError, Interrupted, SettingsError, WriteError
from allspark_cli.fileio import TEMP_MARKER, atomic_write_bytes
from allspark_cli.signals import StopRequest, ignore_stop_signals, start_resource_tracker_immune_to_stops
from allspark_cli.text import plural

# COCO's crowd regions: class background (as the reference) or the ignore value (data_tools/coco.py).
CrowdMode = Literal["background", "ignore"]

# progress(stage, done, total): called from the main process as samples finish.
ProgressFn = Callable[[str, int, int], None]
TaskStatus = Literal["written", "skipped", "checked"]
Task = TypeVar("Task")

# How many failing files one error line names before it says "and N more".
MAX_REPORTED_ERRORS = 5
# Samples handed to a worker at a time: large enough to amortise pickling, small enough for a smooth bar
# and for a quick stop (a stop waits for the chunks in progress).
CHUNK_SIZE = 8
# How often the main process looks at the stop flag while it waits for the pool (seconds).
STOP_POLL_S = 0.2
RESUME_HINT = "rerun the same command to continue"
# Beside the masks it describes, so deleting the mask folder deletes its record too.
MASK_RECORD_NAME = ".allspark-masks.json"
MASK_RECORD_FORMAT = 1


@dataclass(frozen=True)
class TaskResult:
    """What one task did: wrote `output`, found it already complete, or only checked its inputs.

    `note`: something the user should hear about this sample although it succeeded (e.g. an
    existing output that failed verification and was rebuilt)."""

    status: TaskStatus
    output: Path | None = None
    note: str | None = None


@dataclass
class MapReport:
    """Totals of one `run_parallel` stage; `written` lists the outputs created by this run,
    `skipped_outputs` the outputs that were already complete."""

    total: int = 0
    skipped: int = 0
    written: list[Path] = field(default_factory=list)
    skipped_outputs: list[Path] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    write_errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def kept(self) -> int:
        """Outputs that are complete now: written by this run or by an earlier one."""
        return len(self.written) + self.skipped

    def add(self, result: TaskResult | DataError | WriteError) -> None:
        if isinstance(result, WriteError):
            self.write_errors.append(str(result))
            return
        if isinstance(result, DataError):
            self.errors.append(str(result))
            return
        if result.note is not None:
            self.notes.append(result.note)
        if result.status == "written" and result.output is not None:
            self.written.append(result.output)
        elif result.status == "skipped":
            self.skipped += 1
            if result.output is not None:
                self.skipped_outputs.append(result.output)


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

    @classmethod
    def of_build(cls, name: str, out_dir: Path, report, splits, **counts: int) -> PrepareSummary:
        """The summary of a finished build: its masks (`report` of convert_all) and split lists."""
        return cls(name=name, manifest_path=out_dir / MANIFEST_NAME, masks_written=len(report.written),
                   masks_skipped=report.skipped, split_sizes=splits.sizes, notes=splits.notes, **counts)


def default_workers(workers: int | None) -> int:
    """`workers` if given (>= 1), else every core of the machine."""
    if workers is None:
        return max(1, os.cpu_count() or 1)
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    return workers


def _call(task_fn: Callable[[Task], TaskResult], task: Task) -> TaskResult | DataError | WriteError:
    """Runs one task; a DataError or WriteError is returned (it pickles by its message) so the main
    process decides."""
    try:
        return task_fn(task)
    except (DataError, WriteError) as error:
        return error


@dataclass(frozen=True)
class _ChunkCall:
    """Picklable: runs `task_fn` over a chunk of tasks in a worker (a lambda cannot cross processes)."""

    task_fn: Callable

    def __call__(self, chunk: Sequence[object]) -> list[TaskResult | DataError | WriteError]:
        return [_call(self.task_fn, task) for task in chunk]


class _Stopped(Exception):
    """Internal: the run must end now (a stop signal or a failed write); `error` says why."""

    def __init__(self, error: AllsparkError) -> None:
        super().__init__(str(error))
        self.error = error


def _output_noun(stage: str) -> str:
    """One output of a conversion stage: its bar names the outputs in the plural ('trainId masks')."""
    return stage.removesuffix("s")


def _stop_error(stopped: bool, report: MapReport, stage: str, counts_outputs: bool) -> AllsparkError | None:
    """The error that ends the run now, if any: a failed write first (it names the cause), then a stop."""
    kept = f" ({plural(report.kept, _output_noun(stage))} kept)" if counts_outputs else ""
    if report.write_errors:
        return WriteError(f"{sorted(report.write_errors)[0]}; {RESUME_HINT} once the cause is fixed{kept}")
    if stopped:
        return Interrupted(f"interrupted; {RESUME_HINT}{kept}")
    return None


def _run_in_process(task_fn, tasks, report: MapReport, on_done: Callable[[int], None], check: Callable[[], None]) -> None:
    for task in tasks:
        report.add(_call(task_fn, task))
        on_done(1)
        check()


def _run_in_pool(
    task_fn, tasks, workers: int, report: MapReport, on_done: Callable[[int], None], check: Callable[[], None]
) -> None:
    chunks = [tasks[start:start + CHUNK_SIZE] for start in range(0, len(tasks), CHUNK_SIZE)]
    start_resource_tracker_immune_to_stops()
    # "spawn" because the CLI process may hold threads (torch, rich) that a fork would copy mid-lock.
    # The workers ignore stop signals: a stop sent to the whole process group reaches the main
    # process's handler, which ends the pool after the chunks in progress.
    executor = concurrent.futures.ProcessPoolExecutor(
        max_workers=min(workers, len(chunks)), mp_context=multiprocessing.get_context("spawn"),
        initializer=ignore_stop_signals,
    )
    pending = {executor.submit(_ChunkCall(task_fn), chunk) for chunk in chunks}
    try:
        while pending:
            done, pending = concurrent.futures.wait(pending, timeout=STOP_POLL_S, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                results = future.result()
                for result in results:
                    report.add(result)
                on_done(len(results))
            check()
    except (KeyboardInterrupt, concurrent.futures.process.BrokenProcessPool):
        # a second Ctrl-C, or a worker killed from outside (e.g. by the OOM killer): no waiting
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    except _Stopped:
        # Wait for the chunks in progress (their files are complete, or absent) and count them.
        executor.shutdown(wait=True, cancel_futures=True)
        for future in pending:
            if future.done() and not future.cancelled() and future.exception() is None:
                for result in future.result():
                    report.add(result)
        raise
    executor.shutdown(wait=True)


def run_parallel(
    task_fn: Callable[[Task], TaskResult],
    tasks: Sequence[Task],
    *,
    stage: str,
    workers: int | None = None,
    progress: ProgressFn | None = None,
    counts_outputs: bool = True,
) -> MapReport:
    """Applies `task_fn` to every task, in parallel, and reports what happened.

    `task_fn` must be a module-level function (or functools.partial of one) so it can be sent to
    worker processes; it returns a TaskResult or raises DataError naming the file and the rule
    it breaks, or WriteError when it cannot write its output. DataErrors are collected, not
    raised: the caller decides (see `convert_all`). A WriteError, or a stop signal, ends the run
    at once: the chunks in progress finish, the rest is not started, and WriteError (exit 6) or
    Interrupted (exit 130) is raised with the resume hint and, with `counts_outputs`, how many
    outputs of `stage` are complete.
    """
    tasks = list(tasks)
    report = MapReport(total=len(tasks))
    done = 0

    def on_done(count: int = 1) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(stage, done, len(tasks))

    if progress is not None:
        progress(stage, 0, len(tasks))
    workers = default_workers(workers)
    stop = StopRequest()
    with stop.installed():

        def check() -> None:
            error = _stop_error(stop.requested, report, stage, counts_outputs)
            if error is not None:
                raise _Stopped(error)

        try:
            if workers == 1 or len(tasks) <= 1:
                _run_in_process(task_fn, tasks, report, on_done, check)
            else:
                _run_in_pool(task_fn, tasks, workers, report, on_done, check)
        except _Stopped as stopped:
            # named after the chunks in progress were counted
            raise (_stop_error(stop.requested, report, stage, counts_outputs) or stopped.error) from None
        except KeyboardInterrupt:  # a second Ctrl-C
            raise _stop_error(True, report, stage, counts_outputs) from None
    report.errors.sort()
    return report


def raise_if_errors(errors: Sequence[str], what: str, *, suffix: str = "") -> None:
    """One DataError line naming the first few problems (sorted, so the message is reproducible);
    `what` names one failing item ('file': '1 file failed', '3 files failed')."""
    if not errors:
        return
    shown = "; ".join(errors[:MAX_REPORTED_ERRORS])
    more = f" (and {len(errors) - MAX_REPORTED_ERRORS} more)" if len(errors) > MAX_REPORTED_ERRORS else ""
    raise DataError(f"{plural(len(errors), what)} failed: {shown}{more}{suffix}")


def convert_all(
    task_fn: Callable[[Task], TaskResult],
    tasks: Sequence[Task],
    guard: OutputGuard,
    *,
    stage: str,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> MapReport:
    """`run_parallel` for a builder's conversion stage: every output written correctly is kept.

    Bad files are reported all together in one DataError (exit 3) that says how many outputs are
    complete and kept, so the rerun after fixing them converts only what is left.
    """
    report = run_parallel(task_fn, tasks, stage=stage, workers=workers, progress=progress)
    guard.keep(report.written)
    if report.errors:
        raise_if_errors(
            report.errors, _output_noun(stage),
            suffix=f"; {plural(report.kept, _output_noun(stage))} complete and kept: fix these files and {RESUME_HINT}",
        )
    return report


def write_error(path: Path, error: OSError) -> WriteError:
    """WriteError naming the file and the cause (disk full, permission denied, read-only, ...)."""
    return WriteError(f"could not write {path}: {error.strerror or error}")


@contextlib.contextmanager
def named_write_errors(path: Path) -> Iterator[None]:
    """Turns an OSError of the block into a WriteError naming `path` (exit 6)."""
    try:
        yield
    except OSError as error:
        raise write_error(path, error) from None


def write_output(path: Path, data: bytes) -> None:
    """Writes an output file atomically (temp file + rename); WriteError naming it if that fails.

    A failed write leaves no file under the final name (the temp file is removed), so it is never
    counted as complete."""
    with named_write_errors(path):
        atomic_write_bytes(path, data)


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


def refuse_out_inside_sources(out_dir: Path, sources: Mapping[str, Path | None]) -> None:
    """SettingsError when `--out` is a source folder or lies inside one (sources are never modified).

    `sources` maps a name the user recognises ('--voc-root', '--images') to its folder; symlinks
    are resolved, so a link into a source is caught too."""
    out = out_dir.resolve()
    for option, source in sources.items():
        if source is None:
            continue
        folder = source.resolve()
        if out == folder or out.is_relative_to(folder):
            raise SettingsError(
                f"--out {out_dir} lies inside the source folder {option} {source}; sources are never "
                "modified: choose an output folder outside it"
            )


def claim_mask_folder(folder: Path, builder: str, options: Mapping[str, str], *, overwrite: bool, guard: OutputGuard) -> None:
    """Records in `folder` the options that determine its masks, before any mask is converted.

    A folder holding masks made with other options (or with no record, e.g. by an older version)
    is refused (SettingsError, exit 2), since its complete masks would be skipped and kept as they
    are; with `overwrite` its masks are deleted first and rebuilt. The record is written after the
    deletion, so an interrupted --overwrite still refuses the rerun without --overwrite.
    """
    record_path = folder / MASK_RECORD_NAME
    wanted = {"format": MASK_RECORD_FORMAT, "builder": builder, "options": dict(options)}
    existing_masks = sorted(p for p in folder.glob("*.png") if p.is_file() and not p.name.startswith("."))  # no temp files
    recorded = _read_record(record_path)
    if recorded == wanted and not overwrite:
        guard.note_record(record_path, existed=True)
        return
    if existing_masks and not overwrite:
        if recorded is None:
            why = "have no record of the options they were made with (made by an older version?)"
        else:
            changed = [f"{key} {recorded.get('options', {}).get(key)!r} -> {value!r}" for key, value in options.items()
                       if recorded.get("options", {}).get(key) != value] or ["format"]
            why = f"were made with other options ({', '.join(changed)})"
        raise SettingsError(
            f"the {len(existing_masks)} masks in {folder} {why}; rerun with --overwrite to rebuild them, or with the "
            "options they were made with, or choose another --out folder"
        )
    for mask in existing_masks:
        with named_write_errors(mask):
            mask.unlink()
    existed = record_path.is_file()
    write_output(record_path, (json.dumps(wanted, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    guard.note_record(record_path, existed=existed)


def _read_record(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return content if isinstance(content, dict) else None


def mask_options(folder: Path) -> dict[str, str] | None:
    """The options recorded by `claim_mask_folder` in `folder` (None without a record)."""
    recorded = _read_record(folder / MASK_RECORD_NAME)
    return None if recorded is None else dict(recorded.get("options", {}))


class OutputGuard:
    """Records what a build creates, and deletes it again if the build fails on bad data.

    Files completed by earlier runs are never recorded, so they survive (resumption); outputs
    marked with `keep` (masks converted correctly) survive too, with the folders holding them and
    the mask record; everything else this run created, folders included, is removed.
    """

    def __init__(self) -> None:
        self._files: list[Path] = []
        self._dirs: list[Path] = []
        self._kept: list[Path] = []
        self._record: Path | None = None
        self._keep_record = False

    def make_dir(self, path: Path) -> Path:
        missing = []
        current = path.absolute()
        while not current.exists():
            missing.append(current)
            current = current.parent
        with named_write_errors(path):
            path.mkdir(parents=True, exist_ok=True)
        self._dirs.extend(reversed(missing))
        return path

    def add_link(self, path: Path) -> None:
        self._files.append(path)

    def keep(self, paths: Sequence[Path]) -> None:
        """Outputs that stay even if the build fails later (they are correct and complete)."""
        self._kept.extend(path.absolute() for path in paths)
        if paths:
            self._keep_record = True

    def note_record(self, path: Path, *, existed: bool) -> None:
        """The mask record: removed on failure unless it existed before or masks are kept."""
        self._record = path
        self._keep_record = self._keep_record or existed

    def claim(self, path: Path) -> None:
        """Records `path` as created by this run if nothing exists there yet (call before writing)."""
        if not path.exists() and not path.is_symlink():
            self._files.append(path)

    def rollback(self) -> None:
        kept = set(self._kept)
        if self._record is not None and not self._keep_record:
            self._files.append(self._record)
        if self._record is not None and self._keep_record:
            kept.add(self._record.absolute())
        for path in reversed(self._files):
            if path.absolute() in kept:
                continue
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
        for folder in reversed(self._dirs):
            if folder.is_dir() and not any(path.is_relative_to(folder) for path in kept):
                shutil.rmtree(folder)
        self._files.clear()
        self._dirs.clear()


@contextlib.contextmanager
def guarded_output() -> Iterator[OutputGuard]:
    """A guard that rolls back on DataError (bad data) but not on a stop or a failed write (the run
    is resumable and what it wrote is complete)."""
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
        with named_write_errors(link):
            if staging.exists():
                shutil.rmtree(staging)
            shutil.copytree(source, staging)
            os.replace(staging, link)
        guard.add_link(link)
        return "copied"
