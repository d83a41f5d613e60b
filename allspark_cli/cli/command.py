"""The class of every `allspark` command: its usage line and option types read as the README writes them.

Typer (>= 0.2x) shows a required argument as `{checkpoint}` in the usage line, a flag as `--tta
<bool>` (which invites a value the flag refuses) and a bounded number as `<int range> [x>=1]`,
whose width pushes the option names of a wide command (`prepare custom`) into an ellipsis at 80
columns. Here arguments read `CHECKPOINT` / `[NAME]` / `SOURCES...`, flags carry no type, and a
bounded number reads `<int> [x>=1]`.
"""
from __future__ import annotations

from typer import _click
from typer.core import TyperArgument, TyperCommand, TyperOption

from allspark_cli.cli.errors import closed_pipe_exits_quietly

VARIADIC = -1  # click's nargs of an argument taking any number of values


def argument_name(argument: TyperArgument) -> str:
    """`CHECKPOINT`, `[NAME]` when optional, `SOURCES...` when it takes several values."""
    name = (argument.name or "").upper()
    name = name if argument.required else f"[{name}]"
    return name + ("..." if argument.nargs == VARIADIC else "")


def _tidy(param: _click.Parameter) -> None:
    """The help's type column of `param`: a name for arguments, none for flags, `<int>` for ranges."""
    if isinstance(param, TyperArgument) and param.metavar is None:
        param.metavar = argument_name(param)
    elif isinstance(param, TyperOption) and param.metavar is None:
        if param.is_flag:
            param.metavar = ""
        elif param.type_descriptor.is_ranged:
            param.metavar = f"<{param.type_descriptor.ranged_type_name}>"


class AllsparkCommand(TyperCommand):
    def get_params(self, ctx: _click.Context) -> list[_click.Parameter]:
        params = super().get_params(ctx)
        for param in params:  # the help option is made here, so it is tidied here too
            _tidy(param)
        return params

    def collect_usage_pieces(self, ctx: _click.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        return pieces + [argument_name(p) for p in self.get_params(ctx) if isinstance(p, TyperArgument)]

    def make_context(self, *args, **kwargs) -> _click.Context:
        # A sub-command's --help is printed while its context is made.
        with closed_pipe_exits_quietly():
            return super().make_context(*args, **kwargs)
