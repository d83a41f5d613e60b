"""Shared test fixtures: isolation of environment and working folder, the reference data folder."""
from __future__ import annotations

from pathlib import Path

import pytest

from allspark_cli.threads import use_passive_wait

use_passive_wait()  # as the CLI: before torch loads, so a busy CI machine does not starve the suite

import torch  # noqa: E402

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory):
    """Every test runs in its own empty working folder, with no ALLSPARK_* settings from the
    developer's shell and a private HOME, so nothing leaks into the repo or between tests."""
    for name in list(__import__("os").environ):
        if name.startswith("ALLSPARK_"):
            monkeypatch.delenv(name)
    work = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work))
    torch.manual_seed(0)


@pytest.fixture
def reference_dir() -> Path:
    """../shared/reference beside the repo; tests using it skip cleanly when it is absent."""
    if not REFERENCE_DIR.is_dir():
        pytest.skip("../shared/reference is not available")
    return REFERENCE_DIR
