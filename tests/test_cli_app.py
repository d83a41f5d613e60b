"""The `allspark` app shell: version, help, and the one error boundary (exit codes, one line, --debug)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from allspark_cli import __version__
from allspark_cli.cli.app import app
from allspark_cli.cli.errors import ErrorReportingGroup
from allspark_cli.errors import DataError, EnvError, SettingsError

runner = CliRunner()


def test_version_and_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"allspark {__version__}"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("prepare", "train", "eval", "predict", "inspect-memory"):
        assert command in result.output


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "allspark_cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and __version__ in result.stdout


@pytest.mark.parametrize("argv", [["no-such-command"], ["train", "--no-such-option"], ["eval"]])
def test_usage_errors_exit_2(argv):
    assert runner.invoke(app, argv).exit_code == 2


def _app_raising(error: BaseException) -> typer.Typer:
    probe = typer.Typer(cls=ErrorReportingGroup)

    @probe.callback()
    def root(ctx: typer.Context, debug: bool = typer.Option(False, "--debug")) -> None:
        ctx.obj = {"debug": debug}

    @probe.command()
    def boom() -> None:
        raise error

    return probe


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (SettingsError("train.lr: must be > 0"), 2),
        (DataError("data/x.png: not a PNG"), 3),
        (EnvError("--device cuda: no CUDA device"), 4),
        (RuntimeError("unexpected"), 1),
    ],
)
def test_errors_become_one_line_and_an_exit_code(error, code):
    result = runner.invoke(_app_raising(error), ["boom"])
    assert result.exit_code == code
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert str(error) in lines[0]


def test_debug_shows_the_original_exception():
    result = runner.invoke(_app_raising(DataError("data/x.png: not a PNG")), ["--debug", "boom"])
    assert isinstance(result.exception, DataError)
