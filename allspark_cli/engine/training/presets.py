"""Presets: one YAML file per paper split in `presets/`, validated by the TrainSettings model.

A preset file holds its `name` (as users type it, e.g. `pascal-1/8`; the file is `pascal-1_8.yaml`),
`aliases` (e.g. `pascal-183`), the labeled count, the paper's mIoU and the table it comes from
(DESIGN.md section 3; null where the paper has none) for `--list-presets`, a complete `settings`
tree, and `baselines`: per baseline method (`sup`, `semi`) the settings that the reference's
baseline scripts change (applied by `build_settings(method_recipes=...)` when that method is
trained). Loading a preset validates the tree, and the tree with each baseline layer on top; the
CLI then layers --config, environment, options and --set on top.
"""
from __future__ import annotations

import difflib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from allspark_cli.engine.settings import TrainSettings
from allspark_cli.engine.settings_layers import check_keys, merge
from allspark_cli.errors import SettingsError
from allspark_cli.model.methods import METHODS, Method

# presets/ sits at the repository (or installed source) root, beside the package.
PRESET_DIR = Path(__file__).resolve().parents[3] / "presets"  # allspark_cli/engine/training/ -> root
PRESET_DIR_ENV = "ALLSPARK_PRESET_DIR"
# Display order of --list-presets: the paper's tables, then the demo; within a family by labels.
FAMILY_ORDER = ("pascal", "pascal-aug", "pascal-u2pl", "cityscapes", "coco", "demo")
# The paper's hardware: 8 labeled + 8 unlabeled images per step over 4 GPUs (DESIGN.md section 3).
PAPER_GPUS = 4
# `allspark train --data DATASET` without a preset trains with this preset's recipe (the demo's
# CPU-sized one: MiT-B0 from scratch, 3 epochs of at most 250 iterations) minus its dataset: the
# split and the crop then come from the dataset (engine/training/train_data.py with_dataset_defaults).
CUSTOM_RECIPE_PRESET = "demo-1/16"
DATASET_KEYS = ("manifest", "split", "crop")
CLOSE_NAMES = 4  # suggestions shown for an unknown preset
CLOSE_CUTOFF = 0.5  # difflib similarity below which a name is not suggested


class PresetFile(BaseModel):
    """The schema of a preset YAML file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    aliases: list[str] = []
    description: str = ""
    labeled_count: int | None = Field(default=None, ge=1)
    paper_miou: float | None = Field(default=None, ge=0.0, le=100.0)
    paper_source: str | None = Field(default=None, description="the paper's table of paper_miou, e.g. 'Table 3 †'")
    baselines: dict[Method, dict[str, Any]] = {}
    settings: TrainSettings

    @field_validator("baselines")
    @classmethod
    def _reference_baselines_only(cls, baselines: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        others = [name for name in baselines if not METHODS[name].reference_baseline]
        if others:
            scripted = [name for name, spec in METHODS.items() if spec.reference_baseline]
            raise ValueError(f"{', '.join(others)}: the reference has no baseline script for it; "
                             f"baselines are for {', '.join(scripted)}")
        return baselines


class Preset(BaseModel):
    """A loaded preset: its metadata, where it came from and its raw settings layer."""

    model_config = ConfigDict(frozen=True)

    info: PresetFile
    path: Path
    layer: dict[str, Any]

    @property
    def name(self) -> str:
        return self.info.name

    def baseline_settings(self, method: str) -> TrainSettings | None:
        """The preset's settings as the reference's baseline script of `method` trains them (None:
        the preset has no baseline recipe for `method`)."""
        recipe = self.info.baselines.get(method)
        if recipe is None:
            return None
        return TrainSettings.model_validate(merge(self.layer, merge(recipe, {"model": {"method": method}})))

    @property
    def folder_name(self) -> str:
        """File-system name of the preset (run folders): the file stem, e.g. pascal-1_8."""
        return self.path.stem


def preset_dir() -> Path:
    """The presets folder (overridable with the ALLSPARK_PRESET_DIR environment variable)."""
    override = os.environ.get(PRESET_DIR_ENV)
    return Path(override) if override else PRESET_DIR


def file_stem_for(name: str) -> str:
    """`pascal-1/8` -> `pascal-1_8` (slashes cannot be in file names)."""
    return name.replace("/", "_")


def read_preset_file(path: Path) -> Preset:
    """Reads and validates one preset file; SettingsError naming the file and the key on problems."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise SettingsError(f"{path}: not a readable preset file: {' '.join(str(error).split())}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("settings"), dict):
        raise SettingsError(f"{path}: a preset file needs 'name' and a 'settings' mapping")
    check_keys(raw["settings"], f"preset {path.name}")
    info = _validated(PresetFile, raw, f"{path}: ")
    for method, recipe in info.baselines.items():
        check_keys(recipe, f"preset {path.name} baselines.{method}")
        _validated(TrainSettings, merge(raw["settings"], recipe), f"{path}: baselines.{method}: ")
    layer = dict(raw["settings"])
    layer["preset"] = info.name
    return Preset(info=info, path=path, layer=layer)


def _validated(model: type[BaseModel], data: dict[str, Any], where: str):
    """`model.model_validate(data)`; SettingsError '<where><key.path>: <reason>' on the first problem."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        raise SettingsError(f"{where}{'.'.join(str(part) for part in first['loc'])}: {message}") from None


@lru_cache(maxsize=8)
def _load_all(directory: Path) -> tuple[Preset, ...]:
    if not directory.is_dir():
        raise SettingsError(f"presets folder not found: {directory}")
    return tuple(read_preset_file(path) for path in sorted(directory.glob("*.yaml")))


def _display_key(preset: Preset) -> tuple[int, int, str]:
    family = preset.name.rsplit("-", 1)[0]
    rank = FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)
    return rank, preset.info.labeled_count or 0, preset.name


def list_presets(directory: Path | None = None) -> list[Preset]:
    """Every preset of the folder, in display order (paper family, then labeled count)."""
    return sorted(_load_all((directory or preset_dir()).resolve()), key=_display_key)


def find_preset(name: str, directory: Path | None = None) -> Preset:
    """The preset called `name` (or one of its aliases, or a path to a preset file).

    Unknown names raise SettingsError listing the closest preset names.
    """
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return read_preset_file(candidate)
    presets = list_presets(directory)
    for preset in presets:
        if name in (preset.name, preset.folder_name, *preset.info.aliases):
            return preset
    names = [p.name for p in presets] + [alias for p in presets for alias in p.info.aliases]
    close = difflib.get_close_matches(name, names, n=CLOSE_NAMES, cutoff=CLOSE_CUTOFF)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise SettingsError(f"unknown preset '{name}'{hint} (see allspark train --list-presets)")


def custom_recipe(directory: Path | None = None) -> dict[str, Any]:
    """The settings layer of a run on your own data without a preset (CUSTOM_RECIPE_PRESET's
    recipe, with no preset name and no dataset: manifest, split and crop are the run's)."""
    layer = find_preset(CUSTOM_RECIPE_PRESET, directory).layer
    data = {key: value for key, value in layer["data"].items() if key not in DATASET_KEYS}
    return {**{key: value for key, value in layer.items() if key != "preset"}, "data": data}
