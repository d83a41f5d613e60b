"""Training settings: one pydantic tree, built from layers in a fixed order of precedence.

Precedence (later wins): preset (`presets/*.yaml`) < `--config FILE` < environment variables
`ALLSPARK_<SECTION>__<FIELD>` (e.g. `ALLSPARK_TRAIN__EPOCHS=3`) < typed command-line options
(`--epochs`, ...) < repeatable `--set section.field=value`. Environment and `--set` values are
parsed with `yaml.safe_load` (never eval). Every layer is checked for unknown keys (with a
did-you-mean) before the merge, and the merged tree is validated once (field ranges, cross-field
rules); both failures raise SettingsError naming the key path. The recipe values of the presets
come from DESIGN.md section 3; `model_config_for` is the one place settings turn into a ModelConfig.
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from allspark_cli.constants import AttentionPath
from allspark_cli.errors import SettingsError

ENV_PREFIX = "ALLSPARK_"
ENV_SEPARATOR = "__"
MIN_CROP = 32  # the stride-32 stage needs at least one token
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
SUGGESTION_CUTOFF = 0.6  # difflib similarity below which no did-you-mean is offered

Backbone = Literal["b0", "b1", "b2", "b3", "b4", "b5"]
MethodName = Literal["sup", "semi", "cca", "cca+smem", "allspark"]
AmpMode = Literal["off", "bf16", "fp16"]
LossName = Literal["ce", "ohem"]
OptimizerName = Literal["sgd", "adamw"]
PseudoLabelPass = Literal["group", "image"]
UnlabeledPadding = Literal["pseudo-label", "ignore"]
EpochLength = Literal["unlabeled", "labeled"]
BaselineRecipe = Literal["reference", "method"]
EvalModeName = Literal["whole", "slide", "center-crop"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSettings(_Section):
    """Which dataset, which labeled/unlabeled split, the training crop and loader workers."""

    manifest: Path = Field(description="dataset.yaml of a prepared dataset (or its folder)")
    split: str = Field(min_length=1, description="training split name as in the manifest, e.g. '183', '1/16'")
    crop: int = Field(default=513, ge=MIN_CROP, description="square training crop in pixels")
    workers: int = Field(default=4, ge=0, description="DataLoader worker processes per training process")


class ModelSettings(_Section):
    """The segmentor (DESIGN.md sections 1-2); `pretrained` is the local MiT ImageNet weight file."""

    backbone: Backbone = "b5"
    method: MethodName = "allspark"
    head_dim: int = Field(default=768, ge=1, description="SegFormer head embedding width E")
    attention_heads: int = Field(default=2, ge=1)
    memory_multiple: int = Field(default=1, ge=1, description="memory length S = multiple * C")
    drop_path_rate: float = Field(default=0.1, ge=0.0, lt=1.0)
    pretrained: Path | None = Field(
        default=Path("weights/mit_b5.pth"),
        description="MiT ImageNet weights (SegFormer release mit_bX.pth); null trains from scratch",
    )
    allow_partial_pretrained: bool = Field(
        default=False, description="load weights that cover the backbone only partly (otherwise refused)"
    )
    attention_path: AttentionPath = Field(
        default="auto",
        description="labeled-branch attention: eager (plain autograd), sdpa (fused kernels), frugal (the "
        "memory-lean function); auto = frugal on CPU, on CUDA eager when its maps fit in free memory, else frugal",
    )


class OptimSettings(_Section):
    """SGD with two parameter groups and a per-iteration poly decay (DESIGN.md section 3).

    `name: adamw` is offered for training from scratch (the demo presets): without ImageNet
    weights SGD needs far more iterations than a CPU demo can afford. `momentum` is SGD's only.
    """

    name: OptimizerName = "sgd"
    lr: float = Field(default=0.001, gt=0.0, description="backbone learning rate (global batch)")
    head_lr_multiplier: float = Field(default=10.0, gt=0.0, description="head/module lr = lr * this")
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=1e-4, ge=0.0)
    poly_power: float = Field(default=0.9, gt=0.0)


class LoopSettings(_Section):
    """Length, batch, loss, device and bookkeeping of the training loop."""

    epochs: int = Field(default=80, ge=1, description="passes over the unlabeled list")
    epoch_iterations: int | None = Field(
        default=None, ge=1, description="cap on iterations per epoch (null: one full pass, the paper's epoch)"
    )
    batch_size: int = Field(default=8, ge=1, description="GLOBAL images of each kind (labeled, unlabeled) per step")
    group_size: int | None = Field(
        default=None,
        ge=1,
        description="images of each kind per group, as one reference GPU held them: keys/values, the pseudo-label "
        "pass and the losses (OHEM's min_kept too) work within each group; null: the process's whole batch",
    )
    pseudo_label_pass: PseudoLabelPass = Field(
        default="group",
        description="group: the reference's eval-mode pass, keys pooled over the group's unlabeled images; "
        "image: each image on its own, as inference",
    )
    unlabeled_padding: UnlabeledPadding = Field(
        default="pseudo-label",
        description="padded border of unlabeled crops: pseudo-labeled and trained on (the reference) or ignored",
    )
    epoch_length: EpochLength = Field(
        default="unlabeled",
        description="one epoch is a pass over the unlabeled list (labeled list repeated) or over the labeled list",
    )
    baseline_recipe: BaselineRecipe = Field(
        default="reference",
        description="sup/semi on a preset with baseline recipes: the reference's baseline scripts (reference) "
        "or the preset's AllSpark recipe unchanged (method)",
    )
    warmup_epochs: int = Field(default=5, ge=0, description="epochs before the memory replaces the keys/values")
    loss: LossName = "ce"
    ohem_thresh: float = Field(default=0.7, gt=0.0, le=1.0)
    ohem_min_kept: int = Field(default=200_000, ge=1)
    seed: int = Field(default=0, ge=0)
    amp: AmpMode = "off"
    tf32: bool = Field(
        default=True,
        description="CUDA: float32 matrix products and convolutions on TF32 tensor cores (10-bit mantissa inputs, "
        "float32 sums); false: full float32 products, as torch's own default",
    )
    cudnn_benchmark: bool = Field(
        default=True, description="CUDA: time cuDNN's convolution algorithms once for the fixed training crop"
    )
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    log_every: int = Field(default=20, ge=1, description="iterations between metrics.jsonl lines")
    save_every: int = Field(default=0, ge=0, description="iterations between last.pt saves (0: every epoch only)")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        text = value.strip().lower()
        index = text.partition(":")[2]
        if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and index.isdigit()):
            return text
        raise ValueError(f"expected one of {', '.join(DEVICE_CHOICES)}, got {value!r}")


class EvalSettings(_Section):
    """In-training evaluation; mode/crop/stride default to the manifest's protocol when null."""

    split: str = "val"
    every: int = Field(default=1, ge=1, description="epochs between evaluations (the last epoch always)")
    mode: EvalModeName | None = None
    crop: int | None = Field(default=None, ge=MIN_CROP)
    stride: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=1, ge=1)
    mosaic_images: int = Field(default=4, ge=0, description="validation images in plots/val_mosaic.png")


