"""What identifies a dataset to a run: its name, class names and the content of its split lists.

A run records the fingerprint of the dataset it starts on (`RUN_DIR/dataset.json`); a resume and
an `eval` of the run's checkpoint compare it with the dataset found now, so a dataset moved away,
replaced, or re-split is refused instead of silently trained or scored on. Image bytes are not
hashed (a Cityscapes run would read 20 GB before its first step): the split lists name every
file, and the class names fix what the masks mean.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ValidationError

from allspark_cli.data.manifest import DatasetManifest
from allspark_cli.errors import DataError
from allspark_cli.fileio import atomic_write_text

FINGERPRINT_FILE = "dataset.json"


class SplitListPrint(BaseModel):
    """One split list file: the SHA-256 of its bytes and its number of entries."""

    sha256: str
    entries: int


class DatasetFingerprint(BaseModel):
    manifest: str  # the dataset.yaml it was taken from (absolute), for the messages
    name: str
    classes: list[str]
    # Split lists by role: "train:<split>:labeled", "train:<split>:unlabeled", "eval:<split>".
    lists: dict[str, SplitListPrint]


def _list_print(path: Path) -> SplitListPrint | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    entries = sum(1 for line in data.splitlines() if line.strip())
    return SplitListPrint(sha256=hashlib.sha256(data).hexdigest(), entries=entries)


def take_fingerprint(manifest: DatasetManifest, manifest_file: Path) -> DatasetFingerprint:
    """The fingerprint of every split list the manifest names (a missing list is left out)."""
    files: dict[str, Path] = {}
    for name, split in manifest.train_splits.items():
        files[f"train:{name}:labeled"] = manifest.split_file(split.labeled)
        if split.unlabeled:
            files[f"train:{name}:unlabeled"] = manifest.split_file(split.unlabeled)
    for name in manifest.eval_splits:
        files[f"eval:{name}"] = manifest.eval_split_file(name)
    lists = {role: printed for role, path in files.items() if (printed := _list_print(path)) is not None}
    return DatasetFingerprint(manifest=str(manifest_file), name=manifest.name, classes=list(manifest.classes),
                              lists=lists)


def write_fingerprint(folder: Path, fingerprint: DatasetFingerprint) -> None:
    atomic_write_text(folder / FINGERPRINT_FILE, json.dumps(fingerprint.model_dump(), indent=2) + "\n")


def read_fingerprint(folder: Path) -> DatasetFingerprint | None:
    """The run's recorded fingerprint; None for a run from before fingerprints were recorded."""
    path = folder / FINGERPRINT_FILE
    if not path.is_file():
        return None
    try:
        return DatasetFingerprint.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValidationError):
        raise DataError(f"{path}: not a dataset fingerprint written by allspark; delete it to skip the check") from None


def fingerprint_differences(recorded: DatasetFingerprint, now: DatasetFingerprint, roles: list[str]) -> list[str]:
    """What differs between the recorded and the current dataset, in the given split-list roles
    (and always the name and class names)."""
    differences = []
    if recorded.name != now.name:
        differences.append(f"name '{recorded.name}' -> '{now.name}'")
    if recorded.classes != now.classes:
        differences.append(f"classes {recorded.classes} -> {now.classes}")
    for role in roles:
        before, after = recorded.lists.get(role), now.lists.get(role)
        if before is None or before == after:
            continue
        if after is None:
            differences.append(f"split list {role} is missing")
        elif before.entries != after.entries:
            differences.append(f"split list {role}: {before.entries} -> {after.entries} entries")
        else:
            differences.append(f"split list {role}: other entries")
    return differences


def training_roles(split: str, eval_split: str) -> list[str]:
    """The split-list roles a training run reads."""
    return [f"train:{split}:labeled", f"train:{split}:unlabeled", f"eval:{eval_split}"]
