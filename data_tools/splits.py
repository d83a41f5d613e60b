"""Training split lists: drawn with a seed, or imported from a folder of reference split files.

A training split is a folder `splits/<folder>/` with `labeled.txt` and `unlabeled.txt`
(format: `allspark_cli.data.splits`), the layout of the reference's `splits/<dataset>/<name>/`.
Folder names follow the reference: `92`, `1_16`, `u2pl/1_16`; manifest names are what users and
presets type: `92`, `aug-1/16`, `u2pl-1/16`, `1/16`.

Imported splits (`--splits-from`): the reference's files are copied byte for byte, after every line
of every file has been checked against the files the dataset will hold (all missing files are
named in one error, before any mask is converted). The published folders are read as they are
(`u2pl_1_16` for our `u2pl/1_16`); a folder may hold a subset of the splits (the others are left
out, with a note); an empty `unlabeled.txt` (as published for COCO) stands for every training
sample that is not labeled.

Every plan is checked for leaks before it is written: no sample is both labeled and unlabeled in
a split, and no evaluation sample is in any training list.

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
from data_tools.common import MAX_REPORTED_ERRORS, OutputGuard, named_write_errors

SPLITS_DIR = "splits"
LABELED_FILE = "labeled.txt"
UNLABELED_FILE = "unlabeled.txt"
VAL_FILE = "val.txt"


@dataclass(frozen=True)
class SplitSpec:
    """One training split to produce.

    name: manifest key ("aug-1/16"); folder: path under `splits/` ("1_16"); pool: the family's
    candidate samples for labels; count: labeled samples wanted (already scaled to the data);
    published_folders: other names of the folder in published split collections ("u2pl_1_16").
    """

    name: str
    folder: str
    pool: str
    count: int
    published_folders: tuple[str, ...] = ()


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
    # image column of every planned list (path under the dataset root -> images), for the leak check
    images: dict[str, list[str]] = field(default_factory=dict)

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
            (format_split(labeled).encode("utf-8"), [entry.image for entry in labeled]),
            None if unlabeled is None else (format_split(unlabeled).encode("utf-8"), [entry.image for entry in unlabeled]),
        )

    def add_train_bytes(
        self, name: str, folder: str, labeled: tuple[bytes, list[str]], unlabeled: tuple[bytes, list[str]] | None
    ) -> None:
        """Plans a split from the exact bytes of its lists, each with the images it names."""
        base = Path(SPLITS_DIR) / folder
        labeled_path = (base / LABELED_FILE).as_posix()
        self.files[labeled_path], self.images[labeled_path] = labeled
        unlabeled_path = None
        if unlabeled is not None:
            unlabeled_path = (base / UNLABELED_FILE).as_posix()
            self.files[unlabeled_path], self.images[unlabeled_path] = unlabeled
        self.train_splits[name] = TrainSplit(labeled=labeled_path, unlabeled=unlabeled_path)
        self.sizes[name] = (len(labeled[1]), None if unlabeled is None else len(unlabeled[1]))

    def add_eval(self, name: str, entries: Sequence[SplitEntry], data: bytes | None = None) -> None:
        """Plans `splits/<name>.txt` from entries (written as `data` when given: an imported file's bytes)."""
        if not entries:
            raise DataError(f"eval split {name}: no samples")
        relpath = (Path(SPLITS_DIR) / f"{name}.txt").as_posix()
        self.files[relpath] = format_split(entries).encode("utf-8") if data is None else data
        self.images[relpath] = [entry.image for entry in entries]
        self.eval_splits[name] = relpath
        self.sizes[name] = (len(entries), None)

    def check_no_leaks(self) -> None:
        """DataError naming the samples that are both labeled and unlabeled in a split, or both
        evaluated and trained on (any training list), file by file."""
        problems = []
        for name, split in self.train_splits.items():
            if split.unlabeled is not None:
                both = set(self.images[split.labeled]) & set(self.images[split.unlabeled])
                problems += _overlap(f"split {name}: labeled and unlabeled", both)
        for eval_name, eval_path in self.eval_splits.items():
            evaluated = set(self.images[eval_path])
            for name, split in self.train_splits.items():
                trained = set(self.images[split.labeled]) | set(self.images.get(split.unlabeled or "", []))
                problems += _overlap(f"{eval_name} and training split {name}", evaluated & trained)
        if problems:
            raise DataError("validation or unlabeled samples would leak into training: " + "; ".join(problems))

    def write(self, root: Path, guard: OutputGuard) -> None:
        """Writes every planned file atomically under `root` (the guard records new ones)."""
        for relpath, data in self.files.items():
            guard.claim(root / relpath)
            with named_write_errors(root / relpath):
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
        with named_write_errors(root / MANIFEST_NAME):
            write_manifest(manifest, root / MANIFEST_NAME)
        return manifest


def _overlap(what: str, samples: set[str]) -> list[str]:
    if not samples:
        return []
    shown = sorted(samples)[:MAX_REPORTED_ERRORS]
    more = f" and {len(samples) - len(shown)} more" if len(samples) > len(shown) else ""
    return [f"{what} share {len(samples)} sample(s): {', '.join(shown)}{more}"]


def resolve_reference_folder(source: Path, dataset: str) -> Path:
    """The folder holding `<name>/labeled.txt`: `source/<dataset>` when present, else `source`."""
    if not source.is_dir():
        raise DataError(f"--splits-from folder does not exist: {source}")
    nested = source / dataset
    return nested if nested.is_dir() else source


@dataclass(frozen=True)
class ReferenceList:
    """One list of a reference folder, read and parsed: exact bytes and entries in file order."""

    path: Path
    data: bytes
    entries: list[SplitEntry]


def _read_reference_list(path: Path) -> ReferenceList:
    """An empty file is an empty list here (the published COCO unlabeled lists are empty)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read split file {path}: {error.strerror or error}") from None
    entries = read_split(path) if data.strip() else []
    return ReferenceList(path, data, entries)


def find_reference_splits(folder: Path, specs: Sequence[SplitSpec]) -> tuple[dict[str, Path], list[str]]:
    """spec name -> its folder inside `folder` (our name or a published one), for the splits present.

    A folder may hold a subset of the splits: the others are left out, said in a note. DataError
    listing every split folder with only one of its two lists, or when no split is there at all.
    """
    found: dict[str, Path] = {}
    incomplete = []
    for spec in specs:
        for name in (spec.folder, *spec.published_folders):
            candidate = folder / name
            present = [(candidate / filename).is_file() for filename in (LABELED_FILE, UNLABELED_FILE)]
            if all(present):
                found[spec.name] = candidate
                break
            if any(present):
                missing = UNLABELED_FILE if present[0] else LABELED_FILE
                incomplete.append(f"{name}/{missing}")
                break
    if incomplete:
        raise DataError(f"reference split folder {folder} lacks {len(incomplete)} file(s): {', '.join(incomplete)}")
    if not found:
        expected = ", ".join(f"{spec.published_folders[0] if spec.published_folders else spec.folder}/{LABELED_FILE}"
                             for spec in specs)
        raise DataError(f"reference split folder {folder} holds none of the splits (expected {expected})")
    absent = [spec.name for spec in specs if spec.name not in found]
    notes = [f"splits not in --splits-from {folder}, left out: {', '.join(absent)}"] if absent else []
    return found, notes


def _missing_paths(lists: Sequence[ReferenceList], known: frozenset[str], root: Path) -> dict[str, str]:
    """Every path named by `lists` that the dataset lacks -> where it is named first (file:line)."""
    missing: dict[str, str] = {}
    for reference in lists:
        # blank lines are skipped by read_split; count lines as the file does for the location
        numbered = [number for number, line in enumerate(reference.data.decode("utf-8").splitlines(), 1) if line.strip()]
        for number, entry in zip(numbered, reference.entries):
            for column in (entry.image, entry.mask):
                if column is not None and column not in known and column not in missing:
                    missing[column] = f"{reference.path.relative_to(root)}:{number}"
    return missing


def import_reference_splits(
    output: SplitOutput,
    folder: Path,
    specs: Sequence[SplitSpec],
    known: frozenset[str],
    training: Sequence[SplitEntry],
    *,
    strict_counts: bool,
    val_size: int | None,
) -> bool:
    """Plans the reference splits found in `folder` (and its val.txt), byte for byte, into `output`.

    `known` holds every image and mask path (relative to the dataset root) the dataset will have;
    `training` is the training set, whose non-labeled part an empty unlabeled list stands for. With
    `strict_counts` (the dataset has its full size) a labeled count other than the named one, or a
    val.txt of other than `val_size` samples, is an error (the folder holds other splits than its
    names say); otherwise it becomes a note. Returns whether val.txt was imported.
    """
    found, notes = find_reference_splits(folder, specs)
    output.notes.extend(notes)
    lists = {spec.name: (_read_reference_list(found[spec.name] / LABELED_FILE),
                         _read_reference_list(found[spec.name] / UNLABELED_FILE))
             for spec in specs if spec.name in found}
    val = _read_reference_list(folder / VAL_FILE) if (folder / VAL_FILE).is_file() else None
    every_list = [item for pair in lists.values() for item in pair] + ([val] if val else [])
    missing = _missing_paths(every_list, known, folder)
    if missing:
        named = ", ".join(f"{path} ({where})" for path, where in missing.items())
        raise DataError(f"the --splits-from lists in {folder} name {len(missing)} file(s) that the dataset lacks: {named}")
    problems = []
    for spec in specs:
        if spec.name not in lists:
            continue
        labeled, unlabeled = lists[spec.name]
        if not labeled.entries:
            raise DataError(f"split file is empty: {labeled.path}")
        if len(labeled.entries) != spec.count:
            problems.append(f"split {spec.name}: {labeled.path} has {len(labeled.entries)} labeled samples, expected {spec.count}")
        unlabeled_part = (unlabeled.data, [entry.image for entry in unlabeled.entries])
        if not unlabeled.entries:
            names = {entry.image for entry in labeled.entries}
            rest = [entry for entry in training if entry.image not in names]
            unlabeled_part = (format_split(rest).encode("utf-8"), [entry.image for entry in rest])
            output.notes.append(f"split {spec.name}: {unlabeled.path} is empty: unlabeled = the other {len(rest)} training samples")
        output.add_train_bytes(spec.name, spec.folder, (labeled.data, [entry.image for entry in labeled.entries]), unlabeled_part)
    if val is not None:
        if val_size is not None and len(val.entries) != val_size:
            problems.append(f"{val.path} has {len(val.entries)} samples, expected {val_size}")
        output.add_eval("val", val.entries, val.data)
    if problems and strict_counts:
        raise DataError("; ".join(problems))
    output.notes.extend(problems)
    return val is not None


def plan_train_splits(
    output: SplitOutput,
    specs: Sequence[SplitSpec],
    pools: dict[str, Sequence[str]],
    unlabeled_pool: Sequence[str],
    entry_of: Callable[[str], SplitEntry],
    val: Sequence[str],
    *,
    seed: int,
    reference: Path | None,
    known: frozenset[str],
    strict_counts: bool,
    val_size: int | None = None,
) -> None:
    """Fills `output` with every spec and val: imported from `reference` when given, else drawn with
    `seed` (val: the `val` samples unless `reference` has a val.txt); then checks for leaks.

    Drawn splits label `spec.count` ids of `pools[spec.pool]`; the unlabeled list is every id of
    `unlabeled_pool` that is not labeled.
    """
    imported_val = False
    if reference is not None:
        training = [entry_of(sample) for sample in sorted(unlabeled_pool)]
        imported_val = import_reference_splits(
            output, reference, specs, known, training, strict_counts=strict_counts, val_size=val_size
        )
    else:
        for spec in specs:
            labeled = set(draw_labeled(pools[spec.pool], spec.count, seed=seed, family=spec.pool))
            unlabeled = [entry_of(sample) for sample in sorted(unlabeled_pool) if sample not in labeled]
            output.add_train(spec.name, spec.folder, [entry_of(sample) for sample in sorted(labeled)], unlabeled)
    if not imported_val:
        output.add_eval("val", [entry_of(sample) for sample in val])
    output.check_no_leaks()




def plan_ratio_splits(
    train: Sequence[SplitEntry],
    val: Sequence[SplitEntry],
    ratios: Sequence[Fraction],
    *,
    train_set: str,
    reference_train_size: int,
    val_size: int,
    seed: int,
    reference: Path | None,
) -> SplitOutput:
    """Training splits at `ratios` of one `train` set (imported from the `reference` folder or
    drawn) and the `val` list: the plan of COCO and Cityscapes. With another train size than the
    reference's, the counts follow the ratios (a note says so) and imported counts are not enforced."""
    output = SplitOutput()
    entries = {entry.image: entry for entry in [*train, *val]}
    train_images = [entry.image for entry in train]
    specs = [SplitSpec(ratio_name(r), ratio_folder(r), "train", count_for_ratio(r, len(train_images))) for r in ratios]
    if len(train_images) != reference_train_size:
        output.notes.append(f"{train_set} has {len(train_images)} images, not {reference_train_size}: split sizes follow the ratios")
    known = frozenset(path for entry in entries.values() for path in entry)
    plan_train_splits(
        output, specs, {"train": train_images}, train_images, entries.__getitem__, [entry.image for entry in val],
        seed=seed, reference=reference, known=known, strict_counts=len(train_images) == reference_train_size,
        val_size=val_size,
    )
    return output
