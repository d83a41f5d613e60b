"""The dataset manifest: `dataset.yaml`, the one file that describes a prepared dataset.

Every prepared dataset (pascal, cityscapes, coco, demo, custom) has a `dataset.yaml` in its output
folder; `train`, `eval` and `prepare check` read only this file and the split lists it names.
`root` is stored relative to the yaml's folder when the root lies inside that folder (so a dataset
folder can be moved as a whole) and absolutely otherwise; `load_manifest` always returns an
absolute `root`. Split paths are relative to `root` (format: `allspark_cli.data.splits`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from allspark_cli.constants import IGNORE_INDEX
from allspark_cli.errors import DataError
from allspark_cli.fileio import atomic_write_text
from allspark_cli.suggestions import did_you_mean

MANIFEST_NAME = "dataset.yaml"
# The training split that labels every training image (no unlabeled list): the supervised
# upper bound beside the ratio splits, never the default of a run.
FULL_SPLIT = "full"
# Masks are stored as 8-bit images, so class ids and the ignore value must fit in a byte.
MAX_MASK_VALUE = 255
EvalMode = Literal["whole", "slide", "center-crop"]


class TrainSplit(BaseModel):
    """A training split: labeled list (image + mask lines) and unlabeled list (None for `full`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labeled: str
    unlabeled: str | None = None


class DatasetManifest(BaseModel):
    """Contents of `dataset.yaml` (see the module docstring and docs/data-pipeline.md)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    root: Path
    classes: list[str] = Field(min_length=1)
    palette: list[tuple[int, int, int]]
    ignore_index: int = Field(default=IGNORE_INDEX, ge=0, le=MAX_MASK_VALUE)
    train_splits: dict[str, TrainSplit]
    eval_splits: dict[str, str]
    eval_mode: EvalMode = "whole"
    eval_crop: int | None = Field(default=None, gt=0)
    eval_stride: int | None = Field(default=None, gt=0)
    train_crop: int = Field(gt=0)
    # The `allspark prepare` options that determined the masks (e.g. coco `crowd: ignore`), for
    # the record; None for datasets whose masks no option changes.
    mask_options: dict[str, str] | None = None
    # True: images are read as displayed, their EXIF Orientation tag applied, and the masks are
    # in that orientation (`prepare custom`: phone photos); False: the stored pixels as they are
    # (the benchmarks, whose masks were drawn on the stored pixels, as the reference reads them).
    exif_orientation: bool = False

    @model_validator(mode="after")
    def _check_consistency(self) -> DatasetManifest:
        num_classes = len(self.classes)
        if num_classes > MAX_MASK_VALUE:
            raise ValueError(f"classes: at most {MAX_MASK_VALUE} classes fit in 8-bit masks, got {num_classes}")
        if len(set(self.classes)) != num_classes:
            raise ValueError("classes: class names must be unique")
        if len(self.palette) != num_classes:
            raise ValueError(f"palette: expected one colour per class ({num_classes}), got {len(self.palette)}")
        for colour in self.palette:
            if not all(0 <= value <= MAX_MASK_VALUE for value in colour):
                raise ValueError(f"palette: colour values must be in 0..255, got {list(colour)}")
        if self.ignore_index < num_classes:
            raise ValueError(f"ignore_index: must not be a class id (0..{num_classes - 1}), got {self.ignore_index}")
        if "val" not in self.eval_splits:
            raise ValueError("eval_splits: a 'val' split is required")
        if self.eval_mode != "whole" and self.eval_crop is None:
            raise ValueError(f"eval_crop: required with eval_mode '{self.eval_mode}'")
        if self.eval_mode == "slide" and self.eval_stride is None:
            raise ValueError("eval_stride: required with eval_mode 'slide'")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split_file(self, name: str) -> Path:
        """Absolute path of a split list: `name` is an eval split name ('val') or a path relative to root."""
        relpath = self.eval_splits.get(name, name)
        return Path(self.root) / relpath

    def default_train_split(self) -> str | None:
        """The training split a run takes when none is named: the only one, or else the only one
        besides `full`; None when that is ambiguous (several ratio splits)."""
        names = list(self.train_splits)
        if len(names) == 1:
            return names[0]
        ratios = [name for name in names if name != FULL_SPLIT]
        return ratios[0] if len(ratios) == 1 else None

    def train_split(self, name: str) -> TrainSplit:
        """The training split called `name`; DataError listing the available names otherwise."""
        if name not in self.train_splits:
            raise DataError(
                f"dataset '{self.name}' has no training split '{name}'; available: {', '.join(self.train_splits)}"
            )
        return self.train_splits[name]

    def eval_split_file(self, name: str) -> Path:
        """Absolute path of the eval split `name`; DataError listing the available names otherwise."""
        if name not in self.eval_splits:
            raise DataError(
                f"dataset '{self.name}' has no evaluation split '{name}'; available: {', '.join(self.eval_splits)}"
            )
        return Path(self.root) / self.eval_splits[name]


def _format_validation_error(error: ValidationError) -> str:
    # An unknown key first: a misspelt field ('clases') is also reported as the missing one.
    errors = sorted(error.errors(), key=lambda item: item["type"] != "extra_forbidden")
    first = errors[0]
    field = ".".join(str(part) for part in first["loc"]) or "manifest"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        key = str(first["loc"][-1])
        # A key inside a training split (train_splits.<name>.<key>) or at the top level.
        known = TrainSplit.model_fields if len(first["loc"]) == 3 else DatasetManifest.model_fields
        field, message = field.removesuffix(key).rstrip("."), f"unknown key '{key}'{did_you_mean(key, known)}"
        return f"{field + ': ' if field else ''}{message}"
    more = f" (and {error.error_count() - 1} more problems)" if error.error_count() > 1 else ""
    return f"{field}: {message}{more}"


def load_manifest(path: str | os.PathLike) -> DatasetManifest:
    """Reads and validates a `dataset.yaml` (or the `dataset.yaml` inside a folder).

    Returns the manifest with an absolute, existing `root`. Raises DataError naming the file and
    the offending field when the file is missing, not YAML, or does not match the schema.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"dataset manifest not found: {path} (run 'allspark prepare' first)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        reason = str(error).replace("\n", " ")
        raise DataError(f"{path}: not a readable YAML file: {reason}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a mapping of manifest fields, got {type(raw).__name__}")
    try:
        manifest = DatasetManifest.model_validate(raw)
    except ValidationError as error:
        raise DataError(f"{path}: {_format_validation_error(error)}") from None
    root = manifest.root if manifest.root.is_absolute() else path.parent / manifest.root
    root = Path(os.path.normpath(root.absolute()))
    if not root.is_dir():
        raise DataError(f"{path}: root: dataset root folder does not exist: {root}")
    return manifest.model_copy(update={"root": root})


def write_manifest(manifest: DatasetManifest, path: str | os.PathLike) -> None:
    """Atomically writes `manifest` to `path` (a relative `root` is taken relative to the yaml's folder)."""
    path = Path(path)
    folder = path.absolute().parent
    root = manifest.root if manifest.root.is_absolute() else folder / manifest.root
    root = Path(os.path.normpath(root.absolute()))
    stored_root = root.relative_to(folder).as_posix() if root.is_relative_to(folder) else root.as_posix()
    data = manifest.model_dump(mode="json")
    if data["mask_options"] is None:
        del data["mask_options"]  # only builders with mask options write the field
    if not data["exif_orientation"]:
        del data["exif_orientation"]  # only `prepare custom` writes the field
    data["root"] = stored_root or "."
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True)
    atomic_write_text(path, text)
