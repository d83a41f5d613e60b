"""`allspark prepare custom`: a dataset.yaml and split lists for your own images and masks.

Inputs: a folder of images and a folder of masks (searched recursively; a mask has its image's
path relative to the folder, with `.png`: `images/site1/a.jpg` <-> `masks/site1/a.png`), and a
classes file (one class name a line, line i = class id i). Masks are single-channel PNGs
(palette or grey, values 0..K-1 or 255 ignore) or colour (RGB) PNGs, converted through the
palette file: one colour a line as `R G B`, `R,G,B` or `#rrggbb`, one per class (default: the
VOC colours, for display).

The validation set is one of
- fixed by folders: `val_images_dir` + `val_masks_dir` (mmsegmentation's `img_dir/val` +
  `ann_dir/val`; `mmseg_folders` reads that layout), exactly those images, none in training;
- fixed by lists: `val_list` (and optionally `train_list`), lines naming images of the image
  folder (`a`, `a.jpg`, `site1/a.jpg` or `images/site1/a.jpg`; a mask column is allowed);
- drawn: `val_ratio` of the images with masks (at least one), seeded.
Of the training images with masks, `ratio` (or `count`) are labeled; the others, the images of
the image folder without a mask (with `unlabeled_from_images`) and every image of
`unlabeled_dir` are unlabeled. `full` labels every training image with a mask.

Images are read as displayed: a JPEG's EXIF Orientation tag (phone photos) is applied, here and
when training on the dataset (`exif_orientation: true` in its manifest), so masks are drawn on the
image as a viewer shows it. A quarter-turn tag (5..8) on an image whose mask has the stored
(unturned) size is refused, naming both; a half turn or a mirror (2..4) cannot be told from the
sizes, so the summary counts the images that carry a tag.

The training crop (`train_crop`, which `allspark train --data` uses) follows the images: the
largest multiple of 32 (the backbone's coarsest stride) not above the shorter side of the median
training image, at most MAX_TRAIN_CROP (the paper's 513) and at least 32.

Every file is checked (images decode, masks are the size of their image, values within the
classes) and no image may play two roles (val and training, labeled and unlabeled: the same file
through two folders is refused, naming it). Nothing is copied: `OUT/images`, `OUT/masks`,
`OUT/unlabeled`, `OUT/val_images`, `OUT/val_masks` are symlinks to the given folders (root = OUT);
converted colour masks are written to `OUT/converted/<masks|val_masks>/<name>.png`.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from allspark_cli.constants import CROP_STRIDE, IGNORE_INDEX, MIN_CROP
from allspark_cli.data.imageio import QUARTER_TURNS, UPRIGHT, read_mask, read_orientation, read_size
from allspark_cli.data.manifest import FULL_SPLIT
from allspark_cli.data.splits import SplitEntry, read_split
from allspark_cli.errors import DataError, SettingsError
from allspark_cli.fileio import encode_png, remove_stale_temps
from allspark_cli.labels import voc_palette
from allspark_cli.text import plural
from data_tools.common import (
    MAX_REPORTED_ERRORS,
    PrepareSummary,
    ProgressFn,
    TaskResult,
    guarded_output,
    link_dir,
    raise_if_errors,
    refuse_out_inside_sources,
    require_dir,
    require_file,
    run_parallel,
    write_output,
)
from data_tools.masks import check_same_size, check_values, verify_image
from data_tools.splits import SplitOutput, count_for_ratio, draw_labeled, parse_ratio, ratio_folder, ratio_name

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
MASK_SUFFIX = ".png"
DEFAULT_RATIO = "1/8"
DEFAULT_VAL_RATIO = "1/10"
MAX_TRAIN_CROP = 513  # the paper's crop: larger images are cropped, not trained whole
# Link names inside OUT (the first column of the split lines); converted colour masks go to CONVERTED_DIR.
IMAGES_LINK, MASKS_LINK, UNLABELED_LINK = "images", "masks", "unlabeled"
VAL_IMAGES_LINK, VAL_MASKS_LINK = "val_images", "val_masks"
CONVERTED_DIR = "converted"
# mmsegmentation's custom dataset layout: ROOT/img_dir/{train,val}, ROOT/ann_dir/{train,val}.
MMSEG_IMAGES, MMSEG_MASKS, MMSEG_TRAIN, MMSEG_VAL = "img_dir", "ann_dir", "train", "val"
COLOUR_CHANNELS = 3
COLOUR_MODES = frozenset({"RGB", "RGBA"})
BYTE_BITS = 8
_HEX_COLOUR = re.compile(r"^#?([0-9a-fA-F]{6})$")
Colour = tuple[int, int, int]


@dataclass(frozen=True)
class SampleCheck:
    """Check one image (and its mask when `mask` is given) against `num_classes`.

    `palette`: the class colours (the --palette file) a colour mask is converted through, None
    when no palette file was given; `converted`: where the converted class ids of a colour mask go.
    """

    image: Path
    mask: Path | None
    num_classes: int
    palette: tuple[Colour, ...] | None = None
    converted: Path | None = None


def _pack(colours: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> (...) int32 0xRRGGBB, so colours compare as single numbers."""
    colours = colours.astype(np.int32)
    return (colours[..., 0] << (2 * BYTE_BITS)) | (colours[..., 1] << BYTE_BITS) | colours[..., 2]


