"""Training settings: one pydantic tree, validated once (field ranges, cross-field rules).

The tree is what `allspark train` runs with, what a run saves as config.yaml and what every
checkpoint stores. How it is built from layers (preset < --config < environment < options < --set)
is engine/settings_layers.py. The recipe values of the presets come from DESIGN.md section 3;
`model_config_for` is the one place settings turn into a ModelConfig.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from allspark_cli.constants import MIN_CROP
from allspark_cli.data.manifest import EvalMode
from allspark_cli.data.transforms import CUTMIX_PROBABILITY
from allspark_cli.model.config import ArchitectureChoices

# The layout of the settings tree as stored in checkpoints. 1: written before the number was stored
# (release 0.1 and the trees after it, up to the first settings version), the same keys minus
# those added since; 2: with the groups, baselines, CUDA math and ramp settings; 3: adds the
# recipe, loss weighting, collapse window, accumulation, run group; 4: adds the CutMix
# probability; 5: this tree (adds the distribution alignment and the EMA teacher). An allspark
# that knows an older version refuses a resume of a newer one in one line instead of failing on
# the unknown keys.
SETTINGS_VERSION = 5
# Marks a setting that changes where and how a run reports or how fast it runs, never what it
# computes: a resumed run may change it freely (engine/training/resume.py). Every field of a
# section marked so (RunSettings) is.
REPORTING_ONLY = {"reporting_only": True}
# A setting added after runs were saved without it: what a saved run that lacks it computed, so a
# resume of such a run counts it as unchanged when it still has that value (ANY_VALUE: a setting
# that only acts together with another new setting, which a run that lacks both never used).
ANY_VALUE = "any"


def unrecorded_means(value: Any) -> dict[str, Any]:
    return {"unrecorded_means": value}
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")

AmpMode = Literal["off", "bf16", "fp16"]
LossName = Literal["ce", "ohem"]
OptimizerName = Literal["sgd", "adamw"]
PseudoLabelPass = Literal["group", "image"]
UnlabeledPadding = Literal["pseudo-label", "ignore"]
Recipe = Literal["reference", "weak-to-strong"]
AccumulationSteps = Annotated[int, Field(ge=1)] | Literal["auto"]
LossWeighting = Literal["mean", "fixmatch"]
EpochLength = Literal["unlabeled", "labeled"]
BaselineRecipe = Literal["reference", "method"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSettings(_Section):
    """Which dataset, which labeled/unlabeled split, the training crop and loader workers."""

    # A resume may point it elsewhere: the run's dataset fingerprint (data/fingerprint.py), not the
    # path, is what must stay the same.
    manifest: Path = Field(description="dataset.yaml of a prepared dataset (or its folder)",
                           json_schema_extra=REPORTING_ONLY)
    split: str | None = Field(
        default=None, min_length=1,
        description="training split name as in the manifest, e.g. '183', '1/16'; null: the dataset's only split "
        "(besides 'full'), refused when it has several",
    )
    crop: int | None = Field(default=None, ge=MIN_CROP,
                             description="square training crop in pixels; null: the dataset's train_crop")
    workers: int = Field(default=4, ge=0, description="DataLoader worker processes per training process",
                         json_schema_extra=REPORTING_ONLY)


class ModelSettings(ArchitectureChoices):
    """The segmentor (DESIGN.md sections 1-2): the architecture choices (declared once, in
    model/config.py) and the local pretrained encoder weight file to start from."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    pretrained: Path | None = Field(
        default=Path("weights/mit_b5.pth"),
        description="pretrained encoder weights in their publisher's layout (e.g. mit_b5.pth of the SegFormer "
        "release; every family's file: README); null trains from scratch",
    )
    allow_partial_pretrained: bool = Field(
        default=False, description="load weights that cover the backbone only partly (otherwise refused)"
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
    unlabeled_rampup: int = Field(
        default=0,
        ge=0,
        description="iterations over which the unlabeled loss's weight rises from 0 to its full value "
        "(sigmoid ramp exp(-5 (1 - t/T)^2)); 0: full weight from the first step (the reference). "
        "Every method with an unlabeled loss shares it",
    )
    recipe: Recipe = Field(
        default="reference", json_schema_extra=unrecorded_means("reference"),
        description="unlabeled loss of every method that has one: reference (CE on the pseudo-labeled view itself, "
        "every pixel) or weak-to-strong (pseudo labels from the weak view, CE on a strong photometric + CutMix view "
        "of the same crop over the pixels whose weak confidence passes train.confidence_threshold; DESIGN.md 3a)",
    )
    confidence_threshold: float = Field(
        default=0.95, ge=0.0, le=1.0, json_schema_extra=unrecorded_means(ANY_VALUE),
        description="weak-to-strong: the max-softmax confidence a pseudo-labeled pixel needs to be trained on",
    )
    cutmix_probability: float = Field(
        default=CUTMIX_PROBABILITY, ge=0.0, le=1.0, json_schema_extra=unrecorded_means(CUTMIX_PROBABILITY),
        description="weak-to-strong: the chance that a strong view takes a box of its group partner's pixels "
        "(CutMix; 0.5 as UniMatch; 0: photometric strong view only)",
    )
    distribution_alignment: bool = Field(
        default=False, json_schema_extra=unrecorded_means(False),
        description="weak-to-strong: rescale the weak view's class probabilities before the argmax and the threshold "
        "so that their mean over the unlabeled pixels follows the labeled masks' class shares (ReMixMatch's "
        "distribution alignment; a teacher that under-predicts thin classes gives them their share back)",
    )
    teacher_momentum: float = Field(
        default=0.0, ge=0.0, lt=1.0, json_schema_extra=unrecorded_means(0.0),
        description="who pseudo-labels the unlabeled images: 0, the model being trained (the reference); m in "
        "(0, 1), an exponential moving average of its weights, t = m t + (1 - m) s after every step (Mean Teacher)",
    )
    loss_weighting: LossWeighting = Field(
        default="mean", json_schema_extra=unrecorded_means("mean"),
        description="mean: (loss_x + loss_u) / 2 (the reference, UniMatch); fixmatch: loss_x + unlabeled_weight x "
        "loss_u. sup trains loss_x at weight 1 under both (so fixmatch compares it at the same labeled weight)",
    )
    unlabeled_weight: float = Field(default=1.0, ge=0.0, description="lambda of the fixmatch weighting",
                                    json_schema_extra=unrecorded_means(ANY_VALUE))
    collapse_window: int = Field(
        default=100, ge=0, json_schema_extra=REPORTING_ONLY,
        description="iterations over which the pseudo labels' class shares are compared with the labeled masks' "
        "for the collapse warning (0: no warning)",
    )
    accumulation_steps: AccumulationSteps = Field(
        default="auto", json_schema_extra=unrecorded_means(1),
        description="micro-steps per optimizer step, each whole groups of the process's batch (forward and "
        "backward in pieces: the same step in less memory; only the head's BatchNorm batch statistics see fewer "
        "images). auto: 1 on CPU; on CUDA the fewest whose measured peak stays under train.memory_fraction",
    )
    memory_fraction: float = Field(
        default=0.9, gt=0.0, le=1.0, json_schema_extra=REPORTING_ONLY,  # its effect is accumulation_steps
        description="share of the device's memory that --accumulate auto lets one micro-step's peak reach",
    )
    loss: LossName = "ce"
    ohem_thresh: float = Field(default=0.7, gt=0.0, le=1.0)
    ohem_min_kept: int = Field(default=200_000, ge=1)
    seed: int = Field(default=0, ge=0)
    amp: AmpMode = "off"
    tf32: bool = Field(
        default=False,
        description="CUDA: float32 matrix products on TF32 tensor cores (10-bit mantissa inputs, float32 sums); "
        "false (the reference's torch 1.12 default): full float32 products. Convolutions keep torch's default (TF32)",
    )
    cudnn_benchmark: bool = Field(
        default=True, description="CUDA: time cuDNN's convolution algorithms once for the fixed training crop"
    )
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    log_every: int = Field(default=20, ge=1, description="iterations between metrics.jsonl lines",
                           json_schema_extra=REPORTING_ONLY)
    save_every: int = Field(default=0, ge=0, description="iterations between last.pt saves (0: every epoch only)",
                            json_schema_extra=REPORTING_ONLY)

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
    mode: EvalMode | None = None
    crop: int | None = Field(default=None, ge=MIN_CROP)
    stride: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=1, ge=1, json_schema_extra=REPORTING_ONLY)  # per-image exact inference
    mosaic_images: int = Field(default=4, ge=0, description="validation images in plots/val_mosaic.png",
                               json_schema_extra=REPORTING_ONLY)


