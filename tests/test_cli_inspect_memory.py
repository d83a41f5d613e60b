"""`allspark inspect-memory`: help, the happy path, and bad inputs -> (exit code, message, nothing written)."""
from __future__ import annotations

import pytest
import typer
from test_inspect_memory import CLASSES, make_dataset, make_run
from typer.testing import CliRunner

from allspark_cli.cli import inspect_memory as command
from allspark_cli.cli.errors import ErrorReportingGroup


def _app() -> typer.Typer:
    """The command under the real error boundary, independent of the other commands' modules."""
    app = typer.Typer(cls=ErrorReportingGroup, pretty_exceptions_enable=False)

    @app.callback()
    def root() -> None:
        """allspark"""

    command.register(app)
    return app


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An `allspark` run folder and a run folder of the memory-less `cca` method."""
    base = tmp_path_factory.mktemp("cli_runs")
    manifest = make_dataset(base / "data")
    make_run(base / "run", manifest)
    make_run(base / "cca", None, method="cca", settings={})
    return base


def _invoke(*args: str):
    return CliRunner().invoke(_app(), ["inspect-memory", *map(str, args)])


def test_help():
    result = _invoke("--help")
    assert result.exit_code == 0, result.output
    for option in ("--out", "--classes", "--max-channels", "--images", "--data"):
        assert option in result.output


def test_happy_path(runs, tmp_path):
    out = tmp_path / "report"
    image = runs / "data" / "images" / "img_01.jpg"
    result = _invoke(runs / "run", "--out", out, "--classes", "cat,dog", "--max-channels", "4", "--images", image)
    assert result.exit_code == 0, result.output
    assert (out / "index.html").is_file() and (out / "summary.json").is_file()
    assert "cat" in result.output and "index.html" in result.output
    assert sorted(p.name for p in (out / "memory").iterdir()) == ["class_001_cat.png", "class_002_dog.png"]


def test_default_out_dir_is_inside_the_run(runs):
    result = _invoke(runs / "run", "--classes", "person", "--max-channels", "2")
    assert result.exit_code == 0, result.output
    assert (runs / "run" / "inspect-memory" / "index.html").is_file()


def test_data_option_replaces_the_manifest(tmp_path):
    manifest = make_dataset(tmp_path / "data")
    checkpoint = make_run(tmp_path / "run", manifest, settings={"data": {"split": "1/4", "crop": 64}})
    out = tmp_path / "report"
    result = _invoke(checkpoint, "--out", out, "--data", manifest, "--max-channels", "2")
    assert result.exit_code == 0, result.output
    assert "no provenance" not in result.output
    assert "unlabeled.txt" in (out / "summary.json").read_text()


@pytest.mark.parametrize(
    ("case", "code", "fragment"),
    [
        ("not_a_checkpoint", 3, "not"),
        ("missing_checkpoint", 3, "not found"),
        ("out_is_a_file", 2, "is a file"),
        ("unknown_class", 2, "valid: " + ", ".join(CLASSES)),
        ("no_memory", 2, "method 'cca'"),
        ("bad_max_channels", 2, "max-channels"),
        ("missing_image", 3, "image not found"),
        ("missing_manifest", 3, "manifest not found"),
    ],
)
def test_bad_inputs(runs, tmp_path, case, code, fragment):
    out = tmp_path / "report"
    args = {
        "not_a_checkpoint": [tmp_path / "notes.pt", "--out", out],
        "missing_checkpoint": [tmp_path / "missing.pt", "--out", out],
        "out_is_a_file": [runs / "run", "--out", tmp_path / "notes.pt"],
        "unknown_class": [runs / "run", "--out", out, "--classes", "horse"],
        "no_memory": [runs / "cca", "--out", out],
        "bad_max_channels": [runs / "run", "--out", out, "--max-channels", "0"],
        "missing_image": [runs / "run", "--out", out, "--images", tmp_path / "missing.jpg"],
        "missing_manifest": [runs / "run", "--out", out, "--data", tmp_path / "nowhere" / "dataset.yaml"],
    }[case]
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    result = _invoke(*args)
    assert result.exit_code == code, result.output
    assert fragment in result.output
    assert not out.exists()
    assert (tmp_path / "notes.pt").read_text() == "not a checkpoint"
