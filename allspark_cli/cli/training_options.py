"""The training options `train` and `ablate` share, declared once (an option group,
option_groups.py): one recipe over a preset, turned into the same settings overrides by both.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from allspark_cli.cli.option_groups import with_option_group
from allspark_cli.cli.options import (
    AmpOption,
    BatchSizeOption,
    ConfigOption,
    CropOption,
    DataOption,
    DeviceOption,
    EpochsOption,
    AccumulateOption,
    LrOption,
    RecipeOption,
    SetOption,
    SplitOption,
    ThreadsOption,
    WorkersOption,
)
from allspark_cli.engine.settings import TrainSettings
from allspark_cli.engine.settings_layers import build_settings


@dataclass(frozen=True)
class TrainingOptions:
    """The recipe options of a training command; None means "not given" (the lower layers decide).

    Each field's annotation is its command-line option (options.py); the field order is the order
    of the options in --help."""

    config: ConfigOption = None
    data: DataOption = None
    split: SplitOption = None
    epochs: EpochsOption = None
    recipe: RecipeOption = None
    batch_size: BatchSizeOption = None
    crop: CropOption = None
    lr: LrOption = None
    amp: AmpOption = None
    device: DeviceOption = None
    workers: WorkersOption = None
    threads: ThreadsOption = None
    accumulate: AccumulateOption = None
    set_values: SetOption = None

    def overrides(self) -> dict[str, Any]:
        """The typed options as settings overrides ({"train.epochs": 3, ...}; None: not given)."""
        return {
            "train.epochs": self.epochs, "train.batch_size": self.batch_size, "data.crop": self.crop, "optim.lr": self.lr,
            "train.amp": self.amp, "train.device": self.device, "data.workers": self.workers,
            "data.manifest": str(self.data) if self.data else None, "data.split": self.split,
            "train.recipe": self.recipe, "train.accumulation_steps": _accumulation_value(self.accumulate),
        }

    def settings(
        self,
        base: Mapping[str, Any],
        *,
        options: Mapping[str, Any] | None = None,
        forced: Sequence[str] = (),
        method_recipes: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> TrainSettings:
        """The settings of a run: `base` < --config < environment < these options and the command's
        own `options` < --set < `forced` (KEY=VALUE settings the command itself decides)."""
        return build_settings(base=base, config=self.config, options={**self.overrides(), **(options or {})},
                              sets=[*(self.set_values or []), *forced], method_recipes=method_recipes)


def _accumulation_value(text: str | None) -> int | str | None:
    """--accumulate N|auto as the setting's value (validated with the settings: 0 or 'x' is refused there)."""
    if text is None:
        return None
    return int(text) if text.strip().lstrip("-").isdigit() else text.strip()


# `train` and `ablate` take the options as `training: TrainingOptions` under this decorator.
with_training_options = with_option_group("training", TrainingOptions)
