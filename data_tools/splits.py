"""Training split lists: drawn with a seed, or imported from a folder of reference split files.

A training split is a folder `splits/<folder>/` with `labeled.txt` and `unlabeled.txt`
(format: `allspark_cli.data.splits`), the layout of the reference's `splits/<dataset>/<name>/`.
Folder names follow the reference: `92`, `1_16`, `u2pl/1_16`; manifest names are what users and
presets type: `92`, `aug-1/16`, `u2pl-1/16`, `1/16`.

Drawn splits: the labeled samples are a prefix of one seeded permutation of the pool, so with one
seed the splits of a family are nested (1/16 inside 1/8 inside 1/4 ...) and every sample lands in
exactly one of labeled / unlabeled. A ratio r of n samples labels ceil(r * n) of them, which gives
the reference's counts (1/16 of 10,582 = 662, 1/512 of 118,287 = 232, 1/16 of 2,975 = 186).
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from allspark_cli.data.manifest import MANIFEST_NAME, DatasetManifest, TrainSplit, write_manifest
from allspark_cli.data.splits import SplitEntry, format_split, read_split
from allspark_cli.errors import DataError, SettingsError
from allspark_cli.fileio import atomic_write_bytes
from data_tools.common import OutputGuard

SPLITS_DIR = "splits"
LABELED_FILE = "labeled.txt"
UNLABELED_FILE = "unlabeled.txt"
VAL_FILE = "val.txt"


@dataclass(frozen=True)
class SplitSpec:
    """One training split to produce.

    name: manifest key ("aug-1/16"); folder: path under `splits/` ("1_16"); pool: the family's
    candidate samples for labels; count: labeled samples wanted (already scaled to the data).
    """

    name: str
    folder: str
    pool: str
    count: int


def parse_ratio(text: str) -> Fraction:
    """'1/8', '1_8' or '0.125' -> Fraction(1, 8); SettingsError unless 0 < ratio <= 1."""
    try:
        ratio = Fraction(text.replace("_", "/").strip())
    except (ValueError, ZeroDivisionError):
        raise SettingsError(f"ratio must look like 1/8 or 0.125, got {text!r}") from None
    if not 0 < ratio <= 1:
        raise SettingsError(f"ratio must be in (0, 1], got {text!r}")
    return ratio


def ratio_name(ratio: Fraction) -> str:
    """Fraction(1, 16) -> '1/16' (the manifest spelling)."""
    return f"{ratio.numerator}/{ratio.denominator}"


def ratio_folder(ratio: Fraction) -> str:
    """Fraction(1, 16) -> '1_16' (the reference's folder spelling)."""
    return f"{ratio.numerator}_{ratio.denominator}"


def count_for_ratio(ratio: Fraction, total: int) -> int:
    """Labeled samples for a ratio of `total`: ceil(ratio * total), at least 1 when total > 0."""
    if total <= 0:
        return 0
    return max(1, math.ceil(ratio * total))


def scaled_count(named: int, reference_total: int, available: int) -> int:
    """A named split size (92 of 1,464) kept as-is when the pool has enough samples, else scaled."""
    if named <= available:
        return named
    return count_for_ratio(Fraction(named, reference_total), available)


def _family_seed(seed: int, family: str) -> int:
    # crc32, not hash(): Python salts str hashes per process, and splits must be reproducible.
    return (seed << 32) ^ zlib.crc32(family.encode("utf-8"))


def draw_labeled(pool: Sequence[str], count: int, *, seed: int, family: str) -> list[str]:
    """The first `count` ids of a seeded permutation of `pool` (nested for growing counts), sorted.

    The permutation depends on the sorted pool, the seed and the family name only, so it is the
    same on every machine and independent of file-system order.
    """
    if seed < 0:
        raise SettingsError(f"seed must be >= 0, got {seed}")
    if count > len(pool):
        raise DataError(f"split family {family!r}: {count} labeled samples wanted, only {len(pool)} available")
    ordered = sorted(pool)
    order = np.random.default_rng(_family_seed(seed, family)).permutation(len(ordered))
    return sorted(ordered[index] for index in order[:count])


@dataclass
class SplitOutput:
    """Split files planned in memory, written together once every check has passed.

    files: path under the dataset root -> exact bytes; sizes: manifest split name ->
    (labeled, unlabeled) counts (unlabeled None for eval splits and `full`).
    """

    files: dict[str, bytes] = field(default_factory=dict)
    train_splits: dict[str, TrainSplit] = field(default_factory=dict)
    eval_splits: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add_train(
        self, name: str, folder: str, labeled: Sequence[SplitEntry], unlabeled: Sequence[SplitEntry] | None
    ) -> None:
        """Plans `splits/<folder>/labeled.txt` (+ `unlabeled.txt`; None means the `full` split)."""
        if not labeled:
            raise DataError(f"split {name}: no labeled samples (the dataset is too small for this split)")
        if unlabeled is not None and not unlabeled:
            self.notes.append(f"split {name} left out: every training sample is labeled, none is left unlabeled")
            return
        self.add_train_bytes(
            name,
            folder,
            format_split(labeled).encode("utf-8"),
            None if unlabeled is None else format_split(unlabeled).encode("utf-8"),
            (len(labeled), None if unlabeled is None else len(unlabeled)),
        )

    def add_train_bytes(
        self, name: str, folder: str, labeled: bytes, unlabeled: bytes | None, counts: tuple[int, int | None]
    ) -> None:
        base = Path(SPLITS_DIR) / folder
        self.files[(base / LABELED_FILE).as_posix()] = labeled
        unlabeled_path = None
        if unlabeled is not None:
            unlabeled_path = (base / UNLABELED_FILE).as_posix()
            self.files[unlabeled_path] = unlabeled
        self.train_splits[name] = TrainSplit(labeled=(base / LABELED_FILE).as_posix(), unlabeled=unlabeled_path)
        self.sizes[name] = counts

    def add_eval(self, name: str, entries: Sequence[SplitEntry] | bytes, count: int | None = None) -> None:
        """Plans `splits/<name>.txt` from entries (or the exact bytes of an imported file)."""
        data = entries if isinstance(entries, bytes) else format_split(entries).encode("utf-8")
        total = count if isinstance(entries, bytes) else len(entries)
        if not total:
            raise DataError(f"eval split {name}: no samples")
        relpath = (Path(SPLITS_DIR) / f"{name}.txt").as_posix()
        self.files[relpath] = data
        self.eval_splits[name] = relpath
        self.sizes[name] = (total, None)

    def write(self, root: Path, guard: OutputGuard) -> None:
        """Writes every planned file atomically under `root` (the guard records new ones)."""
        for relpath, data in self.files.items():
            guard.claim(root / relpath)
            atomic_write_bytes(root / relpath, data)

    def write_manifest(self, root: Path, guard: OutputGuard, *, palette, **fields) -> DatasetManifest:
        """Writes `root/dataset.yaml` for these splits, last (its presence marks a complete build).

        `palette`: (K, 3) colours; `fields`: the other DatasetManifest fields (name, classes, crops,
        evaluation mode)."""
        manifest = DatasetManifest(
            root=root,
            palette=[tuple(int(v) for v in colour) for colour in palette],
            train_splits=self.train_splits,
            eval_splits=self.eval_splits,
            **fields,
        )
        guard.claim(root / MANIFEST_NAME)
        write_manifest(manifest, root / MANIFEST_NAME)
        return manifest


def resolve_reference_folder(source: Path, dataset: str) -> Path:
    """The folder holding `<name>/labeled.txt`: `source/<dataset>` when present, else `source`."""
    if not source.is_dir():
        raise DataError(f"--splits-from folder does not exist: {source}")
    nested = source / dataset
    return nested if nested.is_dir() else source


def check_reference_files(folder: Path, specs: Sequence[SplitSpec]) -> None:
    """DataError listing every reference split file that is missing (all at once, not one by one)."""
    missing = [
        f"{spec.folder}/{filename}"
        for spec in specs
        for filename in (LABELED_FILE, UNLABELED_FILE)
        if not (folder / spec.folder / filename).is_file()
    ]
    if missing:
        raise DataError(f"reference split folder {folder} lacks {len(missing)} file(s): {', '.join(missing)}")


def _check_entries(path: Path, entries: Sequence[SplitEntry], known: frozenset[str]) -> None:
    for number, entry in enumerate(entries, start=1):
        for column in (entry.image, entry.mask):
            if column is not None and column not in known:
                raise DataError(f"{path}:{number}: {column} does not exist in the prepared dataset")


def read_reference_split(source: Path, known: frozenset[str]) -> tuple[bytes, int]:
    """Exact bytes and sample count of a reference split file, after checking every line.

    `known` holds every image and mask path (relative to the dataset root) that exists, so a
    line pointing nowhere is refused with its file and line number.
    """
    entries = read_split(source)
    _check_entries(source, entries, known)
    return source.read_bytes(), len(entries)


def import_train_split(
    output: SplitOutput, folder: Path, spec: SplitSpec, known: frozenset[str], *, strict_counts: bool
) -> None:
    """Plans one reference split, byte for byte, into `output`.

    With `strict_counts` (the dataset has its full size) a labeled count other than the named one
    is an error (the folder holds other splits than its names say); otherwise it becomes a note.
    """
    labeled, labeled_count = read_reference_split(folder / spec.folder / LABELED_FILE, known)
    unlabeled, unlabeled_count = read_reference_split(folder / spec.folder / UNLABELED_FILE, known)
    if labeled_count != spec.count:
        message = (
            f"split {spec.name}: {folder / spec.folder / LABELED_FILE} has {labeled_count} labeled samples, "
            f"expected {spec.count}"
        )
        if strict_counts:
            raise DataError(message)
        output.notes.append(message)
    output.add_train_bytes(spec.name, spec.folder, labeled, unlabeled, (labeled_count, unlabeled_count))


def import_or_draw_splits(
    output: SplitOutput,
    specs: Sequence[SplitSpec],
    pools: dict[str, Sequence[str]],
    unlabeled_pool: Sequence[str],
    entry_of: Callable[[str], SplitEntry],
    *,
    seed: int,
    reference: Path | None,
    known: frozenset[str],
    strict_counts: bool,
) -> None:
    """Fills `output` with every spec: imported from `reference` when given, else drawn with `seed`.

    Drawn splits label `spec.count` ids of `pools[spec.pool]`; the unlabeled list is every id of
    `unlabeled_pool` that is not labeled.
    """
    if reference is not None:
        check_reference_files(reference, specs)
        for spec in specs:
            import_train_split(output, reference, spec, known, strict_counts=strict_counts)
        return
    for spec in specs:
        labeled = set(draw_labeled(pools[spec.pool], spec.count, seed=seed, family=spec.pool))
        unlabeled = [entry_of(sample) for sample in sorted(unlabeled_pool) if sample not in labeled]
        output.add_train(spec.name, spec.folder, [entry_of(sample) for sample in sorted(labeled)], unlabeled)
