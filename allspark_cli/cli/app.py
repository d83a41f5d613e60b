"""The `allspark` command: a thin Typer app over the core package.

Each command lives in its own module of this package and registers itself with `register(app)`.
"""
from __future__ import annotations

import sys
from typing import Annotated

from allspark_cli.threads import use_passive_wait

use_passive_wait()  # before anything imports torch: the OpenMP runtime reads it once, when it loads

import typer  # noqa: E402

from allspark_cli import __version__
from allspark_cli.cli.errors import ErrorReportingGroup
from allspark_cli.errors import EnvError
from allspark_cli.torch_floor import check_torch_version

app = typer.Typer(
    name="allspark",
    cls=ErrorReportingGroup,
    help="AllSpark semi-supervised semantic segmentation: prepare data, train, evaluate, predict, "
    "and look inside the Semantic Memory.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"allspark {__version__}")
        raise typer.Exit(0)


@app.callback()
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


def _register_commands() -> None:
    from allspark_cli.cli import ablate
    from allspark_cli.cli import eval as eval_cmd
    from allspark_cli.cli import export, inspect_memory, predict, prepare, train

    for module in (prepare, train, ablate, eval_cmd, predict, inspect_memory, export):
        module.register(app)
    for info in (*app.registered_commands, *app.registered_groups):
        info.rich_help_panel = COMMAND_PANELS.get(info.name, info.rich_help_panel)


def _require_torch() -> None:
    """A torch below the floor fails here, in one line (exit 4), not deep inside a command."""
    try:
        check_torch_version()
    except EnvError as error:
        print(f"Error: {error}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None


_require_torch()
_register_commands()


def main() -> None:
    app()