def colours_to_classes(rgb: np.ndarray, palette: tuple[Colour, ...], path: Path) -> np.ndarray:
    """(H, W, 3) colour mask -> (H, W) uint8 class ids (class i has colour palette[i]).

    DataError naming the file and the colours that the palette lacks, or the colours the palette
    repeats (the class of such a colour would be ambiguous)."""
    keys = _pack(np.array(palette, dtype=np.uint8))
    unique_keys, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        repeated = ", ".join(f"#{key:06x}" for key in unique_keys[counts > 1])
        raise DataError(f"the --palette repeats the colour(s) {repeated}, so colour masks cannot be converted: {path}")
    order = np.argsort(keys)
    packed = _pack(rgb)
    position = np.clip(np.searchsorted(keys[order], packed), 0, len(keys) - 1)
    known = keys[order][position] == packed
    if not known.all():
        unknown = np.unique(packed[~known])
        shown = ", ".join(f"#{key:06x}" for key in unknown[:MAX_REPORTED_ERRORS])
        more = f" (and {len(unknown) - MAX_REPORTED_ERRORS} more)" if len(unknown) > MAX_REPORTED_ERRORS else ""
        raise DataError(f"colour mask holds {len(unknown)} colour(s) that the --palette lacks: {shown}{more}: {path}")
    return order[position].astype(np.uint8)


