"""Split files: the lists of samples that a dataset manifest points to (DESIGN.md section 4).

Format: one sample a line, ``image_relpath mask_relpath`` separated by white space, both relative
to the dataset root. Unlabeled lists may carry a single image column (the reference's unlabeled
lists have the mask column too; it is never read). Blank lines are skipped; paths cannot contain
spaces, and absolute paths are refused so that a dataset folder can be moved as a whole.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from allspark_cli.errors import DataError
from allspark_cli.fileio import atomic_write_text

# A line holds the image path and, optionally, the mask path.
MAX_COLUMNS = 2


class SplitEntry(NamedTuple):
    """One sample of a split: paths relative to the dataset root; `mask` is None for image-only lines."""

    image: str
    mask: str | None


def _parse_line(path: Path, number: int, line: str, require_mask: bool) -> SplitEntry:
    columns = line.split()
    if len(columns) > MAX_COLUMNS:
        raise DataError(
            f"{path}:{number}: expected 'image_path [mask_path]', got {len(columns)} columns: {line.strip()!r}"
        )
    for column in columns:
        if PurePosixPath(column).is_absolute() or os.path.isabs(column):
            raise DataError(f"{path}:{number}: paths must be relative to the dataset root, got {column!r}")
    if require_mask and len(columns) < MAX_COLUMNS:
        raise DataError(
            f"{path}:{number}: this split needs a mask column ('image_path mask_path'), got {line.strip()!r}"
        )
    return SplitEntry(columns[0], columns[1] if len(columns) == MAX_COLUMNS else None)


def read_split(path: str | os.PathLike, *, require_mask: bool = False) -> list[SplitEntry]:
    """Reads a split file into entries in file order.

    Raises DataError naming the file (and the line number) when the file is missing, unreadable,
    empty, has a line with more than two columns or an absolute path, or - with `require_mask` -
    a line without a mask column.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read split file {path}: {error}") from None
    entries = [
        _parse_line(path, number, line, require_mask)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]
    if not entries:
        raise DataError(f"split file is empty: {path}")
    return entries


def format_split(entries: Iterable[SplitEntry]) -> str:
    """The text of a split file: one 'image mask' (or 'image') line per entry."""
    lines = []
    for entry in entries:
        for column in (entry.image, entry.mask):
            if column is not None and any(char.isspace() for char in column):
                raise DataError(f"split paths cannot contain white space: {column!r}")
        lines.append(entry.image if entry.mask is None else f"{entry.image} {entry.mask}")
    return "".join(f"{line}\n" for line in lines)


def write_split(path: str | os.PathLike, entries: Iterable[SplitEntry]) -> None:
    """Atomically writes a split file (see `format_split`)."""
    atomic_write_text(path, format_split(entries))
