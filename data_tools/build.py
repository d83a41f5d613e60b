"""The writing half of a mask builder (pascal, coco, cityscapes), implemented once.

A builder checks its sources and plans its split lists first (nothing written yet, see
common.py); then `write_build` takes steps 3 to 5 of common.py in their order: the guarded
output folder, the links to the sources, the recorded mask options, the stale temp files, the
conversion (masks kept when other files fail), the split lists and `dataset.yaml` last.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from allspark_cli.fileio import remove_stale_temps
from data_tools.common import (
    PrepareSummary,
    ProgressFn,
    Task,
    TaskResult,
    claim_mask_folder,
    convert_all,
    guarded_output,
    link_dir,
)
from data_tools.splits import SplitOutput


@dataclass(frozen=True)
class MaskFolder:
    """The builder's own mask folder and the options that determine its masks (`claim_mask_folder`
    records them there before any conversion; `overwrite` rebuilds masks made with other ones)."""

    path: Path
    builder: str
    options: Mapping[str, str]
    overwrite: bool


def write_build(
    out_dir: Path,
    splits: SplitOutput,
    *,
    name: str,
    links: Mapping[str, Path],
    convert: Callable[[Task], TaskResult],
    tasks: Sequence[Task],
    stage: str,
    manifest: Mapping[str, Any],
    mask_folder: MaskFolder | None = None,
    stale_temps: Sequence[tuple[Path, str]] = (),
    conversion_notes: Callable[[list[str]], list[str]] | None = None,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> PrepareSummary:
    """Writes the dataset folder `out_dir` and returns its summary.

    `links`: link name under `out_dir` -> source folder; `mask_folder`: where the masks go, when
    the builder writes them into `out_dir` (its options are recorded and also written to the
    manifest); `stale_temps`: other (folder, name pattern) pairs whose stale temp files go before
    the conversion; `conversion_notes`: the summary notes made of the tasks' notes (sorted);
    `manifest`: the other `dataset.yaml` fields (classes, palette, crops, evaluation mode).
    """
    with guarded_output() as guard:
        guard.make_dir(out_dir if mask_folder is None else mask_folder.path)
        for link, source in links.items():
            link_dir(source, out_dir / link, guard)
        mask_options = {}
        if mask_folder is not None:
            claim_mask_folder(mask_folder.path, mask_folder.builder, mask_folder.options,
                              overwrite=mask_folder.overwrite, guard=guard)
            remove_stale_temps(mask_folder.path)
            mask_options = {"mask_options": mask_folder.options}
        for folder, pattern in stale_temps:
            remove_stale_temps(folder, pattern)
        report = convert_all(convert, tasks, guard, stage=stage, workers=workers, progress=progress)
        if conversion_notes is not None:
            splits.notes.extend(conversion_notes(sorted(report.notes)))
        splits.write(out_dir, guard)
        splits.write_manifest(out_dir, guard, name=name, **manifest, **mask_options)
    return PrepareSummary.of_build(name, out_dir, report, splits)