def _read_colour_mask(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DataError(f"mask cannot be decoded ({error}): {path}") from None


def _check_displayed_size(mask_shape: tuple[int, ...], image: Path, stored: tuple[int, int], mask: Path) -> None:
    """The mask covers the image as displayed (`stored`: its (H, W) before the EXIF turn); a mask of
    the stored size under a quarter-turn tag is named as such, since it is turned against the image."""
    orientation = read_orientation(image)
    displayed = stored[::-1] if orientation in QUARTER_TURNS else stored
    if orientation in QUARTER_TURNS and tuple(mask_shape[:2]) == tuple(stored):
        raise DataError(
            f"image {image.name} has EXIF orientation {orientation} (shown turned a quarter, {displayed[1]}x{displayed[0]}) "
            f"but its mask has the stored size {stored[1]}x{stored[0]}: masks are read in the displayed orientation; "
            f"turn the mask to match the image as shown, or remove the tag if the mask fits the stored pixels: {mask}"
        )
    check_same_size(mask_shape, displayed, mask, image)


def check_sample(task: SampleCheck) -> TaskResult:
    """Image decodes; mask is the image's size as displayed (EXIF orientation applied) with values
    0..K-1 or 255 (a colour mask: colours of the palette, written as class ids to `task.converted`
    unless an identical file is there)."""
    image_size = verify_image(task.image)
    if task.mask is None:
        return TaskResult("checked")
    mode = read_size(task.mask, "mask")[2]
    if mode not in COLOUR_MODES:
        mask = read_mask(task.mask)
        _check_displayed_size(mask.shape, task.image, image_size, task.mask)
        check_values(mask, task.num_classes - 1, IGNORE_INDEX, task.mask)
        return TaskResult("checked")
    if task.palette is None or task.converted is None:
        raise DataError(f"mask is a colour image (mode {mode}); give --palette (one colour per class) to convert it: {task.mask}")
    mask = colours_to_classes(_read_colour_mask(task.mask), task.palette, task.mask)
    _check_displayed_size(mask.shape, task.image, image_size, task.mask)
    data = encode_png(mask, np.array(task.palette, dtype=np.uint8))
    if task.converted.is_file() and task.converted.read_bytes() == data:
        return TaskResult("skipped", task.converted)
    write_output(task.converted, data)
    return TaskResult("written", task.converted)


def read_classes(path: Path) -> list[str]:
    """Class names, one a line (line i = class i); DataError when missing, empty, repeated, or with a
    blank line between names (it would shift every later class id)."""
    require_file(path, "classes file")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()  # trailing blank lines are harmless
    if not lines:
        raise DataError(f"classes file is empty: {path}")
    blank = [str(number) for number, line in enumerate(lines, start=1) if not line]
    if blank:
        raise DataError(
            f"{path}: line(s) {', '.join(blank)} are blank; line i names class i, so a blank line would shift the "
            "class ids after it: remove it or name the class"
        )
    repeated = sorted({name for name in lines if lines.count(name) > 1})
    if repeated:
        raise DataError(f"classes file names {', '.join(repeated)} more than once: {path}")
    if len(lines) > IGNORE_INDEX:
        raise DataError(f"classes file lists {len(lines)} classes; at most {IGNORE_INDEX} fit in 8-bit masks: {path}")
    return lines


def _parse_colour(text: str, path: Path, number: int) -> Colour:
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


def read_palette(path: Path | None, num_classes: int) -> list[Colour]:
    """One RGB colour per class from `path`, or the VOC colours when no file is given."""
    if path is None:
        return [tuple(int(v) for v in colour) for colour in voc_palette(num_classes)]
    require_file(path, "palette file")
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if len(lines) != num_classes:
        raise DataError(f"palette file has {len(lines)} colours for {num_classes} classes: {path}")
    return [_parse_colour(text, path, number) for number, text in lines]


def _visible_files(folder: Path, suffixes: frozenset[str]) -> list[Path]:
    """Files with one of `suffixes` in `folder` and its subfolders, hidden files and folders skipped."""
    return sorted(
        path for path in folder.rglob("*")
        if path.is_file() and path.suffix.lower() in suffixes
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def _key(path: Path, folder: Path) -> str:
    """A sample's name: its path relative to its folder, without suffix ('site1/a')."""
    return path.relative_to(folder).with_suffix("").as_posix()


def images_in(folder: Path, option: str) -> dict[str, Path]:
    """key -> image of `folder` (recursive); DataError when two images share a key or there are none."""
    images: dict[str, Path] = {}
    for path in _visible_files(folder, IMAGE_SUFFIXES):
        key = _key(path, folder)
        if key in images:
            raise DataError(f"two images share the name {key!r}: {images[key].name}, {path.name} in {path.parent}")
        images[key] = path
    if not images:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {option} {folder}")
    return images


def masks_in(folder: Path) -> dict[str, Path]:
    return {_key(path, folder): path for path in _visible_files(folder, frozenset({MASK_SUFFIX}))}


def pair_masks(images: dict[str, Path], masks: dict[str, Path], masks_dir: Path, *, allow_unmasked: bool) -> list[str]:
    """Keys of the images without a mask (allowed with `allow_unmasked`); DataError naming images
    without a mask (otherwise) and masks without an image."""
    unmasked = [key for key in images if key not in masks]
    problems = [] if allow_unmasked else [f"{images[key].name} has no mask {key}{MASK_SUFFIX} in {masks_dir}" for key in unmasked]
    problems += [f"mask {masks[key]} has no image" for key in masks if key not in images]
    if unmasked and not allow_unmasked:
        problems.append("(use --unlabeled-from-images to make images without a mask unlabeled)")
    raise_if_errors(problems, "image/mask pairing")
    return unmasked


def mmseg_folders(root: Path) -> tuple[Path, Path, Path, Path]:
    """(images, masks, val images, val masks) of mmsegmentation's `img_dir/{train,val}` + `ann_dir/{train,val}`."""
    root = require_dir(root, "mmsegmentation dataset folder (--mmseg-root)")
    return tuple(  # type: ignore[return-value]
        require_dir(root / kind / split, f"mmsegmentation folder {kind}/{split} (expected under --mmseg-root)")
        for split in (MMSEG_TRAIN, MMSEG_VAL) for kind in (MMSEG_IMAGES, MMSEG_MASKS)
    )


def _list_keys(path: Path, option: str, pool: dict[str, Path]) -> list[str]:
    """Keys named by a split list: each line's first column is an image of the image folder, as a
    key ('site1/a'), with its suffix, or behind one more folder ('images/site1/a.jpg'); a name that
    is unique in the folder may be given alone ('a'). DataError naming every line matching nothing."""
    require_file(path, f"{option} file")
    by_stem: dict[str, list[str]] = {}
    for key in pool:
        by_stem.setdefault(PurePosixPath(key).name, []).append(key)
    keys, unknown = [], []
    for entry in read_split(path):
        name = PurePosixPath(entry.image)
        if name.suffix.lower() in IMAGE_SUFFIXES:
            name = name.with_suffix("")
        candidates = [name.as_posix(), PurePosixPath(*name.parts[1:]).as_posix() if len(name.parts) > 1 else None]
        match = next((candidate for candidate in candidates if candidate in pool), None)
        if match is None and len(by_stem.get(name.name, [])) == 1:
            match = by_stem[name.name][0]
        if match is None:
            unknown.append(entry.image)
        else:
            keys.append(match)
    if unknown:
        shown = ", ".join(unknown[:MAX_REPORTED_ERRORS])
        more = f" (and {len(unknown) - MAX_REPORTED_ERRORS} more)" if len(unknown) > MAX_REPORTED_ERRORS else ""
        raise DataError(f"{option} {path}: {len(unknown)} line(s) name no image with a mask of the image folder: {shown}{more}")
    return sorted(set(keys))


def _refuse_shared_files(roles: dict[str, dict[str, Path]], hint: str = "") -> None:
    """DataError naming the files that two roles (e.g. --images and --unlabeled) both hold."""
    owner: dict[Path, str] = {}
    shared: dict[tuple[str, str], list[str]] = {}
    for role, files in roles.items():
        for path in files.values():
            resolved = path.resolve()
            if resolved in owner and owner[resolved] != role:
                shared.setdefault((owner[resolved], role), []).append(path.name)
            owner.setdefault(resolved, role)
    if shared:
        parts = []
        for (first, second), names in shared.items():
            more = f" and {len(names) - MAX_REPORTED_ERRORS} more" if len(names) > MAX_REPORTED_ERRORS else ""
            parts.append(f"{len(names)} file(s) are in both {first} and {second}: {', '.join(names[:MAX_REPORTED_ERRORS])}{more}")
        raise DataError("; ".join(parts) + hint)


def _labeled_counts(ratios: Sequence[str], count: int | None, available: int) -> list[tuple[str, str, int]]:
    """(manifest name, folder, labeled count) of each split asked for: every --ratio (repeated or
    comma-separated, e.g. '1/8,1/4'; default 1/8), or --count."""
    if ratios and count is not None:
        raise SettingsError("give --ratio or --count, not both")
    if count is not None:
        if not 1 <= count <= available:
            raise SettingsError(f"--count must be 1..{available} (the training images with masks), got {count}")
        return [(str(count), str(count), count)]
    texts = [part for text in ratios for part in text.split(",") if part.strip()] or [DEFAULT_RATIO]
    fractions = sorted({parse_ratio(text) for text in texts})
    return [(ratio_name(f), ratio_folder(f), count_for_ratio(f, available)) for f in fractions]


def train_crop_for(shorter_sides: Sequence[int]) -> int:
    """The training crop for images whose shorter sides are `shorter_sides` (see the module
    docstring): a multiple of the stride below the median image's shorter side, within
    [MIN_CROP, MAX_TRAIN_CROP]."""
    median = int(np.median(shorter_sides))
    return max(MIN_CROP, min(MAX_TRAIN_CROP, median // CROP_STRIDE * CROP_STRIDE))


@dataclass(frozen=True)
class CustomSources:
    """The folders of a custom dataset, as given or derived from --mmseg-root."""

    images: Path
    masks: Path
    val_images: Path | None = None
    val_masks: Path | None = None
    unlabeled: Path | None = None

    def links(self) -> dict[str, Path]:
        folders = {IMAGES_LINK: self.images, MASKS_LINK: self.masks, UNLABELED_LINK: self.unlabeled,
                   VAL_IMAGES_LINK: self.val_images, VAL_MASKS_LINK: self.val_masks}
        return {link: folder for link, folder in folders.items() if folder is not None}


def resolve_sources(
    images_dir: Path | None, masks_dir: Path | None, *, mmseg_root: Path | None, val_images_dir: Path | None,
    val_masks_dir: Path | None, unlabeled_dir: Path | None, val_list: Path | None, train_list: Path | None,
    val_ratio: str | None,
) -> CustomSources:
    """The folders to read, after checking that the options describe one validation set (SettingsError)."""
    if mmseg_root is not None:
        if any(option is not None for option in (images_dir, masks_dir, val_images_dir, val_masks_dir)):
            raise SettingsError("give --mmseg-root or --images/--masks/--val-images/--val-masks, not both")
        images_dir, masks_dir, val_images_dir, val_masks_dir = mmseg_folders(mmseg_root)
    if images_dir is None or masks_dir is None:
        raise SettingsError("give --images and --masks (or --mmseg-root)")
    if (val_images_dir is None) != (val_masks_dir is None):
        raise SettingsError("give --val-images and --val-masks together")
    fixed = [name for name, given in (("--val-images", val_images_dir), ("--val-list", val_list),
                                      ("--val-ratio", val_ratio)) if given is not None]
    if len(fixed) > 1:
        raise SettingsError(f"the validation set comes from one of --val-images, --val-list or --val-ratio; got {', '.join(fixed)}")
    if train_list is not None and val_list is None:
        raise SettingsError("--train-list needs --val-list (images in neither list are left out)")
    images = require_dir(images_dir, "image folder (--images)")
    if val_images_dir is None and all((images / split).is_dir() for split in (MMSEG_TRAIN, MMSEG_VAL)):
        raise SettingsError(
            f"--images {images_dir} holds {MMSEG_TRAIN}/ and {MMSEG_VAL}/ folders: give --val-images and --val-masks "
            "(or --mmseg-root), else the val images would be drawn into training"
        )
    return CustomSources(
        images, require_dir(masks_dir, "mask folder (--masks)"),
        None if val_images_dir is None else require_dir(val_images_dir, "val image folder (--val-images)"),
        None if val_masks_dir is None else require_dir(val_masks_dir, "val mask folder (--val-masks)"),
        None if unlabeled_dir is None else require_dir(unlabeled_dir, "unlabeled image folder (--unlabeled)"),
    )


def prepare_custom(
    images_dir: Path | None,
    masks_dir: Path | None,
    classes_file: Path,
    out_dir: Path,
    *,
    unlabeled_dir: Path | None = None,
    unlabeled_from_images: bool = False,
    val_images_dir: Path | None = None,
    val_masks_dir: Path | None = None,
    mmseg_root: Path | None = None,
    train_list: Path | None = None,
    val_list: Path | None = None,
    palette_file: Path | None = None,
    ratio: str | Sequence[str] | None = None,
    count: int | None = None,
    val_ratio: str | None = None,
    seed: int = 0,
    name: str | None = None,
    train_crop: int | None = None,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> PrepareSummary:
    """Checks a custom dataset and writes its splits and `dataset.yaml` into `out_dir` (see module docstring).

    `ratio`: one or several labeled shares (each a training split; '1/8,1/4' or a list); `train_crop`:
    None computes it from the training images' sizes (`train_crop_for`)."""
    sources = resolve_sources(
        images_dir, masks_dir, mmseg_root=mmseg_root, val_images_dir=val_images_dir, val_masks_dir=val_masks_dir,
        unlabeled_dir=unlabeled_dir, val_list=val_list, train_list=train_list, val_ratio=val_ratio,
    )
    classes = read_classes(classes_file)
    palette = read_palette(palette_file, len(classes))
    refuse_out_inside_sources(out_dir, {f"--{link.replace('_', '-')}": folder for link, folder in sources.links().items()})
    images = images_in(sources.images, "--images")
    masks = masks_in(sources.masks)
    unmasked = set(pair_masks(images, masks, sources.masks, allow_unmasked=unlabeled_from_images))
    masked = sorted(key for key in images if key not in unmasked)
    extra = images_in(sources.unlabeled, "--unlabeled") if sources.unlabeled else {}
    val_images = images_in(sources.val_images, "--val-images") if sources.val_images else {}
    val_masks = masks_in(sources.val_masks) if sources.val_masks else {}
    if sources.val_images:
        pair_masks(val_images, val_masks, sources.val_masks, allow_unmasked=False)
    _refuse_shared_files(
        {"--images": images, "--val-images": val_images, "--unlabeled": extra},
        " (for images of --images without a mask use --unlabeled-from-images)" if extra else "",
    )
    _refuse_shared_files({"--masks": masks, "--val-masks": val_masks})

    notes = []
    masked_pool = {key: images[key] for key in masked}
    if sources.val_images:
        val, train = [], masked
    elif val_list is not None:
        val = _list_keys(val_list, "--val-list", masked_pool)
        train = masked if train_list is None else _list_keys(train_list, "--train-list", masked_pool)
        both = sorted(set(val) & set(train))
        if train_list is not None and both:
            raise DataError(f"{len(both)} image(s) are in both --train-list and --val-list: {', '.join(both[:MAX_REPORTED_ERRORS])}")
        train = [key for key in train if key not in set(val)]
        left_out = len(masked) - len(train) - len(val)
        if left_out:
            notes.append(f"{plural(left_out, 'image')} with a mask in neither --train-list nor --val-list: left out")
    else:
        if len(masked) < 2:
            raise DataError(f"need at least 2 images with masks (one for val, one for training), found {len(masked)} in {sources.images}")
        val_count = min(count_for_ratio(parse_ratio(val_ratio or DEFAULT_VAL_RATIO), len(masked)), len(masked) - 1)
        val = sorted(draw_labeled(masked, val_count, seed=seed, family="val"))
        train = [key for key in masked if key not in set(val)]
    if not train:
        raise DataError(f"no training images with masks left in {sources.images} once the val images are taken out")
    ratios = [ratio] if isinstance(ratio, str) else list(ratio or [])
    # Drawn from one seeded permutation: the labeled set of a smaller split lies inside a larger one's.
    labeled_sets = {name: (folder, set(draw_labeled(train, labeled_count, seed=seed, family="labeled")))
                    for name, folder, labeled_count in _labeled_counts(ratios, count, len(train))}

    out_dir = out_dir.absolute()
    converted_dir = out_dir / CONVERTED_DIR
    colours = tuple(palette) if palette_file is not None else None
    tasks = [SampleCheck(images[key], masks[key], len(classes), colours, converted_dir / MASKS_LINK / f"{key}{MASK_SUFFIX}")
             for key in [*val, *train]]  # val is empty when val comes from --val-images
    tasks += [SampleCheck(val_images[key], val_masks[key], len(classes), colours,
                          converted_dir / VAL_MASKS_LINK / f"{key}{MASK_SUFFIX}") for key in sorted(val_images)]
    tasks += [SampleCheck(images[key], None, len(classes)) for key in sorted(unmasked)]
    tasks += [SampleCheck(path, None, len(classes)) for path in extra.values()]
    with guarded_output() as guard:
        guard.make_dir(out_dir)
        remove_stale_temps(converted_dir, recursive=True)
        report = run_parallel(check_sample, tasks, stage="check", workers=workers, progress=progress, counts_outputs=False)
        guard.keep(report.written)
        converted = {path.relative_to(out_dir).as_posix() for path in [*report.written, *report.skipped_outputs]}
        raise_if_errors(report.errors, "file")
        oriented = sum(read_orientation(images[key]) != UPRIGHT for key in [*val, *train])
        oriented += sum(read_orientation(path) != UPRIGHT for path in val_images.values())
        if train_crop is None:
            train_crop = train_crop_for([min(read_size(images[key], exif_orientation=True)[:2]) for key in train])

        def mask_of(link: str, key: str, mask: Path, folder: Path) -> str:
            relpath = f"{CONVERTED_DIR}/{link}/{key}{MASK_SUFFIX}"
            return relpath if relpath in converted else f"{link}/{mask.relative_to(folder).as_posix()}"

        def entry(key: str) -> SplitEntry:
            return SplitEntry(f"{IMAGES_LINK}/{images[key].relative_to(sources.images).as_posix()}",
                              mask_of(MASKS_LINK, key, masks[key], sources.masks))

        def val_entry(key: str) -> SplitEntry:
            if not sources.val_images:
                return entry(key)
            return SplitEntry(f"{VAL_IMAGES_LINK}/{val_images[key].relative_to(sources.val_images).as_posix()}",
                              mask_of(VAL_MASKS_LINK, key, val_masks[key], sources.val_masks))

        splits = SplitOutput(notes=notes)
        unlabeled_only = [SplitEntry(f"{IMAGES_LINK}/{images[key].relative_to(sources.images).as_posix()}", None)
                          for key in sorted(unmasked)]
        unlabeled_only += [SplitEntry(f"{UNLABELED_LINK}/{path.relative_to(sources.unlabeled).as_posix()}", None)
                           for path in extra.values()]
        for split_name, (folder, labeled) in labeled_sets.items():
            unlabeled = [entry(key) for key in train if key not in labeled] + unlabeled_only
            splits.add_train(split_name, folder, [entry(key) for key in sorted(labeled)], unlabeled)
        splits.add_train(FULL_SPLIT, FULL_SPLIT, [entry(key) for key in train], None)
        splits.add_eval("val", [val_entry(key) for key in (sorted(val_images) if sources.val_images else val)])
        splits.check_no_leaks()
        if oriented:
            splits.notes.append(f"{oriented} images with masks carry an EXIF orientation tag: they are read as displayed "
                                "(turned or mirrored by the tag), so their masks must be drawn on the image as shown")
        if converted:
            splits.notes.append(f"{len(converted)} colour masks converted to class ids through the --palette in {converted_dir}")
        for link, source in sources.links().items():
            link_dir(source, out_dir / link, guard)
        splits.write(out_dir, guard)
        manifest = splits.write_manifest(
            out_dir, guard,
            name=name or out_dir.name,
            classes=classes,
            palette=palette,
            eval_mode="whole",
            train_crop=train_crop,
            exif_orientation=True,
        )
    return PrepareSummary.of_build(manifest.name, out_dir, report, splits, samples_checked=len(tasks))
