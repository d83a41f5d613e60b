"""Settings from layers in a fixed order of precedence, merged and validated once.

Precedence (later wins): preset (`allspark_cli/presets/*.yaml`) < `--config FILE` < environment variables
`ALLSPARK_<SECTION>__<FIELD>` (e.g. `ALLSPARK_TRAIN__EPOCHS=3`) < typed command-line options
(`--epochs`, ...) < repeatable `--set section.field=value`. Environment and `--set` values are
parsed with `yaml.safe_load` (never eval). Every layer is checked for unknown keys (with a
did-you-mean) before the merge, and the merged tree is validated once as TrainSettings
(engine/settings.py); both failures raise SettingsError naming the key path.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from allspark_cli.engine.settings import TrainSettings
from allspark_cli.errors import SettingsError
from allspark_cli.model.methods import DEFAULT_METHOD
from allspark_cli.suggestions import did_you_mean

ENV_PREFIX = "ALLSPARK_"
ENV_SEPARATOR = "__"


def _known_paths(model: type[BaseModel], prefix: str = "") -> dict[str, type[BaseModel] | None]:
    """Every dotted key of the tree -> its section class (None for leaves)."""
    paths: dict[str, type[BaseModel] | None] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        paths[prefix + name] = annotation if is_section else None
        if is_section:
            paths.update(_known_paths(annotation, prefix + name + "."))
    return paths


KNOWN_PATHS = _known_paths(TrainSettings)


def check_keys(layer: Mapping[str, Any], source: str, prefix: str = "") -> None:
    """Raises SettingsError for the first key of `layer` that is not a setting, naming `source`.

    Unknown keys are reported with their full dotted path (e.g. 'trian.epochs') and the closest
    known setting.
    """
    for key, value in layer.items():
        path = f"{prefix}{key}"
        known = path in KNOWN_PATHS
        if known and KNOWN_PATHS[path] is None:
            continue
        if isinstance(value, Mapping) and value:
            check_keys(value, source, path + ".")
        elif known:
            raise SettingsError(f"setting '{path}' in {source} is a section: expected a mapping, got {value!r}")
        else:
            raise SettingsError(f"unknown setting '{path}' in {source}{did_you_mean(path, list(KNOWN_PATHS))}")


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of nested dicts: values of `override` win; neither input is modified."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def nest(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """{'train.epochs': 3} -> {'train': {'epochs': 3}}."""
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _yaml_value(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise SettingsError(f"{source}: value {text!r} is not valid YAML") from None


def read_settings_file(path: str | os.PathLike, source: str | None = None) -> dict[str, Any]:
    """A YAML mapping of settings from `path` (keys checked); SettingsError naming the file otherwise."""
    path = Path(path)
    source = source or str(path)
    if not path.is_file():
        raise SettingsError(f"settings file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise SettingsError(f"{path}: not a readable YAML file: {' '.join(str(error).split())}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    check_keys(raw, source)
    return raw


def env_layer(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Settings from `ALLSPARK_<SECTION>__<FIELD>` variables (lower-cased key path, YAML values).

    Variables without the double underscore (e.g. ALLSPARK_DEBUG) are not settings and are skipped.
    """
    environ = os.environ if environ is None else environ
    dotted: dict[str, Any] = {}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or ENV_SEPARATOR not in name:
            continue
        path = name[len(ENV_PREFIX):].lower().replace(ENV_SEPARATOR, ".")
        dotted[path] = _yaml_value(text, f"environment variable {name}")
    layer = nest(dotted)
    check_keys(layer, "the environment (ALLSPARK_<SECTION>__<FIELD>)")
    return layer


def set_layer(items: list[str]) -> dict[str, Any]:
    """Settings from repeated `--set key.path=value` items (values YAML-parsed)."""
    dotted: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"--set expects key.path=value, got {item!r}")
        dotted[key.strip()] = _yaml_value(text, f"--set {key.strip()}")
    layer = nest(dotted)
    check_keys(layer, "--set")
    return layer


def options_layer(options: Mapping[str, Any]) -> dict[str, Any]:
    """Settings from typed options given as {'train.epochs': 3, ...}; None means 'not given'."""
    layer = nest({key: value for key, value in options.items() if value is not None})
    check_keys(layer, "the command-line options")
    return layer


def validate_settings(merged: Mapping[str, Any]) -> TrainSettings:
    """The merged tree as TrainSettings; SettingsError with `key.path: reason` on the first problem."""
    try:
        return TrainSettings.model_validate(dict(merged))
    except ValidationError as error:
        problems = []
        for item in error.errors():
            path = ".".join(str(part) for part in item["loc"])
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] == "missing":
                message = "required but not given (by the preset, --config or --set)"
            problems.append(f"{path}: {message}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None


def build_settings(
    *,
    base: Mapping[str, Any] | None = None,
    config: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
    options: Mapping[str, Any] | None = None,
    sets: list[str] | None = None,
    method_recipes: Mapping[str, Mapping[str, Any]] | None = None,
) -> TrainSettings:
    """Merges base (a preset or a resumed run's settings) < config file < environment < options < --set.

    `method_recipes` ({method: settings layer}, a preset's `baselines`): when the merged method has
    one and `train.baseline_recipe` is 'reference', that layer goes right above the base, so every
    explicit override still wins over it.
    """
    layers = [dict(base or {})]
    if config is not None:
        layers.append(read_settings_file(config, f"--config {config}"))
    layers.append(env_layer(environ))
    layers.append(options_layer(options or {}))
    layers.append(set_layer(list(sets or [])))
    merged = _merge_all(layers)
    recipe = (method_recipes or {}).get(_leaf(merged, "model.method", DEFAULT_METHOD))
    if recipe and _leaf(merged, "train.baseline_recipe", "reference") == "reference":
        merged = _merge_all([layers[0], dict(recipe), *layers[1:]])
    return validate_settings(merged)


def _merge_all(layers: list[Mapping[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = merge(merged, layer)
    return merged


def _leaf(tree: Mapping[str, Any], path: str, default: Any) -> Any:
    """The value at dotted `path` of a nested mapping, or `default` when a part is missing."""
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def dump_settings_yaml(settings: TrainSettings) -> str:
    """config.yaml text: the resolved settings, readable and re-loadable with --config."""
    return yaml.safe_dump(settings.to_dict(), sort_keys=False, default_flow_style=False)
