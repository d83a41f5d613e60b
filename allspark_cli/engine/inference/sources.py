"""Image sources of `allspark predict`: files, folders (recursive) and glob patterns.

Each image found gets a relative path that the outputs mirror: a folder's images keep their path
inside the folder, a glob's images their path below the pattern's fixed part, a single file its
name. With several sources, each relative path is prefixed with its source's name (the folder
name, the pattern's base folder name, or nothing for single files) so that `a/1.jpg` and
`b/1.jpg` cannot land on the same output. Files are listed in sorted order; hidden files and
folders (names starting with '.') inside a folder are skipped.
"""
from __future__ import annotations

import glob
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from allspark_cli.errors import DataError, SettingsError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
GLOB_CHARS = frozenset("*?[")


class ImageSource(NamedTuple):
    """One input image: its path on disk and the relative path (POSIX) its outputs mirror."""

    path: Path
    relpath: str


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _folder_images(folder: Path) -> list[ImageSource]:
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and is_image_file(path) and not _is_hidden(relative):
            found.append(ImageSource(path, relative.as_posix()))
    return found


def _glob_base(pattern: str) -> Path:
    """The leading folders of a pattern that contain no wildcard."""
    fixed = []
    for part in Path(pattern).parts[:-1]:
        if GLOB_CHARS & set(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _glob_images(pattern: str) -> list[ImageSource]:
    base = _glob_base(pattern)
    found = []
    for name in sorted(glob.glob(pattern, recursive=True)):
        path = Path(name)
        if path.is_file() and is_image_file(path):
            found.append(ImageSource(path, path.relative_to(base).as_posix()))
    return found


def _one_source(source: str) -> tuple[list[ImageSource], str]:
    """Images of one source and the prefix that names it among several."""
    path = Path(source)
    if path.is_dir():
        images = _folder_images(path)
        if not images:
            raise DataError(f"source folder {path} contains no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return images, path.resolve().name
    if path.is_file():
        if not is_image_file(path):
            raise DataError(f"source {path} is not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return [ImageSource(path, path.name)], ""
    if GLOB_CHARS & set(source):
        images = _glob_images(source)
        if not images:
            raise DataError(f"source pattern {source!r} matches no image file")
        return images, _glob_base(source).resolve().name
    raise DataError(f"source {source} does not exist (expected an image file, a folder or a glob pattern)")


def collect_images(sources: list[str]) -> list[ImageSource]:
    """Every image of `sources`, in order, each once; DataError when a source yields no image.

    SettingsError when two different images would share an output path.
    """
    if not sources:
        raise SettingsError("no source given: pass image files, folders or glob patterns")
    prefixed = len(sources) > 1
    images: list[ImageSource] = []
    seen_paths: set[Path] = set()
    owner: dict[str, Path] = {}
    for source in sources:
        found, prefix = _one_source(source)
        for image in found:
            resolved = image.path.resolve()
            if resolved in seen_paths:  # the same file through two sources: predict it once
                continue
            relpath = str(PurePosixPath(prefix, image.relpath)) if prefixed and prefix else image.relpath
            if relpath in owner:
                raise SettingsError(f"{image.path} and {owner[relpath]} would write the same outputs ({relpath})")
            owner[relpath] = image.path
            seen_paths.add(resolved)
            images.append(ImageSource(image.path, relpath))
    return images


def output_stems(images: list[ImageSource]) -> list[str]:
    """Relative output path without suffix for each image: `dir/name`, or `dir/name.ext` when two
    images of a folder share a name with different extensions (`a.jpg`, `a.png`)."""
    stems = [str(PurePosixPath(image.relpath).with_suffix("")) for image in images]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    return [image.relpath if counts[stem] > 1 else stem for image, stem in zip(images, stems)]