class RunSettings(_Section):
    """Where the run folder goes: `<root>/<group>/<name>`; name auto-numbered exp, exp2, ...; the
    group named after the recipe and the dataset (engine/training/rundir.py `run_group`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, json_schema_extra=REPORTING_ONLY)

    root: Path = Path("runs")
    group: str | None = Field(default=None, description="the folder under root; null: from the preset and the dataset")
    name: str | None = None
    exist_ok: bool = False
    tensorboard: Literal["auto", "on", "off"] = Field(
        default="auto", description="TensorBoard events in RUN_DIR/tensorboard: auto = when the package is installed"
    )

    @field_validator("name", "group")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "/" in value or "\\" in value or value in (".", "..")):
            raise ValueError(f"a run name is one folder name without slashes, got {value!r}")
        return value


def unrecorded_settings() -> dict[str, Any]:
    """Dotted key -> what a saved run without that setting computed (see `unrecorded_means`)."""
    found: dict[str, Any] = {}
    for section_name, section in TrainSettings.model_fields.items():
        annotation = section.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            continue
        for name, info in annotation.model_fields.items():
            extra = info.json_schema_extra
            if isinstance(extra, dict) and "unrecorded_means" in extra:
                found[f"{section_name}.{name}"] = extra["unrecorded_means"]
    return found


def reporting_only_settings(section: type[BaseModel] | None = None, prefix: str = "") -> tuple[str, ...]:
    """The dotted keys marked REPORTING_ONLY (a marked section: every key below it)."""
    section = section or TrainSettings
    keys: list[str] = []
    for name, info in section.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            marked = annotation.model_config.get("json_schema_extra") == REPORTING_ONLY
            keys += [f"{prefix}{name}."] if marked else list(reporting_only_settings(annotation, f"{prefix}{name}."))
        elif info.json_schema_extra == REPORTING_ONLY:
            keys.append(f"{prefix}{name}")
    return tuple(keys)


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
    from allspark_cli.model.config import ModelConfig, grid_for_crop, tokens_for_crop

    return ModelConfig(
        backbone=settings.model.backbone,
        method=settings.model.method,
        num_classes=num_classes,
        head_dim=settings.model.head_dim,
        attention_heads=settings.model.attention_heads,
        memory_multiple=settings.model.memory_multiple,
        memory_tokens=tokens_for_crop(settings.data.crop, settings.model.backbone),
        memory_grid=grid_for_crop(settings.data.crop, settings.model.backbone),
        drop_path_rate=settings.model.drop_path_rate,
        attention_path=settings.model.attention_path,
    )
