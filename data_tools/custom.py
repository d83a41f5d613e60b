"""`allspark prepare custom`: a dataset.yaml and split lists for your own images and masks.

Inputs: a folder of images, a folder of masks (single-channel PNGs, palette or grey, one per image
with the same stem, values 0..K-1 or 255 ignore), optionally a folder of unlabeled images, and a
classes file (one class name a line, line i = class id i). Optional palette file: one colour a
line as `R G B`, `R,G,B` or `#rrggbb`, one per class (default: the VOC colours).

Every file is checked (images decode, masks are single channel, the size of their image, values
within the classes) before anything is written. Nothing is copied: `OUT/images`, `OUT/masks` and
`OUT/unlabeled` are symlinks to the given folders (root = OUT).

Splits (`OUT/splits/`): `val.txt` holds `val_ratio` of the masked images (at least one); of the
rest, `ratio` (or `count`) are labeled and the others, plus every unlabeled image, unlabeled.
`full` labels every training image (no unlabeled list). All draws are seeded.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from allspark_cli.constants import IGNORE_INDEX
from allspark_cli.data.imageio import read_mask
from allspark_cli.data.manifest import MANIFEST_NAME
from allspark_cli.data.splits import SplitEntry
from allspark_cli.errors import DataError, SettingsError
from allspark_cli.viz.palette import voc_palette
from data_tools.common import (
    PrepareSummary,
    ProgressFn,
    TaskResult,
    check_same_size,
    check_values,
    guarded_output,
    link_dir,
    raise_if_errors,
    require_dir,
    require_file,
    run_parallel,
    verify_image,
)
from data_tools.splits import SplitOutput, count_for_ratio, draw_labeled, parse_ratio, ratio_folder, ratio_name

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
MASK_SUFFIX = ".png"
DEFAULT_RATIO = "1/8"
DEFAULT_VAL_RATIO = "1/10"
DEFAULT_TRAIN_CROP = 513
FULL_SPLIT = "full"
LINKS = {"images": "images", "masks": "masks", "unlabeled": "unlabeled"}
COLOUR_CHANNELS = 3
_HEX_COLOUR = re.compile(r"^#?([0-9a-fA-F]{6})$")


@dataclass(frozen=True)
class SampleCheck:
    """Check one image (and its mask when `mask` is given) against `num_classes`."""

    image: Path
    mask: Path | None
    num_classes: int


def check_sample(task: SampleCheck) -> TaskResult:
    """Image decodes; mask is single channel, the image's size, values 0..K-1 or 255."""
    image_size = verify_image(task.image)
    if task.mask is not None:
        mask = read_mask(task.mask)
        check_same_size(mask.shape, image_size, task.mask, task.image)
        check_values(mask, task.num_classes - 1, IGNORE_INDEX, task.mask)
    return TaskResult("checked")


