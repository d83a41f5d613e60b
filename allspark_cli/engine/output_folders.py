"""Where a command's output folder goes: `<root>/<group>/<name>`, names auto-numbered exp, exp2, ...
(training runs under their preset or dataset, predictions under `predict`)."""
from __future__ import annotations

from pathlib import Path

from allspark_cli.errors import SettingsError

DEFAULT_RUN_NAME = "exp"


def run_dir_for(root: Path, group: str, name: str | None, exist_ok: bool) -> Path:
    """The folder a new run writes to (not created here).

    Without `name`: the first free of exp, exp2, exp3, ... A given name that exists is refused
    unless `exist_ok`.
    """
    parent = Path(root) / group
    if name is not None:
        path = parent / name
        if path.exists() and not exist_ok:
            raise SettingsError(f"run folder {path} already exists; pick another --name, or pass --exist-ok")
        return path
    number = 1
    while True:
        candidate = parent / (DEFAULT_RUN_NAME if number == 1 else f"{DEFAULT_RUN_NAME}{number}")
        if not candidate.exists():
            return candidate
        number += 1
