"""`allspark prepare pascal`: Pascal VOC 2012 + SBD augmented masks, split lists, dataset.yaml.

Sources (DESIGN.md section 4): VOC2012 `SegmentationClass/*.png` (palette PNG, 0-20, 255 ignore;
train 1,464 + val 1,449 listed in `ImageSets/Segmentation/{train,val}.txt`) and either SBD
`benchmark_RELEASE/dataset/cls/*.mat` (MATLAB struct `GTcls`, field `Segmentation`, uint8) or a
`SegmentationClassAug/` folder of single-channel PNGs. The augmented training set is SBD
train+val plus VOC train, minus VOC val (10,582 images).

Output (`OUT/`), laid out like the reference so its split files apply unchanged:
- `SegmentationClass/<id>.png`: every mask as a VOC palette PNG; VOC masks are copied byte for
  byte, SBD masks re-encoded. A VOC id takes the VOC mask (it has the 255 object borders);
- `JPEGImages` -> a symlink to the VOC JPEGImages (17k JPEGs are not copied);
- `splits/<name>/{labeled,unlabeled}.txt`, `splits/val.txt`, `dataset.yaml` (root = OUT).
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.io

from allspark_cli.constants import IGNORE_INDEX
from allspark_cli.data.imageio import read_mask, read_size
from allspark_cli.data.splits import SplitEntry
from allspark_cli.labels import VOC_CLASSES
from allspark_cli.errors import DataError, SettingsError
from allspark_cli.labels import voc_palette
from data_tools.build import MaskFolder, write_build
from data_tools.common import PrepareSummary, ProgressFn, TaskResult, refuse_out_inside_sources, require_dir, require_file, write_output
from data_tools.masks import check_same_size, check_values, is_complete, verify_image, write_mask
from data_tools.splits import (
    SplitOutput,
    SplitSpec,
    count_for_ratio,
    plan_train_splits,
    ratio_folder,
    ratio_name,
    resolve_reference_folder,
    scaled_count,
)

MAX_CLASS_ID = len(VOC_CLASSES) - 1
# Reference sizes (DESIGN.md section 4): the named original splits are counts out of VOC train.
VOC_TRAIN_SIZE = 1464
AUG_SET_SIZE = 10582
VAL_SIZE = 1449
ORIGINAL_SIZES = (92, 183, 366, 732, 1464)
AUG_RATIOS = (Fraction(1, 16), Fraction(1, 8), Fraction(1, 4), Fraction(1, 2))
U2PL_RATIOS = (Fraction(1, 16), Fraction(1, 8), Fraction(1, 4))
TRAIN_CROP = 513
IMAGE_DIR = "JPEGImages"
MASK_DIR = "SegmentationClass"
SBD_KEY = "GTcls"
SBD_FIELD = "Segmentation"
MaskKind = Literal["voc", "sbd", "aug"]


@dataclass(frozen=True)
class MaskTask:
    """Convert one mask: `source` of `kind` -> `output` palette PNG, checked against `image`."""

    source: Path
    kind: MaskKind
    image: Path
    output: Path


def read_sbd_mat(path: Path) -> np.ndarray:
    """(H, W) uint8 class map of an SBD `cls/*.mat` file; DataError naming the file otherwise."""
    try:
        content = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
        mask = np.asarray(getattr(content[SBD_KEY], SBD_FIELD))
    except (KeyError, AttributeError):
        raise DataError(f"SBD .mat file has no {SBD_KEY}.{SBD_FIELD} field: {path}") from None
    except Exception as error:  # noqa: BLE001 - scipy raises IndexError, MatReadError, ... on cut files
        raise DataError(f"SBD .mat file is truncated or corrupt ({error}): {path}") from None
    if mask.ndim != 2:
        raise DataError(f"SBD mask must be a 2-D class map, got shape {mask.shape}: {path}")
    if mask.size and (mask.min() < 0 or mask.max() > IGNORE_INDEX):
        raise DataError(f"SBD mask values must be 0..255, found {mask.min()}..{mask.max()}: {path}")
    return mask.astype(np.uint8)


def convert_mask(task: MaskTask) -> TaskResult:
    """Checks image and mask (decodable, same size, values 0-20 or 255) and writes the palette PNG."""
    if is_complete(task.output):
        return TaskResult("skipped", task.output)
    image_size = verify_image(task.image)
    mask = read_sbd_mat(task.source) if task.kind == "sbd" else read_mask(task.source)
    check_same_size(mask.shape, image_size, task.source, task.image)
    check_values(mask, MAX_CLASS_ID, IGNORE_INDEX, task.source)
    if task.kind == "voc" and read_size(task.source, "mask")[2] == "P":
        write_output(task.output, task.source.read_bytes())  # VOC masks stay byte-identical
    else:
        write_mask(task.output, mask, palette=voc_palette())
    return TaskResult("written", task.output)


def read_id_list(path: Path) -> list[str]:
    """Ids of a VOC/SBD image-set file (one id a line); DataError when missing or empty."""
    require_file(path, "image-set list")
    ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise DataError(f"image-set list is empty: {path}")
    return ids


@dataclass(frozen=True)
class PascalSources:
    """Where each mask comes from: id -> (kind, path); plus the VOC train/val and augmented id lists."""

    voc_train: list[str]
    val: list[str]
    aug: list[str]
    masks: dict[str, tuple[MaskKind, Path]]
    notes: tuple[str, ...]


def _extra_masks(sbd_root: Path | None, aug_masks: Path | None) -> tuple[dict[str, tuple[MaskKind, Path]], str | None]:
    if sbd_root is not None:
        root = require_dir(sbd_root, "SBD root (--sbd-root, expected benchmark_RELEASE)")
        dataset = root / "dataset" if (root / "dataset").is_dir() else root
        cls_dir = require_dir(dataset / "cls", "SBD cls folder (expected benchmark_RELEASE/dataset/cls)")
        lists = [dataset / "train.txt", dataset / "val.txt"]
        if all(path.is_file() for path in lists):
            ids = sorted({sample for path in lists for sample in read_id_list(path)})
            missing = [sample for sample in ids if not (cls_dir / f"{sample}.mat").is_file()]
            if missing:
                raise DataError(f"{len(missing)} SBD ids listed in train.txt/val.txt lack cls/<id>.mat, e.g. {cls_dir / missing[0]}.mat")
        else:
            ids = sorted(path.stem for path in cls_dir.glob("*.mat"))
        return {sample: ("sbd", cls_dir / f"{sample}.mat") for sample in ids}, None
    if aug_masks is not None:
        folder = require_dir(aug_masks, "augmented mask folder (--aug-masks, expected SegmentationClassAug)")
        return {path.stem: ("aug", path) for path in sorted(folder.glob("*.png"))}, None
    return {}, "no --sbd-root or --aug-masks given: the augmented set is VOC train only"


def find_sources(voc_root: Path, sbd_root: Path | None, aug_masks: Path | None) -> PascalSources:
    """Validates the source layout and decides the mask source of every id (no file is decoded yet)."""
    if sbd_root is not None and aug_masks is not None:
        raise SettingsError("give either --sbd-root or --aug-masks, not both")
    voc = require_dir(voc_root, "VOC root (--voc-root, expected VOCdevkit/VOC2012)")
    for name in (IMAGE_DIR, MASK_DIR):
        require_dir(voc / name, f"VOC folder {name} (is --voc-root VOCdevkit/VOC2012?)")
    sets = voc / "ImageSets" / "Segmentation"
    voc_train, val = read_id_list(sets / "train.txt"), read_id_list(sets / "val.txt")
    extra, note = _extra_masks(sbd_root, aug_masks)
    val_set = set(val)
    masks: dict[str, tuple[MaskKind, Path]] = {s: kind_path for s, kind_path in extra.items() if s not in val_set}
    for sample in voc_train + val:
        masks[sample] = ("voc", voc / MASK_DIR / f"{sample}.png")
    missing = [str(path) for kind, path in masks.values() if not path.is_file()]
    missing += [str(voc / IMAGE_DIR / f"{s}.jpg") for s in masks if not (voc / IMAGE_DIR / f"{s}.jpg").is_file()]
    if missing:
        raise DataError(f"{len(missing)} source files are missing, e.g. {', '.join(sorted(missing)[:3])}")
    aug = sorted((set(extra) | set(voc_train)) - val_set)
    return PascalSources(sorted(voc_train), sorted(val), aug, masks, (note,) if note else ())


def _entry(sample: str) -> SplitEntry:
    return SplitEntry(f"{IMAGE_DIR}/{sample}.jpg", f"{MASK_DIR}/{sample}.png")


def split_specs(num_voc_train: int, num_aug: int) -> tuple[list[SplitSpec], list[str]]:
    """Every reference split with its labeled count for the available data, plus notes on scaling."""
    specs = [
        SplitSpec(str(size), str(size), "voc-train", scaled_count(size, VOC_TRAIN_SIZE, num_voc_train))
        for size in ORIGINAL_SIZES
    ]
    specs += [SplitSpec(f"aug-{ratio_name(r)}", ratio_folder(r), "aug", count_for_ratio(r, num_aug)) for r in AUG_RATIOS]
    # Ours nest the U2PL family in a folder; the reference and UniMatch publish `u2pl_1_16`.
    specs += [
        SplitSpec(f"u2pl-{ratio_name(r)}", f"u2pl/{ratio_folder(r)}", "u2pl", count_for_ratio(r, num_aug),
                  published_folders=(f"u2pl_{ratio_folder(r)}",))
        for r in U2PL_RATIOS
    ]
    notes = []
    scaled = [f"{size}->{spec.count}" for size, spec in zip(ORIGINAL_SIZES, specs) if spec.count != size]
    if scaled:
        notes.append(f"only {num_voc_train} VOC train images: original split sizes scaled ({', '.join(scaled)})")
    if num_aug != AUG_SET_SIZE:
        notes.append(f"augmented set has {num_aug} images, not {AUG_SET_SIZE}: aug/u2pl split sizes follow the ratios")
    return specs, notes


def plan_splits(sources: PascalSources, *, seed: int, reference: Path | None) -> SplitOutput:
    """All training splits and val, imported from the `reference` folder or drawn with `seed`."""
    output = SplitOutput()
    specs, notes = split_specs(len(sources.voc_train), len(sources.aug))
    output.notes.extend((*sources.notes, *notes))
    known = frozenset(path for sample in sources.masks for path in _entry(sample))
    pools = {"voc-train": sources.voc_train, "aug": sources.aug, "u2pl": sources.aug}
    plan_train_splits(
        output, specs, pools, sources.aug, _entry, sources.val,
        seed=seed, reference=reference, known=known, strict_counts=len(sources.aug) == AUG_SET_SIZE, val_size=VAL_SIZE,
    )
    return output


def _augmented_masks_option(sbd_root: Path | None, aug_masks: Path | None) -> str:
    """Where the non-VOC masks come from: the option recorded with the masks (it determines them)."""
    return "sbd" if sbd_root is not None else "aug" if aug_masks is not None else "none"


def prepare_pascal(
    voc_root: Path,
    out_dir: Path,
    *,
    sbd_root: Path | None = None,
    aug_masks: Path | None = None,
    splits_from: Path | None = None,
    seed: int = 0,
    overwrite: bool = False,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> PrepareSummary:
    """Builds the Pascal dataset folder `out_dir` (see the module docstring); returns what it did.

    Raises DataError (exit 3) naming the file and the rule for any bad source (before any mask is
    converted where it can: layout, reference lists); masks converted correctly are kept when
    other files fail, so the rerun continues. SettingsError (exit 2) when `out_dir` lies inside a
    source or holds masks made with other options (unless `overwrite`: they are rebuilt).
    """
    reference = resolve_reference_folder(splits_from, "pascal") if splits_from is not None else None
    sources = find_sources(voc_root, sbd_root, aug_masks)
    splits = plan_splits(sources, seed=seed, reference=reference)  # all lists checked before any conversion
    refuse_out_inside_sources(out_dir, {"--voc-root": voc_root, "--sbd-root": sbd_root, "--aug-masks": aug_masks,
                                        "--splits-from": splits_from})
    out_dir = out_dir.absolute()
    voc = voc_root.absolute()
    return write_build(
        out_dir, splits,
        name="pascal",
        links={IMAGE_DIR: voc / IMAGE_DIR},
        mask_folder=MaskFolder(out_dir / MASK_DIR, "pascal", {"augmented_masks": _augmented_masks_option(sbd_root, aug_masks)},
                               overwrite),
        convert=convert_mask,
        tasks=[MaskTask(path, kind, voc / IMAGE_DIR / f"{sample}.jpg", out_dir / MASK_DIR / f"{sample}.png")
               for sample, (kind, path) in sorted(sources.masks.items())],
        stage="masks",
        manifest={"classes": list(VOC_CLASSES), "palette": voc_palette(len(VOC_CLASSES)), "eval_mode": "whole",
                  "train_crop": TRAIN_CROP},
        workers=workers, progress=progress,
    )
