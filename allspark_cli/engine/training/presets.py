"""Presets: per-family YAML files in `allspark_cli/presets/`, validated by the TrainSettings model.

A family file (`pascal.yaml`: the family is the file name) holds what every preset of the family
shares and one entry per split (DESIGN.md section 3 gives the recipes):

    order: 1                      # place of the family in --list-presets (paper tables, then demo)
    extends: pascal               # optional: another family's settings and baselines as the base
    builder: demo                 # optional: the dataset builder a run may call when data is missing
    description: 'Pascal VOC 2012 original split, {labeled_count} labeled of ...'  # {split} too
    paper_source: Table 1         # the paper's table of paper_miou
    baselines: {sup: {train: {batch_size: 16}}}   # what the reference's baseline scripts change
    settings: {data: {...}, model: {...}, ...}    # the settings tree, less data.split
    splits:
      1/16: {data_split: '92', labeled_count: 92, paper_miou: 76.07, aliases: [pascal-92]}
      full: {data_split: '1464', labeled_count: 1464, paper_miou: 82.12, aliases: [pascal-1464]}

Each split is one preset named `<family>-<split>` (`pascal-1/16`; folder name `pascal-1_16`): the
family's settings, with the split's own `settings` (e.g. demo-full's `model.method: sup`) on top
and data.split = `data_split` (default: the split's name); a split's `description` replaces the
family's. A preset file of one's own (`--preset mine.yaml`, or beside the family files of an
ALLSPARK_PRESET_DIR folder) is one preset in the PresetFile schema: `name`, `aliases`,
`labeled_count`, `paper_miou`, `paper_source`, `baselines` and a complete `settings` tree. Loading
validates every preset's tree, and the tree with each baseline layer on top; the CLI then layers
--config, environment, options and --set on top.
"""
from __future__ import annotations

import difflib
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from allspark_cli.engine.settings import TrainSettings
from allspark_cli.engine.settings_layers import check_keys, merge
from allspark_cli.errors import SettingsError
from allspark_cli.model.methods import METHODS, Method

# Package data beside the code, so that an installed wheel has the presets wherever it runs.
PRESET_DIR = Path(__file__).resolve().parents[2] / "presets"  # allspark_cli/engine/training/ -> allspark_cli/
PRESET_DIR_ENV = "ALLSPARK_PRESET_DIR"
# The dataset builders a family may name; the CLI maps each to its function (the engine never
# imports the builders).
DatasetBuilder = Literal["demo"]
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
    """One preset: the schema of a user's own preset file, and what each family split expands to."""

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


class PresetSplit(BaseModel):
    """One split of a family file: what its preset adds to the family's."""

    model_config = ConfigDict(extra="forbid")

    data_split: str | None = Field(default=None, description="data.split; null: the split's own name")
    labeled_count: int = Field(ge=1)
    paper_miou: float | None = Field(default=None, ge=0.0, le=100.0)
    aliases: list[str] = []
    description: str | None = Field(default=None, description="null: the family's, filled in")
    settings: dict[str, Any] = {}


class PresetFamily(BaseModel):
    """The schema of a family file (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    order: int
    extends: str | None = None
    builder: DatasetBuilder | None = None
    description: str = Field(min_length=1)
    paper_source: str | None = None
    baselines: dict[Method, dict[str, Any]] = {}
    settings: dict[str, Any] = {}
    splits: dict[str, PresetSplit] = Field(min_length=1)


class FamilyFacts(BaseModel):
    """The facts of a preset's family that the code acts on."""

    model_config = ConfigDict(frozen=True)

    name: str
    order: int
    builder: DatasetBuilder | None = None


class Preset(BaseModel):
    """A loaded preset: its metadata, where it came from, its family and its raw settings layer."""

    model_config = ConfigDict(frozen=True)

    info: PresetFile
    path: Path
    layer: dict[str, Any]
    family: FamilyFacts | None = None  # None: a preset file of one's own

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
        """File-system name of the preset (run folders), e.g. pascal-1_8; a file of one's own: its stem."""
        return self.path.stem if self.family is None else file_stem_for(self.name)


def preset_dir() -> Path:
    """The presets folder (overridable with the ALLSPARK_PRESET_DIR environment variable)."""
    override = os.environ.get(PRESET_DIR_ENV)
    return Path(override) if override else PRESET_DIR


def file_stem_for(name: str) -> str:
    """`pascal-1/8` -> `pascal-1_8` (slashes cannot be in file names)."""
    return name.replace("/", "_")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise SettingsError(f"{path}: not a readable preset file: {' '.join(str(error).split())}") from None
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}: a preset file needs 'name' and a 'settings' mapping")
    return raw


def read_preset_file(path: Path) -> Preset:
    """Reads and validates one preset file of one's own; SettingsError naming the file and the key."""
    return _own_preset(_read_yaml(path), path)


def _own_preset(raw: dict[str, Any], path: Path) -> Preset:
    if not isinstance(raw.get("settings"), dict):
        raise SettingsError(f"{path}: a preset file needs 'name' and a 'settings' mapping")
    return _preset(raw, path, f"{path}: ", family=None)


