"""The `allspark` command: a thin Typer app over the core package.

Each command lives in its own module of this package and registers itself with `register(app)`.
The commands import torch (through the engine), which takes seconds on a loaded machine, so they
are registered on first use of `app` (`from allspark_cli.cli.app import app` gets the full app):
`allspark --version` is answered by `main()` without them.
"""
from __future__ import annotations

import functools
import sys
from typing import Annotated

from allspark_cli.threads import use_passive_wait

use_passive_wait()  # before anything imports torch: the OpenMP runtime reads it once, when it loads

import typer  # noqa: E402
from typer.core import TyperCommand  # noqa: E402

from allspark_cli import __version__
from allspark_cli.cli.command import AllsparkCommand
from allspark_cli.cli.errors import (
    ErrorReportingGroup,
    closed_pipe_exits_quietly,
    end_rich_output_quietly_at_closed_pipes,
)
from allspark_cli.errors import EnvError
from allspark_cli.torch_floor import check_torch_version

_root = typer.Typer(
    name="allspark",
    cls=ErrorReportingGroup,
    help="AllSpark semi-supervised semantic segmentation: prepare data, train, evaluate, predict, "
    "and look inside the Semantic Memory.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


VERSION_LINE = f"allspark {__version__}"
# Root options that may stand beside --version without changing what it prints.
_QUIET_ROOT_OPTIONS = {"--version", "--debug"}


def _print_version(value: bool) -> None:
    if value:
        typer.echo(VERSION_LINE)
        raise typer.Exit(0)


@_root.callback()
def root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
) -> None:
    """AllSpark semi-supervised semantic segmentation toolkit."""
    ctx.obj = {"debug": debug}


# Help panels of `allspark --help`, in the order of a project's life.
COMMAND_PANELS = {
    "prepare": "Data",
    "train": "Training and evaluation",
    "ablate": "Training and evaluation",
    "eval": "Training and evaluation",
    "predict": "Using a model",
    "inspect-memory": "Using a model",
    "export": "Using a model",
}


@functools.cache
def _app_with_commands() -> typer.Typer:
    from allspark_cli.cli import ablate
    from allspark_cli.cli import eval as eval_cmd
    from allspark_cli.cli import export, inspect_memory, predict, prepare, train

    for module in (prepare, train, ablate, eval_cmd, predict, inspect_memory, export):
        module.register(_root)
    for info in (*_root.registered_commands, *_root.registered_groups):
        info.rich_help_panel = COMMAND_PANELS.get(info.name, info.rich_help_panel)
    groups = [group.typer_instance for group in _root.registered_groups]
    for command in (*_root.registered_commands, *(c for g in groups for c in g.registered_commands)):
        if command.cls in (None, TyperCommand):  # typer's default: no class of the command's own
            command.cls = AllsparkCommand
    return _root


def __getattr__(name: str) -> typer.Typer:
    # `app` is the app with its commands, registered on first use (see the module docstring).
    if name == "app":
        return _app_with_commands()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _require_torch() -> None:
    """A torch below the floor fails here, in one line (exit 4), not deep inside a command."""
    try:
        check_torch_version()
    except EnvError as error:
        print(f"Error: {error}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None


_require_torch()
end_rich_output_quietly_at_closed_pipes()


def _asks_only_for_version(args: list[str]) -> bool:
    return "--version" in args and set(args) <= _QUIET_ROOT_OPTIONS


def main() -> None:
    if _asks_only_for_version(sys.argv[1:]):
        with closed_pipe_exits_quietly():
            print(VERSION_LINE, flush=True)
        return
    _app_with_commands()()