class RunSettings(_Section):
    """Where the run folder goes: `<root>/<preset>/<name>`; name auto-numbered exp, exp2, ..."""

    root: Path = Path("runs")
    name: str | None = None
    exist_ok: bool = False
    tensorboard: Literal["auto", "on", "off"] = Field(
        default="auto", description="TensorBoard events in RUN_DIR/tensorboard: auto = when the package is installed"
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "/" in value or "\\" in value or value in (".", "..")):
            raise ValueError(f"a run name is one folder name without slashes, got {value!r}")
        return value


class TrainSettings(_Section):
    """Everything `allspark train` needs; saved as the run's config.yaml and inside checkpoints."""

    preset: str | None = None
    data: DataSettings
    model: ModelSettings = ModelSettings()
    optim: OptimSettings = OptimSettings()
    train: LoopSettings = LoopSettings()
    eval: EvalSettings = EvalSettings()
    run: RunSettings = RunSettings()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe dict (paths as strings): the form stored in config.yaml and checkpoints."""
        return self.model_dump(mode="json")


def model_config_for(settings: TrainSettings, num_classes: int):
    """The one builder from settings to `allspark_cli.model.config.ModelConfig`."""
    from allspark_cli.model.config import ModelConfig, tokens_for_crop

    return ModelConfig(
        backbone=settings.model.backbone,
        method=settings.model.method,
        num_classes=num_classes,
        head_dim=settings.model.head_dim,
        attention_heads=settings.model.attention_heads,
        memory_multiple=settings.model.memory_multiple,
        memory_tokens=tokens_for_crop(settings.data.crop),
        drop_path_rate=settings.model.drop_path_rate,
        attention_path=settings.model.attention_path,
    )


# ---------------------------------------------------------------- layers and the merge


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


def did_you_mean(key: str, candidates: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest candidate, or '' when none is close."""
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=SUGGESTION_CUTOFF)
    if not close:
        last = key.rsplit(".", 1)[-1]
        close = [c for c in candidates if c.rsplit(".", 1)[-1] == last][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


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
    recipe = (method_recipes or {}).get(_leaf(merged, "model.method", "allspark"))
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
