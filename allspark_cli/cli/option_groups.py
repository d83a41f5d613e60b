"""Options that several commands share, declared once as the fields of a dataclass (a group).

A command takes the group as one parameter (`training: TrainingOptions`) and is decorated with
`with_option_group("training", TrainingOptions)`; Typer then sees the group's fields as options,
in the place of that parameter and in the fields' order, and the command gets them back as one
instance. Each field's annotation is its command-line option (an alias of options.py), so the
commands offer the same options with the same help texts.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar, get_type_hints

Command = TypeVar("Command", bound=Callable[..., Any])


def with_option_group(parameter: str, group: type) -> Callable[[Command], Command]:
    """A decorator: the command's `parameter` shown to Typer as the fields of the dataclass `group`."""
    fields = dataclasses.fields(group)
    field_types = get_type_hints(group, include_extras=True)
    names = [field.name for field in fields]

    def decorate(command: Command) -> Command:
        signature = inspect.signature(command, eval_str=True)
        parameters: list[inspect.Parameter] = []
        for declared in signature.parameters.values():
            if declared.name != parameter:
                parameters.append(declared)
                continue
            parameters += [declared.replace(name=field.name, default=field.default, annotation=field_types[field.name])
                           for field in fields]

        @functools.wraps(command)
        def call(**values: Any) -> Any:
            options = group(**{name: values.pop(name) for name in names})
            return command(**values, **{parameter: options})

        call.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        call.__annotations__ = {declared.name: declared.annotation for declared in parameters}
        call.__annotations__["return"] = signature.return_annotation
        return call  # type: ignore[return-value]

    return decorate