def _preset(raw: dict[str, Any], path: Path, where: str, family: FamilyFacts | None) -> Preset:
    """A Preset from a tree in the PresetFile schema; `where` starts each error message."""
    check_keys(raw["settings"], f"preset {path.name}")
    info = _validated(PresetFile, raw, where)
    for method, recipe in info.baselines.items():
        check_keys(recipe, f"preset {path.name} baselines.{method}")
        _validated(TrainSettings, merge(raw["settings"], recipe), f"{where}baselines.{method}: ")
    layer = dict(raw["settings"])
    layer["preset"] = info.name
    return Preset(info=info, path=path, layer=layer, family=family)


def _validated(model: type[BaseModel], data: dict[str, Any], where: str):
    """`model.model_validate(data)`; SettingsError '<where><key.path>: <reason>' on the first problem."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        raise SettingsError(f"{where}{'.'.join(str(part) for part in first['loc'])}: {message}") from None


def _family_presets(path: Path, families: dict[str, PresetFamily]) -> list[Preset]:
    """The presets of the family file at `path`, one per split; `families` holds every family of
    the folder (by name) for `extends`."""
    name = path.stem
    family = families[name]
    settings, baselines = _family_base(name, families, path)
    facts = FamilyFacts(name=name, order=family.order, builder=family.builder)
    presets = []
    for split, entry in family.splits.items():
        check_keys(entry.settings, f"preset family {path.name} splits.{split}")
        layer = merge(merge(settings, entry.settings), {"data": {"split": entry.data_split or split}})
        raw = {
            "name": f"{name}-{split}",
            "aliases": entry.aliases,
            "description": entry.description or _described(family.description, path, split, entry.labeled_count),
            "labeled_count": entry.labeled_count,
            "paper_miou": entry.paper_miou,
            "paper_source": family.paper_source,
            "baselines": baselines,
            "settings": layer,
        }
        presets.append(_preset(raw, path, f"{path}: splits.{split}: ", facts))
    return presets


def _described(template: str, path: Path, split: str, labeled_count: int) -> str:
    """The family's description of one split: `{split}` and `{labeled_count}` filled in."""
    try:
        return template.format(split=split, labeled_count=labeled_count)
    except KeyError as error:
        detail = f"{{{error.args[0]}}} is not a placeholder"
    except (IndexError, ValueError) as error:
        detail = str(error)
    raise SettingsError(f"{path}: description: {detail} (it may hold {{split}} and {{labeled_count}})")


def _family_base(name: str, families: dict[str, PresetFamily], path: Path,
                 seen: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """The settings and baselines family `name` gives its splits: those of the family it extends
    (recursively), with its own on top."""
    if name in seen:
        raise SettingsError(f"{path}: extends: families extend each other in a circle ({' -> '.join((*seen, name))})")
    family = families[name]
    check_keys(family.settings, f"preset family {name}.yaml")
    if family.extends is None:
        return family.settings, dict(family.baselines)
    if family.extends not in families:
        raise SettingsError(f"{path}: extends: no preset family '{family.extends}' beside it")
    settings, baselines = _family_base(family.extends, families, path, (*seen, name))
    for method, recipe in family.baselines.items():
        baselines[method] = merge(baselines.get(method, {}), recipe)
    return merge(settings, family.settings), baselines


@lru_cache(maxsize=8)
def _load_all(directory: Path) -> tuple[Preset, ...]:
    """Every preset of the folder: a file with `splits` is a family, any other one preset."""
    if not directory.is_dir():
        raise SettingsError(f"presets folder not found: {directory}")
    raws = {path: _read_yaml(path) for path in sorted(directory.glob("*.yaml"))}
    families = {path.stem: _validated(PresetFamily, raw, f"{path}: ") for path, raw in raws.items() if "splits" in raw}
    presets: list[Preset] = []
    for path in raws:
        presets += _family_presets(path, families) if path.stem in families else [_own_preset(raws[path], path)]
    owners: dict[str, Path] = {}
    for preset in presets:
        for name in (preset.name, *preset.info.aliases):
            if name in owners:
                raise SettingsError(f"preset name '{name}' is given twice: in {owners[name]} and {preset.path}")
            owners[name] = preset.path
    return tuple(presets)


def _display_key(preset: Preset) -> tuple[float, int, str]:
    order = math.inf if preset.family is None else preset.family.order
    return order, preset.info.labeled_count or 0, preset.name


def list_presets(directory: Path | None = None) -> list[Preset]:
    """Every preset of the folder, in display order (family order, then labeled count)."""
    return sorted(_load_all((directory or preset_dir()).resolve()), key=_display_key)


def preset_named(name: str, directory: Path | None = None) -> Preset | None:
    """The preset called `name` (its name, folder name or an alias); None when there is none."""
    for preset in list_presets(directory):
        if name in (preset.name, preset.folder_name, *preset.info.aliases):
            return preset
    return None


def find_preset(name: str, directory: Path | None = None) -> Preset:
    """The preset called `name` (or one of its aliases, or a path to a preset file).

    Unknown names raise SettingsError listing the closest preset names.
    """
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return read_preset_file(candidate)
    found = preset_named(name, directory)
    if found is not None:
        return found
    presets = list_presets(directory)
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
