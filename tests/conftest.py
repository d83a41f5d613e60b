"""Shared test fixtures: isolation of environment and working folder, the reference data folder."""
from __future__ import annotations

import os
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


def require_shared(path: Path) -> None:
    """A folder of ../shared that a test needs: skipped with the reason outside CI, a failure under
    CI=true (where shared/ is always laid beside the clone, so a missing one is a broken setup, not
    a reason to pass without checking anything)."""
    if path.is_dir():
        return
    message = f"{path} is not available"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: the parity tests must run)")
    pytest.skip(message)


@pytest.fixture
def reference_dir() -> Path:
    """../shared/reference beside the repo (see `require_shared`)."""
    require_shared(REFERENCE_DIR)
    return REFERENCE_DIR