def read_classes(path: Path) -> list[str]:
    """Class names, one a line (blank lines skipped); DataError when missing, empty or repeated."""
    require_file(path, "classes file")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise DataError(f"classes file is empty: {path}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(f"classes file names {', '.join(repeated)} more than once: {path}")
    if len(names) > IGNORE_INDEX:
        raise DataError(f"classes file lists {len(names)} classes; at most {IGNORE_INDEX} fit in 8-bit masks: {path}")
    return names


def _parse_colour(text: str, path: Path, number: int) -> tuple[int, int, int]:
    match = _HEX_COLOUR.match(text)
    if match:
        value = int(match.group(1), 16)
        return (value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF
    parts = text.replace(",", " ").split()
    try:
        colour = tuple(int(part) for part in parts)
    except ValueError:
        colour = ()
    if len(colour) != COLOUR_CHANNELS or not all(0 <= v <= IGNORE_INDEX for v in colour):
        raise DataError(f"{path}:{number}: expected a colour 'R G B' (0-255 each) or '#rrggbb', got {text!r}")
    return colour  # type: ignore[return-value]


def read_palette(path: Path | None, num_classes: int) -> list[tuple[int, int, int]]:
    """One RGB colour per class from `path`, or the VOC colours when no file is given."""
    if path is None:
        return [tuple(int(v) for v in colour) for colour in voc_palette(num_classes)]
    require_file(path, "palette file")
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if len(lines) != num_classes:
        raise DataError(f"palette file has {len(lines)} colours for {num_classes} classes: {path}")
    return [_parse_colour(text, path, number) for number, text in lines]


def _images_in(folder: Path) -> dict[str, Path]:
    images: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in images:
                raise DataError(f"two images share the stem {path.stem!r}: {images[path.stem].name}, {path.name} in {folder}")
            images[path.stem] = path
    if not images:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return images


def pair_masks(images: dict[str, Path], masks_dir: Path) -> dict[str, Path]:
    """stem -> mask path; DataError naming images without a mask and masks without an image."""
    masks = {path.stem: path for path in sorted(masks_dir.glob(f"*{MASK_SUFFIX}"))}
    problems = [f"{images[stem].name} has no mask {stem}{MASK_SUFFIX} in {masks_dir}" for stem in images if stem not in masks]
    problems += [f"mask {masks[stem]} has no image" for stem in masks if stem not in images]
    raise_if_errors(problems, "image/mask pairings")
    return masks


def _labeled_count(ratio: str | None, count: int | None, available: int) -> tuple[str, str, int]:
    """(manifest name, folder, labeled count) for --ratio or --count."""
    if ratio is not None and count is not None:
        raise SettingsError("give --ratio or --count, not both")
    if count is not None:
        if not 1 <= count <= available:
            raise SettingsError(f"--count must be 1..{available} (the training images with masks), got {count}")
        return str(count), str(count), count
    fraction = parse_ratio(ratio or DEFAULT_RATIO)
    return ratio_name(fraction), ratio_folder(fraction), count_for_ratio(fraction, available)


def prepare_custom(
    images_dir: Path,
    masks_dir: Path,
    classes_file: Path,
    out_dir: Path,
    *,
    unlabeled_dir: Path | None = None,
    palette_file: Path | None = None,
    ratio: str | None = None,
    count: int | None = None,
    val_ratio: str = DEFAULT_VAL_RATIO,
    seed: int = 0,
    name: str | None = None,
    train_crop: int = DEFAULT_TRAIN_CROP,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> PrepareSummary:
    """Checks a custom dataset and writes its splits and `dataset.yaml` into `out_dir` (see module docstring)."""
    classes = read_classes(classes_file)
    palette = read_palette(palette_file, len(classes))
    images = _images_in(require_dir(images_dir, "image folder (--images)"))
    masks = pair_masks(images, require_dir(masks_dir, "mask folder (--masks)"))
    extra = _images_in(require_dir(unlabeled_dir, "unlabeled image folder (--unlabeled)")) if unlabeled_dir else {}
    if len(images) < 2:
        raise DataError(f"need at least 2 images with masks (one for val, one for training), found {len(images)} in {images_dir}")
    tasks = [SampleCheck(images[stem], masks[stem], len(classes)) for stem in images]
    tasks += [SampleCheck(path, None, len(classes)) for path in extra.values()]
    report = run_parallel(check_sample, tasks, stage="check", workers=workers, progress=progress)
    raise_if_errors(report.errors, "files")

    stems = sorted(images)
    val_count = min(count_for_ratio(parse_ratio(val_ratio), len(stems)), len(stems) - 1)
    val = set(draw_labeled(stems, val_count, seed=seed, family="val"))
    train = [stem for stem in stems if stem not in val]
    split_name, folder, labeled_count = _labeled_count(ratio, count, len(train))
    labeled = set(draw_labeled(train, labeled_count, seed=seed, family="labeled"))

    def entry(stem: str) -> SplitEntry:
        return SplitEntry(f"{LINKS['images']}/{images[stem].name}", f"{LINKS['masks']}/{masks[stem].name}")

    splits = SplitOutput()
    unlabeled = [entry(stem) for stem in train if stem not in labeled]
    unlabeled += [SplitEntry(f"{LINKS['unlabeled']}/{path.name}", None) for path in extra.values()]
    splits.add_train(split_name, folder, [entry(stem) for stem in sorted(labeled)], unlabeled)
    splits.add_train(FULL_SPLIT, FULL_SPLIT, [entry(stem) for stem in train], None)
    splits.add_eval("val", [entry(stem) for stem in sorted(val)])

    out_dir = out_dir.absolute()
    with guarded_output() as guard:
        guard.make_dir(out_dir)
        sources = {"images": images_dir, "masks": masks_dir, "unlabeled": unlabeled_dir}
        for key, source in sources.items():
            if source is not None:
                link_dir(source, out_dir / LINKS[key], guard)
        splits.write(out_dir, guard)
        manifest = splits.write_manifest(
            out_dir, guard,
            name=name or out_dir.name,
            classes=classes,
            palette=palette,
            eval_mode="whole",
            train_crop=train_crop,
        )
    return PrepareSummary(
        name=manifest.name,
        manifest_path=out_dir / MANIFEST_NAME,
        samples_checked=report.checked,
        split_sizes=splits.sizes,
        notes=splits.notes,
    )
