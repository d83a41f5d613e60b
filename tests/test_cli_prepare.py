"""`allspark prepare ...` through the CLI: help, happy paths, exit codes and messages of bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from allspark_cli.cli.app import app
from allspark_cli.data.manifest import load_manifest

runner = CliRunner()
HEIGHT, WIDTH = 8, 10
SUBCOMMANDS = ("pascal", "cityscapes", "coco", "custom", "demo", "check")


def _custom_sources(tmp_path: Path, count: int = 12) -> list[str]:
    """Images, masks and a classes file; returns the CLI arguments that point at them."""
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(tmp_path / "images" / f"s{index}.png")
        Image.fromarray(rng.integers(0, 2, (HEIGHT, WIDTH), dtype=np.uint8)).save(tmp_path / "masks" / f"s{index}.png")
    (tmp_path / "classes.txt").write_text("background\nthing\n")
    return ["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"),
            "--classes", str(tmp_path / "classes.txt")]


def test_help_lists_every_subcommand() -> None:
    result = runner.invoke(app, ["prepare", "--help"])
    assert result.exit_code == 0, result.output
    for name in SUBCOMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name: str) -> None:
    result = runner.invoke(app, ["prepare", name, "--help"])
    assert result.exit_code == 0, result.output


def test_custom_then_check(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["prepare", "custom", *_custom_sources(tmp_path), "--count", "3", "--out", str(out), "-j", "1"])
    assert result.exit_code == 0, result.output
    assert "labeled" in result.output and "full" in result.output
    assert load_manifest(out).train_splits["3"].unlabeled is not None

    result = runner.invoke(app, ["prepare", "check", str(out / "dataset.yaml"), "-j", "1"])
    assert result.exit_code == 0, result.output
    assert "no problems found" in result.output and "thing" in result.output

    Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(tmp_path / "masks" / "s5.png")
    result = runner.invoke(app, ["prepare", "check", str(out), "-j", "1"])
    assert result.exit_code == 3, result.output
    assert "s5.png" in result.output


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["pascal", "--voc-root", "{tmp}/missing"], 3, "VOC root"),
        (["cityscapes", "--root", "{tmp}/missing"], 3, "Cityscapes root"),
        (["coco", "--root", "{tmp}/missing"], 3, "COCO root"),
        (["coco", "--root", "{tmp}", "--crowd", "paint"], 2, "paint"),
        (["pascal", "--voc-root", "{tmp}", "--splits-from", "{tmp}/nope"], 3, "nope"),
        (["check", "{tmp}/nope"], 3, "nope"),
        (["pascal", "--voc-root", "{tmp}", "--sbd-root", "{tmp}", "--aug-masks", "{tmp}"], 2, "not both"),
    ],
)
def test_bad_input_exit_codes(tmp_path: Path, args: list[str], code: int, fragment: str) -> None:
    argv = ["prepare", *(arg.format(tmp=tmp_path) for arg in args)]
    if args[0] != "check":
        argv += ["--out", str(tmp_path / "out")]
    result = runner.invoke(app, argv)
    assert result.exit_code == code, result.output
    assert fragment in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["rgb mask", "missing mask"])
def test_custom_bad_data_exits_3_and_names_the_file(tmp_path: Path, case: str) -> None:
    sources = _custom_sources(tmp_path)
    if case == "rgb mask":
        Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(tmp_path / "masks" / "s7.png")
    else:
        (tmp_path / "masks" / "s7.png").unlink()
    result = runner.invoke(app, ["prepare", "custom", *sources, "--out", str(tmp_path / "out"), "-j", "1"])
    assert result.exit_code == 3, result.output
    assert "s7" in result.output
    assert not (tmp_path / "out").exists()


def test_demo_calls_build_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    received = {}

    def fake_build_demo(out_dir, *, seed, workers, progress, family):
        received.update(out_dir=out_dir, seed=seed, workers=workers, family=family)
        progress(1, 2)
        progress(2, 2)
        return Path(out_dir) / "dataset.yaml"

    monkeypatch.setattr("data_tools.demo.build_demo", fake_build_demo)
    result = runner.invoke(app, ["prepare", "demo", "--out", str(tmp_path / "demo"), "--seed", "7", "-j", "2"])
    assert result.exit_code == 0, result.output
    assert received == {"out_dir": tmp_path / "demo", "seed": 7, "workers": 2, "family": "shapes"}
    result = runner.invoke(app, ["prepare", "demo", "--out", str(tmp_path / "signs"), "--family", "signs"])
    assert result.exit_code == 0, result.output
    assert received["family"] == "signs"


def test_an_unknown_demo_family_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["prepare", "demo", "--out", str(tmp_path / "demo"), "--family", "leaves"])
    assert result.exit_code == 2
    assert "unknown demo family 'leaves'; expected one of shapes, signs" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "demo").exists()


def test_pascal_passes_options_to_the_builder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from data_tools.common import PrepareSummary

    received = {}

    def fake_prepare(voc_root, out_dir, **kwargs):
        received.update(kwargs, voc_root=voc_root, out_dir=out_dir)
        kwargs["progress"]("masks", 1, 1)
        return PrepareSummary("pascal", out_dir / "dataset.yaml", 1, 0, split_sizes={"92": (92, 10490)},
                              notes=["a note"])

    monkeypatch.setattr("data_tools.pascal.prepare_pascal", fake_prepare)
    (tmp_path / "refs").mkdir()
    result = runner.invoke(app, ["prepare", "pascal", "--voc-root", "voc", "--aug-masks", "aug", "--out", str(tmp_path / "o"),
                                 "--splits-from", str(tmp_path / "refs"), "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert received["voc_root"] == Path("voc") and received["aug_masks"] == Path("aug")
    assert received["splits_from"] == tmp_path / "refs" and received["seed"] == 3 and received["sbd_root"] is None
    assert "10490" in result.output and "a note" in result.output


def test_check_lists_problems_uncut_in_an_80_column_log(tmp_path: Path) -> None:
    sources = _custom_sources(tmp_path)
    long_stem = "site_with_a_long_name_" + "x" * 50
    (tmp_path / "images" / "s3.png").rename(tmp_path / "images" / f"{long_stem}.png")
    (tmp_path / "masks" / "s3.png").rename(tmp_path / "masks" / f"{long_stem}.png")
    out = tmp_path / "out"
    assert runner.invoke(app, ["prepare", "custom", *sources, "--out", str(out), "-j", "1"]).exit_code == 0
    Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(tmp_path / "masks" / f"{long_stem}.png")
    result = runner.invoke(app, ["prepare", "check", str(out), "-j", "1"], env={"COLUMNS": "80"})
    assert result.exit_code == 3, result.output
    assert any(line.startswith(f"masks/{long_stem}.png: ") for line in result.output.splitlines()), result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert error and "run 'allspark prepare check'" not in error[0] and "listed above" in error[0]


def test_option_change_and_out_inside_a_source_are_usage_errors(tmp_path: Path) -> None:
    sources = _custom_sources(tmp_path)
    result = runner.invoke(app, ["prepare", "custom", *sources, "--out", str(tmp_path / "masks" / "out")])
    assert result.exit_code == 2, result.output
    assert "inside the source folder --masks" in result.output
    result = runner.invoke(app, ["prepare", "custom", *sources, "--val-ratio", "1/4", "--val-list", str(tmp_path / "x.txt"),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--val-list, --val-ratio" in result.output
