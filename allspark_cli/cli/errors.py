"""The one place where errors cross into the CLI: one stderr line and a stable exit code.

`--debug` (or ALLSPARK_DEBUG=1) re-raises instead, so the full traceback is shown.
"""
from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

import rich.console
import typer
from pydantic import ValidationError
from typer import _click
from typer.core import TyperGroup

from allspark_cli.errors import AllsparkError
from allspark_cli.fileio import write_error
from allspark_cli.signals import stop_signals_interrupt

INTERNAL_ERROR_EXIT = 1
SETTINGS_EXIT = 2
OOM_EXIT = 5
INTERRUPTED_EXIT = 130
# The reader of the output has gone (`allspark train --help | head -1`): it asked for no more, so
# stopping there is success, as for any filter in a pipe.
CLOSED_PIPE_EXIT = 0
# OSErrors that only a write can raise: reported as WriteError (exit 6) wherever they happen (a log
# line, a metrics record, ...); a permission error may come from a read, so only atomic writes
# (allspark_cli.fileio) name it a write failure.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


# Exceptions through which typer itself reports usage, help and exit: they pass untouched.
# (typer >= 0.20 vendors click, so its exceptions derive from typer.TyperException.)
_PASS_THROUGH = (typer.Exit, typer.Abort, typer.TyperException)


def _end_at_closed_pipe() -> NoReturn:
    """Stops quietly once stdout's reader has gone; stdout is pointed at /dev/null first, so that
    the interpreter's last flush of the text still buffered cannot fail again."""
    with contextlib.suppress(OSError, ValueError):  # ValueError: a stream without a file descriptor
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(CLOSED_PIPE_EXIT)


@contextlib.contextmanager
def closed_pipe_exits_quietly() -> Iterator[None]:
    """A BrokenPipeError inside the block (print, typer.echo) ends the process as `_end_at_closed_pipe`."""
    try:
        yield
    except BrokenPipeError:
        _end_at_closed_pipe()


def end_rich_output_quietly_at_closed_pipes() -> None:
    """rich's own answer to a closed pipe (`Console.on_broken_pipe`, the hook rich documents for
    this) exits 1; every console of the process, typer's help among them, ends quietly instead."""
    rich.console.Console.on_broken_pipe = lambda console: _end_at_closed_pipe()  # type: ignore[method-assign]


@contextlib.contextmanager
def usage_errors_in_one_line() -> Iterator[None]:
    """A usage error of typer (a bad value, an unknown option or command) becomes one stderr line and
    its exit code (2), instead of typer's usage line, hint and boxed panel."""
    try:
        yield
    except _click.exceptions.NoArgsIsHelpError:
        raise  # no arguments at all: typer shows the help
    except _click.exceptions.ClickException as error:
        context = getattr(error, "ctx", None)
        hint = f" (see '{context.command_path} --help')" if context is not None else ""
        print(f"Error: {_one_line(error.format_message())}{hint}", file=sys.stderr)
        raise typer.Exit(error.exit_code) from None


def debug_enabled(ctx: typer.Context | None = None) -> bool:
    if os.environ.get("ALLSPARK_DEBUG", "").lower() in {"1", "true", "yes"}:
        return True
    root = ctx.find_root() if ctx is not None else None
    return bool(root is not None and isinstance(root.obj, dict) and root.obj.get("debug"))


def format_validation_error(error: ValidationError) -> str:
    """`field.path: message` for each problem, joined on one line."""
    parts = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item.get("loc", ())) or error.title
        parts.append(f"{loc}: {item.get('msg', 'invalid value')}")
    return "; ".join(parts)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def error_exit_code(error: BaseException) -> tuple[int, str]:
    """Exit code and message for an exception raised by a command."""
    if isinstance(error, AllsparkError):
        return error.exit_code, _one_line(str(error))
    if isinstance(error, ValidationError):
        return SETTINGS_EXIT, "invalid settings: " + format_validation_error(error)
    if type(error).__name__ == "OutOfMemoryError":
        return OOM_EXIT, "out of memory: " + _one_line(str(error).splitlines()[0] if str(error) else "")
    if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
        reported = write_error(error.filename or "a file", error)
        return reported.exit_code, _one_line(str(reported))
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED_EXIT, "interrupted"
    return INTERNAL_ERROR_EXIT, (
        f"internal error: {type(error).__name__}: {_one_line(str(error))} "
        "(run with --debug for the traceback)"
    )


class ErrorReportingGroup(TyperGroup):
    """Runs a sub-command and turns any error it raises into one line plus an exit code."""

    def make_context(self, *args: Any, **kwargs: Any) -> typer.Context:
        # The root's --help and --version are printed, and its own options read, while its context is made.
        with closed_pipe_exits_quietly(), usage_errors_in_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            # A stop outside the loops that stop gracefully (startup, dataset checks) ends as the
            # one-line "interrupted", exit 130, instead of a silent 143.
            with stop_signals_interrupt(), closed_pipe_exits_quietly(), usage_errors_in_one_line():
                return super().invoke(ctx)
        except _PASS_THROUGH:
            raise
        except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 - the one boundary
            if debug_enabled(ctx):
                raise
            code, message = error_exit_code(error)
            print(f"Error: {message}", file=sys.stderr)
            raise typer.Exit(code) from None
