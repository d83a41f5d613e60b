"""The training options `train` and `ablate` share, declared once: one recipe over a preset.

A command takes them as one parameter `training: TrainingOptions` and is decorated with
`with_training_options`; Typer then sees the fields below as options, in the place of that
parameter and in their order here, and the command gets them back as one TrainingOptions. So the
two commands offer the same options with the same help texts, and turn them into the same
settings overrides.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, get_type_hints

from allspark_cli.cli.options import (
    AmpOption,
    BatchSizeOption,
    ConfigOption,
    CropOption,
    DataOption,
    DeviceOption,
    EpochsOption,
    LrOption,
    SetOption,
    WorkersOption,
)
from allspark_cli.engine.settings import TrainSettings
from allspark_cli.engine.settings_layers import build_settings

# The parameter of a decorated command that receives the options.
TRAINING_PARAMETER = "training"
Command = TypeVar("Command", bound=Callable[..., Any])


@dataclass(frozen=True)
class TrainingOptions:
    """The recipe options of a training command; None means "not given" (the lower layers decide).

    Each field's annotation is its command-line option (options.py); the field order is the order
    of the options in --help."""

    config: ConfigOption = None
    data: DataOption = None
    epochs: EpochsOption = None
    batch_size: BatchSizeOption = None
    crop: CropOption = None
    lr: LrOption = None
    amp: AmpOption = None
    device: DeviceOption = None
    workers: WorkersOption = None
    set_values: SetOption = None

    def overrides(self) -> dict[str, Any]:
        """The typed options as settings overrides ({"train.epochs": 3, ...}; None: not given)."""
        return {
            "train.epochs": self.epochs, "train.batch_size": self.batch_size, "data.crop": self.crop, "optim.lr": self.lr,
            "train.amp": self.amp, "train.device": self.device, "data.workers": self.workers,
            "data.manifest": str(self.data) if self.data else None,
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


def with_training_options(command: Command) -> Command:
    """`command`, its `training: TrainingOptions` parameter shown to Typer as the TrainingOptions fields."""
    signature = inspect.signature(command, eval_str=True)
    field_types = get_type_hints(TrainingOptions, include_extras=True)
    fields = dataclasses.fields(TrainingOptions)
    names = [field.name for field in fields]
    parameters: list[inspect.Parameter] = []
    for parameter in signature.parameters.values():
        if parameter.name != TRAINING_PARAMETER:
            parameters.append(parameter)
            continue
        parameters += [parameter.replace(name=field.name, default=field.default, annotation=field_types[field.name])
                       for field in fields]

    @functools.wraps(command)
    def call(**values: Any) -> Any:
        training = TrainingOptions(**{name: values.pop(name) for name in names})
        return command(**values, **{TRAINING_PARAMETER: training})

    call.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    call.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
    call.__annotations__["return"] = signature.return_annotation
    return call  # type: ignore[return-value]
