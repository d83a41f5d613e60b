"""`allspark prepare cityscapes`: `*_gtFine_labelTrainIds.png` masks, split lists, dataset.yaml.

Source layout (the official download): `ROOT/leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png`
and `ROOT/gtFine/{train,val}/<city>/<stem>_gtFine_labelIds.png`. Each labelIds mask gets a
`<stem>_gtFine_labelTrainIds.png` beside it with the official id -> trainId table (DESIGN.md
section 4; every other id, -1 included, -> 255). Writing into the user's gtFine folder is how
Cityscapes tools work, and it is the only addition to the source folder: no existing source file
is modified (an existing labelTrainIds file, e.g. from cityscapesscripts, counts as done).

Output (`OUT/`): symlinks `leftImg8bit` and `gtFine` to the source folders (so the reference's
split lines apply unchanged with root = OUT), `splits/<1_16>/{labeled,unlabeled}.txt`,
`splits/val.txt` and `dataset.yaml`.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from allspark_cli.constants import IGNORE_INDEX
from allspark_cli.data.imageio import read_mask
from allspark_cli.data.manifest import MANIFEST_NAME
from allspark_cli.data.splits import SplitEntry
from allspark_cli.classnames import CITYSCAPES_CLASSES
from allspark_cli.errors import DataError
from allspark_cli.fileio import write_png
from allspark_cli.viz.palette import cityscapes_palette
from data_tools.common import (
    PrepareSummary,
    ProgressFn,
    TaskResult,
    check_same_size,
    guarded_output,
    is_complete,
    link_dir,
    raise_if_errors,
    remove_stale_temps,
    require_dir,
    run_parallel,
    verify_image,
)
from data_tools.splits import (
    SplitOutput,
    SplitSpec,
    check_reference_files,
    count_for_ratio,
    import_or_draw_splits,
    ratio_folder,
    ratio_name,
    read_reference_split,
    resolve_reference_folder,
)

# Official labelId -> trainId table (cityscapesscripts `labels.py`); all other ids are ignored.
LABEL_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
LUT_SIZE = 256
TRAIN_SIZE = 2975
VAL_SIZE = 500
RATIOS = (Fraction(1, 30), Fraction(1, 16), Fraction(1, 8), Fraction(1, 4), Fraction(1, 2))
TRAIN_CROP = 801
# Sliding-window evaluation of the reference (DESIGN.md section 3b): window 801, stride 2/3 of it.
EVAL_CROP = 801
EVAL_STRIDE = 534
IMAGE_DIR = "leftImg8bit"
LABEL_DIR = "gtFine"
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
SPLITS = ("train", "val")


def train_id_lut() -> np.ndarray:
    """(256,) uint8 lookup table labelId -> trainId (255 for every id without a train id)."""
    lut = np.full(LUT_SIZE, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in LABEL_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    return lut


_LUT = train_id_lut()


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """(H, W) uint8 labelIds -> (H, W) uint8 trainIds (0..18, 255) through the lookup table."""
    return np.take(_LUT, label_ids)


@dataclass(frozen=True)
class LabelTask:
    """Convert `label_ids` -> `output`, checked against its `image`."""

    label_ids: Path
    image: Path
    output: Path


def convert_label(task: LabelTask) -> TaskResult:
    """Checks image and labelIds mask (decodable, single channel, same size) and writes trainIds."""
    if is_complete(task.output):
        return TaskResult("skipped", task.output)
    image_size = verify_image(task.image)
    label_ids = read_mask(task.label_ids)
    check_same_size(label_ids.shape, image_size, task.label_ids, task.image)
    write_png(task.output, label_ids_to_train_ids(label_ids))
    return TaskResult("written", task.output)


def _stem(label_ids: Path) -> str:
    return label_ids.name[: -len(LABEL_IDS_SUFFIX)]


def find_samples(root: Path) -> dict[str, list[LabelTask]]:
    """Split name -> conversion tasks, after checking the layout and that images and masks pair up."""
    root = require_dir(root, "Cityscapes root (--root, the folder holding leftImg8bit and gtFine)")
    samples: dict[str, list[LabelTask]] = {}
    problems = []
    for split in SPLITS:
        image_dir = require_dir(root / IMAGE_DIR / split, f"Cityscapes folder {IMAGE_DIR}/{split}")
        label_dir = require_dir(root / LABEL_DIR / split, f"Cityscapes folder {LABEL_DIR}/{split}")
        labels = sorted(label_dir.glob(f"*/*{LABEL_IDS_SUFFIX}"))
        tasks = [
            LabelTask(path, image_dir / path.parent.name / f"{_stem(path)}{IMAGE_SUFFIX}",
                      path.with_name(f"{_stem(path)}{TRAIN_IDS_SUFFIX}"))
            for path in labels
        ]
        problems += [f"{task.label_ids} has no image {task.image}" for task in tasks if not task.image.is_file()]
        labelled = {task.image for task in tasks}
        problems += [f"{image} has no {LABEL_IDS_SUFFIX} mask" for image in sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
                     if image not in labelled]
        if not tasks:
            problems.append(f"no */*{LABEL_IDS_SUFFIX} masks in {label_dir}")
        samples[split] = tasks
    raise_if_errors(problems, "Cityscapes layout checks")
    return samples


def _entry(task: LabelTask, root: Path) -> SplitEntry:
    return SplitEntry(task.image.relative_to(root).as_posix(), task.output.relative_to(root).as_posix())


def plan_splits(samples: dict[str, list[LabelTask]], root: Path, *, seed: int, splits_from: Path | None) -> SplitOutput:
    """Training splits 1/30..1/2 of train (imported or drawn) and val."""
    output = SplitOutput()
    entries = {_entry(task, root).image: _entry(task, root) for tasks in samples.values() for task in tasks}
    train = [_entry(task, root).image for task in samples["train"]]
    specs = [SplitSpec(ratio_name(r), ratio_folder(r), "train", count_for_ratio(r, len(train))) for r in RATIOS]
    if len(train) != TRAIN_SIZE:
        output.notes.append(f"train has {len(train)} images, not {TRAIN_SIZE}: split sizes follow the ratios")
    known = frozenset(path for entry in entries.values() for path in entry)
    reference = resolve_reference_folder(splits_from, "cityscapes") if splits_from is not None else None
    import_or_draw_splits(
        output, specs, {"train": train}, train, entries.__getitem__,
        seed=seed, reference=reference, known=known, strict_counts=len(train) == TRAIN_SIZE,
    )
    if reference is not None and (reference / "val.txt").is_file():
        data, count = read_reference_split(reference / "val.txt", known)
        output.add_eval("val", data, count)
    else:
        output.add_eval("val", [_entry(task, root) for task in samples["val"]])
    return output


def prepare_cityscapes(
    root: Path,
    out_dir: Path,
    *,
    splits_from: Path | None = None,
    seed: int = 0,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> PrepareSummary:
    """Builds the Cityscapes dataset folder `out_dir` (see the module docstring); returns what it did.

    Raises DataError (exit 3) naming the file and the rule for any bad source; a failed run
    removes the trainIds files and outputs it created.
    """
    samples = find_samples(root)
    root = root.absolute()
    if splits_from is not None:
        check_reference_files(resolve_reference_folder(splits_from, "cityscapes"),
                              [SplitSpec(ratio_name(r), ratio_folder(r), "train", 0) for r in RATIOS])
    out_dir = out_dir.absolute()
    if out_dir == root or out_dir.is_relative_to(root):
        raise DataError(f"--out {out_dir} lies inside the Cityscapes root {root}; choose a folder outside it")
    with guarded_output() as guard:
        guard.make_dir(out_dir)
        for folder in (IMAGE_DIR, LABEL_DIR):
            link_dir(root / folder, out_dir / folder, guard)
        for tasks in samples.values():
            for city in sorted({task.output.parent for task in tasks}):
                remove_stale_temps(city, f"*{TRAIN_IDS_SUFFIX}")
        tasks = [task for split in SPLITS for task in samples[split]]
        report = run_parallel(convert_label, tasks, stage="trainId masks", workers=workers, progress=progress)
        guard.add_files(report.written)
        raise_if_errors(report.errors, "masks")
        splits = plan_splits(samples, root, seed=seed, splits_from=splits_from)
        splits.write(out_dir, guard)
        manifest = splits.write_manifest(
            out_dir, guard,
            name="cityscapes",
            classes=list(CITYSCAPES_CLASSES),
            palette=cityscapes_palette(),
            eval_mode="slide",
            eval_crop=EVAL_CROP,
            eval_stride=EVAL_STRIDE,
            train_crop=TRAIN_CROP,
        )
    return PrepareSummary(
        name="cityscapes",
        manifest_path=out_dir / MANIFEST_NAME,
        masks_written=len(report.written),
        masks_skipped=report.skipped,
        split_sizes=splits.sizes,
        notes=splits.notes,
    )
