"""The built wheel works on its own: installed into a fresh virtual environment and run outside the
repository, `allspark train --list-presets` and a demo `--dry-run` find the presets it ships.

The environment reuses this interpreter's site-packages for the dependencies (torch is large, and
the test must run offline), and the wheel is installed with --no-deps --no-index. The repository is
kept out of reach: no PYTHONPATH, and the working folder is a temporary one.
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from typer.testing import CliRunner

from allspark_cli.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
# What the wheel is built from. A copy: a build in place writes build/ and *.egg-info into the checkout.
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "allspark_cli", "data_tools")
# pyproject.toml's SPDX `license` needs this setuptools (the dev extra installs it): the build runs
# without isolation, with this environment's setuptools, so that it needs no download.
MIN_SETUPTOOLS = 77
PROCESS_TIMEOUT_S = 300
# A demo dataset just large enough for every split of the demo presets and one training step.
TINY_DEMO = "num_train=32, num_val=2, size=(128, 160), workers=1"


def _require_setuptools() -> None:
    try:
        major = int(version("setuptools").split(".")[0])
    except (PackageNotFoundError, ValueError):
        major = 0
    if major >= MIN_SETUPTOOLS:
        return
    message = f"building the wheel offline needs setuptools>={MIN_SETUPTOOLS} here (pip install -e '.[dev]')"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _installed_venv(tmp_path: Path) -> Path:
    """A fresh virtual environment holding the wheel built from this checkout."""
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)], tmp_path)
    (wheel,) = wheels.glob("allspark-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp_path)
    # The dependencies: this interpreter's site folders as plain path lines. Their own .pth files
    # are not read through such a line, so an editable install of the checkout stays out.
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip()
    folders = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    (Path(purelib) / "_allspark_test_dependencies.pth").write_text("\n".join(folders) + "\n", encoding="utf-8")
    return venv


def test_the_wheel_ships_the_presets(tmp_path: Path) -> None:
    _require_setuptools()
    venv = _installed_venv(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(COLUMNS="80", OMP_NUM_THREADS="1")
    # Where allspark_cli and data_tools are imported from there, the presets folder beside the
    # package, and the demo dataset at the demo presets' path (tiny: the dry run needs one batch).
    check = ("import allspark_cli, data_tools, pathlib\n"
             "print(allspark_cli.__file__, data_tools.__file__, sep='\\n')\n"
             "print(pathlib.Path(allspark_cli.__file__).parent / 'presets')\n"
             f"from data_tools.demo import build_demo; build_demo('data/demo', {TINY_DEMO})\n")
    files = [Path(line) for line in _run([str(venv / "bin" / "python"), "-c", check], work, env).splitlines()]
    assert all(path.resolve().is_relative_to(venv.resolve()) for path in files), files
    assert sorted(path.name for path in files[2].glob("*.yaml")) == sorted(
        path.name for path in (ROOT / "allspark_cli" / "presets").glob("*.yaml"))

    allspark = str(venv / "bin" / "allspark")
    listed = _run([allspark, "train", "--list-presets"], work, env)
    assert listed == CliRunner().invoke(app, ["train", "--list-presets"], env={"COLUMNS": "80"}).output
    planned = _run([allspark, "train", "--preset", "demo-1/16", "--dry-run", "--threads", "1"], work, env)
    assert "--accumulate auto would pick" in planned, planned
