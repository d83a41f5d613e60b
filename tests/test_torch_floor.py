"""The torch floor: declared once in pyproject.toml, checked at CLI start with a one-line error."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from allspark_cli.errors import EnvError
from allspark_cli.torch_floor import TORCH_FLOOR, check_torch_version, torch_release

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_the_floor_the_code_checks():
    declared = re.search(r'"torch>=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert declared is not None and (int(declared.group(1)), int(declared.group(2))) == TORCH_FLOOR


@pytest.mark.parametrize("installed", ["2.5.0", "2.5.1+cpu", "2.14.1+cu130", "2.15.0a0+git1234", "3.0.0"])
def test_versions_at_or_above_the_floor_pass(installed):
    check_torch_version(installed)


@pytest.mark.parametrize("installed", ["2.4.1", "2.2.0+cu121", "1.13.1"])
def test_older_versions_are_refused_naming_both_versions(installed):
    with pytest.raises(EnvError, match=rf"torch {re.escape(installed)} is installed but allspark needs torch>=2\.5"):
        check_torch_version(installed)


def test_release_parsing():
    assert torch_release("2.14.1+cu130") == (2, 14) and torch_release("nightly") is None


def test_the_cli_refuses_an_old_torch_in_one_line_with_exit_4():
    program = (
        "import importlib.metadata as metadata, runpy, sys\n"
        "real = metadata.version\n"
        "metadata.version = lambda name: '2.4.1' if name == 'torch' else real(name)\n"
        "sys.argv = ['allspark', '--help']\n"
        "runpy.run_module('allspark_cli', run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 4, done.stderr
    assert done.stderr.strip().splitlines() == [
        "Error: torch 2.4.1 is installed but allspark needs torch>=2.5; upgrade it (pip install 'torch>=2.5')"
    ]
