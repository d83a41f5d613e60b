"""`allspark prepare coco`: 81-class masks from the instance annotations, split lists, dataset.yaml.

Sources: `ROOT/{train2017,val2017}/*.jpg` and `ROOT/annotations/instances_{train,val}2017.json`.
Masks (DESIGN.md section 4): class 0 is background, the thing categories get 1..K-1 in ascending
category id (80 in COCO: 81 classes). Each image starts at 0; its annotations are painted in file
order with pycocotools' `annToMask` semantics (polygons, RLE and uncompressed RLE), later ones
over earlier ones. Crowd annotations are skipped (`crowd="background"`, the reference) or painted
255 (`crowd="ignore"`). Every image gets a mask, also an image without annotations.

Output (`OUT/`): `masks/<id>.png` for train and val alike (COCO 2017 file names are unique across
the two sets, so one folder mirrors the reference's `train2017/<id>.jpg masks/<id>.png` lines and
val lines read `val2017/<id>.jpg masks/<id>.png`); symlinks `train2017`, `val2017` to the source;
`splits/1_512/{labeled,unlabeled}.txt` .. `splits/1_32/`, `splits/val.txt`, `dataset.yaml`.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from allspark_cli.constants import IGNORE_INDEX
from allspark_cli.data.splits import SplitEntry
from allspark_cli.errors import DataError
from allspark_cli.labels import voc_palette
from data_tools.build import MaskFolder, write_build
from data_tools.common import (
    MAX_REPORTED_ERRORS,
    CrowdMode,
    PrepareSummary,
    ProgressFn,
    TaskResult,
    refuse_out_inside_sources,
    require_dir,
    require_file,
)
from data_tools.masks import is_complete, verify_image, write_mask
from data_tools.splits import SplitOutput, plan_ratio_splits, resolve_reference_folder

TRAIN_SIZE = 118287
VAL_SIZE = 5000
RATIOS = (Fraction(1, 512), Fraction(1, 256), Fraction(1, 128), Fraction(1, 64), Fraction(1, 32))
TRAIN_CROP = 513
MASK_DIR = "masks"
SETS = ("train2017", "val2017")
BACKGROUND = "background"


@dataclass(frozen=True)
class CocoImage:
    """One image and its annotations as (class index, segmentation, is_crowd, annotation id) in file order."""

    image: Path
    height: int
    width: int
    annotations: tuple[tuple[int, Any, bool, int], ...]
    output: Path
    crowd_value: int | None  # None: crowd annotations stay background


def segmentation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 0/1 mask of one annotation, as pycocotools' `COCO.annToMask`."""
    if isinstance(segmentation, list):  # polygons: one RLE per part, merged
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


def paint_mask(sample: CocoImage) -> np.ndarray:
    """(H, W) uint8 class map: 0 background, annotations painted in order, crowd per `crowd_value`."""
    mask = np.zeros((sample.height, sample.width), dtype=np.uint8)
    for class_index, segmentation, is_crowd, annotation_id in sample.annotations:
        value = sample.crowd_value if is_crowd else class_index
        if value is None:
            continue
        try:
            region = segmentation_mask(segmentation, sample.height, sample.width)
        except Exception as error:  # noqa: BLE001 - pycocotools raises bare Exception on bad input
            raise DataError(f"annotation {annotation_id} of {sample.image.name} has a malformed segmentation ({error})") from None
        if region.shape != mask.shape:
            raise DataError(f"annotation {annotation_id} of {sample.image.name}: segmentation size {region.shape} differs from the image")
        mask[region.astype(bool)] = value
    return mask


def convert_image(sample: CocoImage) -> TaskResult:
    """Checks the image (decodable, size as in the json) and writes its class map."""
    if is_complete(sample.output):
        return TaskResult("skipped", sample.output)
    height, width = verify_image(sample.image)
    if (height, width) != (sample.height, sample.width):
        raise DataError(
            f"image is {width}x{height} but the annotation file says {sample.width}x{sample.height}: {sample.image}"
        )
    write_mask(sample.output, paint_mask(sample))
    return TaskResult("written", sample.output)


def _load_json(path: Path) -> dict:
    require_file(path, "COCO annotation file")
    try:
        with path.open(encoding="utf-8") as handle:
            content = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"COCO annotation file is not valid JSON ({error}): {path}") from None
    missing = [key for key in ("images", "annotations", "categories") if key not in content]
    if missing:
        raise DataError(f"COCO annotation file lacks {', '.join(missing)}: {path}")
    return content


