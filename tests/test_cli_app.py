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


def test_version_does_not_import_torch():
    """`allspark --version` answers before the commands (and torch, seconds on a loaded machine) load."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "allspark_cli", "--version"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"allspark {__version__}"
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "allspark_cli.cli.train" not in imported


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["train", "--help"], ["train", "--list-presets"]])
def test_a_closed_pipe_ends_quietly(argv):
    """`allspark train --help | head -1`: the reader has gone before the output is written."""
    process = subprocess.Popen([sys.executable, "-m", "allspark_cli", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # as `head` does once it has its line
    stderr = process.stderr.read()
    assert process.wait() == 0, stderr
    assert stderr == ""


def test_a_closed_pipe_inside_a_command_ends_quietly():
    result = runner.invoke(_app_raising(BrokenPipeError(32, "Broken pipe")), ["boom"])
    assert result.exit_code == 0 and "internal error" not in result.output


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [(["train", "--batch-size", "0"], "Invalid value for '--batch-size' / '-b'"),
     (["train", "--no-such-option"], "No such option: --no-such-option"),
     (["no-such-command"], "No such command 'no-such-command'"),
     (["eval"], "Missing argument 'CHECKPOINT'")],
)
def test_usage_errors_are_one_line(argv, fragment):
    result = runner.invoke(app, argv, env={"COLUMNS": "80"})
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], result.output


def _command_paths(command, path=()):
    if hasattr(command, "commands"):  # a group: its sub-commands
        for name, sub in command.commands.items():
            yield from _command_paths(sub, (*path, name))
    else:
        yield path, command


COMMANDS = list(_command_paths(typer.main.get_command(app)))


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(path) for path, _ in COMMANDS])
def test_help_at_80_columns_shows_every_option_whole(path, command):
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    usage = next(line for line in result.output.splitlines() if "Usage:" in line)
    assert "{" not in usage and "<" not in usage  # no raw placeholders
    for param in command.params:
        for name in param.opts if param.param_type_name == "option" else ():
            assert name in result.output.split(), (name, result.output)
    assert "…" not in result.output and "<bool>" not in result.output


def test_help_names_arguments_and_values_as_the_readme():
    eval_help = runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "80"}).output
    assert "Usage: allspark eval [OPTIONS] CHECKPOINT" in eval_help
    predict_help = runner.invoke(app, ["predict", "--help"], env={"COLUMNS": "80"}).output
    assert "[OPTIONS] CHECKPOINT SOURCES..." in predict_help
    train_help = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "80"}).output
    assert "KEY=VALUE" in train_help
    exist_ok = next(line for line in train_help.splitlines() if "--exist-ok" in line)
    assert exist_ok.split("--exist-ok")[1].split()[0] == "Reuse"  # a flag: no value after it
    memory_help = runner.invoke(app, ["inspect-memory", "--help"], env={"COLUMNS": "80"}).output
    assert "<list[" not in memory_help and "NAMES" in memory_help
