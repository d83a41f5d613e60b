"""`allspark prepare cityscapes`: `*_gtFine_labelTrainIds.png` masks, split lists, dataset.yaml.

Source layout (the official download): `ROOT/leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png`
and `ROOT/gtFine/{train,val}/<city>/<stem>_gtFine_labelIds.png`. Each labelIds mask gets a
`<stem>_gtFine_labelTrainIds.png` beside it with the official id -> trainId table (DESIGN.md
section 4; every other id, -1 included, -> 255). Writing into the user's gtFine folder is how
Cityscapes tools work, and it is the only addition to the source folder: no existing source file
is modified. An existing labelTrainIds file (e.g. from cityscapesscripts, or an earlier run)
counts as done once it decodes completely, has the size of its labelIds mask and holds train ids
only (0..18, 255); one that fails is rebuilt from its labelIds mask, and the summary says so.

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
from allspark_cli.data.imageio import read_mask, read_size
from allspark_cli.data.splits import SplitEntry
from allspark_cli.labels import CITYSCAPES_CLASSES
from allspark_cli.errors import DataError
from allspark_cli.labels import cityscapes_palette
from data_tools.build import write_build
from data_tools.common import (
    MAX_REPORTED_ERRORS,
    PrepareSummary,
    ProgressFn,
    TaskResult,
    raise_if_errors,
    refuse_out_inside_sources,
    require_dir,
)
from data_tools.masks import check_same_size, check_values, verify_image, write_mask
from data_tools.splits import SplitOutput, plan_ratio_splits, resolve_reference_folder

# Official labelId -> trainId table (cityscapesscripts `labels.py`); all other ids are ignored.
LABEL_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
LUT_SIZE = 256
NUM_TRAIN_IDS = len(CITYSCAPES_CLASSES)
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


def existing_train_ids_problem(task: LabelTask) -> str | None:
    """Why an existing labelTrainIds file cannot be trusted (None: it is valid, or absent).

    Decodes it completely (a truncated file fails), compares its size with the labelIds header
    and checks that it holds train ids only. Costs one PNG decode; see docs/prepare.md.
    """
    if not task.output.is_file():
        return None
    try:
        train_ids = read_mask(task.output)
        width, height, _ = read_size(task.label_ids, "labelIds mask")
        check_same_size(train_ids.shape, (height, width), task.output, task.label_ids)
        check_values(train_ids, NUM_TRAIN_IDS - 1, IGNORE_INDEX, task.output)
    except DataError as error:
        return str(error)
    return None


def convert_label(task: LabelTask) -> TaskResult:
    """Checks image and labelIds mask (decodable, single channel, same size) and writes trainIds.

    An existing labelTrainIds file is kept when it verifies, else rebuilt (with a note)."""
    note = None
    if task.output.is_file():
        problem = existing_train_ids_problem(task)
        if problem is None:
            return TaskResult("skipped", task.output)
        note = problem
    image_size = verify_image(task.image)
    label_ids = read_mask(task.label_ids)
    check_same_size(label_ids.shape, image_size, task.label_ids, task.image)
    write_mask(task.output, label_ids_to_train_ids(label_ids))
    return TaskResult("written", task.output, note=note)


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
    raise_if_errors(problems, "Cityscapes layout check")
    return samples


def _entry(task: LabelTask, root: Path) -> SplitEntry:
    return SplitEntry(task.image.relative_to(root).as_posix(), task.output.relative_to(root).as_posix())


def plan_splits(samples: dict[str, list[LabelTask]], root: Path, *, seed: int, reference: Path | None) -> SplitOutput:
    """Training splits 1/30..1/2 of train (imported from the `reference` folder or drawn) and val."""
    train, val = ([_entry(task, root) for task in samples[split]] for split in SPLITS)
    return plan_ratio_splits(train, val, RATIOS, train_set=SPLITS[0], reference_train_size=TRAIN_SIZE, val_size=VAL_SIZE,
                             seed=seed, reference=reference)


def _rebuilt_note(notes: list[str]) -> list[str]:
    if not notes:
        return []
    shown = "; ".join(notes[:MAX_REPORTED_ERRORS])
    more = f" (and {len(notes) - MAX_REPORTED_ERRORS} more)" if len(notes) > MAX_REPORTED_ERRORS else ""
    return [f"{len(notes)} existing {TRAIN_IDS_SUFFIX} files were invalid and were rebuilt: {shown}{more}"]


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

    Raises DataError (exit 3) naming the file and the rule for any bad source; the trainIds files
    converted correctly stay when other files fail (the rerun continues).
    """
    samples = find_samples(root)
    root = root.absolute()
    reference = resolve_reference_folder(splits_from, "cityscapes") if splits_from is not None else None
    splits = plan_splits(samples, root, seed=seed, reference=reference)  # all lists checked before any conversion
    refuse_out_inside_sources(out_dir, {"--root": root, "--splits-from": splits_from})
    out_dir = out_dir.absolute()
    return write_build(
        out_dir, splits,
        name="cityscapes",
        links={folder: root / folder for folder in (IMAGE_DIR, LABEL_DIR)},
        # The trainIds files go beside their labelIds masks, in the source's city folders.
        stale_temps=[(city, f"*{TRAIN_IDS_SUFFIX}") for tasks in samples.values()
                     for city in sorted({task.output.parent for task in tasks})],
        convert=convert_label,
        tasks=[task for split in SPLITS for task in samples[split]],
        stage="trainId masks",
        conversion_notes=_rebuilt_note,
        manifest={"classes": list(CITYSCAPES_CLASSES), "palette": cityscapes_palette(), "eval_mode": "slide",
                  "eval_crop": EVAL_CROP, "eval_stride": EVAL_STRIDE, "train_crop": TRAIN_CROP},
        workers=workers, progress=progress,
    )