def read_annotations(
    root: Path, image_set: str, out_dir: Path, crowd: CrowdMode
) -> tuple[list[str], list[CocoImage]]:
    """Category names (ascending id) and one CocoImage per image of `instances_<set>.json`."""
    path = root / "annotations" / f"instances_{image_set}.json"
    content = _load_json(path)
    try:
        categories = sorted(content["categories"], key=lambda category: category["id"])
        class_index = {category["id"]: index for index, category in enumerate(categories, start=1)}
        image_ids = {entry["id"] for entry in content["images"]}
        per_image: dict[int, list[tuple[int, Any, bool, int]]] = defaultdict(list)
        for annotation in content["annotations"]:
            category = annotation["category_id"]
            if category not in class_index:
                raise DataError(f"{path}: annotation {annotation.get('id')} has unknown category_id {category}")
            if annotation["image_id"] not in image_ids:
                raise DataError(
                    f"{path}: annotation {annotation.get('id')} has image_id {annotation['image_id']}, which no entry "
                    "of its images lists"
                )
            per_image[annotation["image_id"]].append(
                (class_index[category], annotation["segmentation"], bool(annotation.get("iscrowd", 0)), annotation.get("id", -1))
            )
        crowd_value = IGNORE_INDEX if crowd == "ignore" else None
        images = [
            CocoImage(root / image_set / entry["file_name"], int(entry["height"]), int(entry["width"]),
                      tuple(per_image.get(entry["id"], ())), out_dir / MASK_DIR / f"{Path(entry['file_name']).stem}.png",
                      crowd_value)
            for entry in content["images"]
        ]
        names = [str(category["name"]) for category in categories]
    except (KeyError, TypeError) as error:
        raise DataError(f"{path}: an entry lacks the field {error}") from None
    if not images:
        raise DataError(f"{path}: no images listed")
    return names, images


def _entry(sample: CocoImage, image_set: str) -> SplitEntry:
    return SplitEntry(f"{image_set}/{sample.image.name}", f"{MASK_DIR}/{sample.output.name}")


def plan_splits(images: dict[str, list[CocoImage]], *, seed: int, reference: Path | None) -> SplitOutput:
    """Training splits 1/512..1/32 of train2017 (imported from the `reference` folder or drawn) and val."""
    train, val = ([_entry(s, image_set) for s in images[image_set]] for image_set in SETS)
    return plan_ratio_splits(train, val, RATIOS, train_set=SETS[0], reference_train_size=TRAIN_SIZE, val_size=VAL_SIZE,
                             seed=seed, reference=reference)


def _refuse_shared_file_names(images: dict[str, list[CocoImage]]) -> None:
    """DataError naming the file names that two images of train2017/val2017 share (their masks would collide)."""
    seen: dict[Path, str] = {}
    shared = []
    for image_set in SETS:
        for sample in images[image_set]:
            if sample.output in seen:
                shared.append(f"{seen[sample.output]} and {image_set}/{sample.image.name}")
            seen.setdefault(sample.output, f"{image_set}/{sample.image.name}")
    if shared:
        more = f" (and {len(shared) - MAX_REPORTED_ERRORS} more)" if len(shared) > MAX_REPORTED_ERRORS else ""
        raise DataError(
            f"{len(shared)} pairs of images share a file name stem, so their masks would collide in {MASK_DIR}/: "
            f"{'; '.join(shared[:MAX_REPORTED_ERRORS])}{more}"
        )


def prepare_coco(
    root: Path,
    out_dir: Path,
    *,
    crowd: CrowdMode = "background",
    splits_from: Path | None = None,
    seed: int = 0,
    overwrite: bool = False,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> PrepareSummary:
    """Builds the COCO dataset folder `out_dir` (see the module docstring); returns what it did.

    Raises DataError (exit 3) naming the file and the rule for any bad source; masks converted
    correctly are kept when other files fail, so the rerun continues. SettingsError (exit 2) when
    `out_dir` lies inside a source or holds masks made with another crowd mode (unless `overwrite`:
    they are rebuilt).
    """
    root = require_dir(root, "COCO root (--root, the folder holding train2017, val2017 and annotations)")
    for image_set in SETS:
        require_dir(root / image_set, f"COCO folder {image_set}")
    out_dir = out_dir.absolute()
    names, images = None, {}
    for image_set in SETS:
        set_names, images[image_set] = read_annotations(root, image_set, out_dir, crowd)
        if names is not None and set_names != names:
            raise DataError(f"instances_{image_set}.json has other categories than instances_{SETS[0]}.json")
        names = set_names
    _refuse_shared_file_names(images)
    reference = resolve_reference_folder(splits_from, "coco") if splits_from is not None else None
    splits = plan_splits(images, seed=seed, reference=reference)  # all lists checked before any conversion
    refuse_out_inside_sources(out_dir, {"--root": root, "--splits-from": splits_from})
    classes = [BACKGROUND, *names]
    return write_build(
        out_dir, splits,
        name="coco",
        links={image_set: root / image_set for image_set in SETS},
        mask_folder=MaskFolder(out_dir / MASK_DIR, "coco", {"crowd": crowd}, overwrite),
        convert=convert_image,
        tasks=[sample for image_set in SETS for sample in images[image_set]],
        stage="masks",
        manifest={"classes": classes, "palette": voc_palette(len(classes)), "eval_mode": "whole", "train_crop": TRAIN_CROP},
        workers=workers, progress=progress,
    )
