"""The dataset a preset run may build when it is missing (shared by `train` and `ablate`): the
builder its family names (`builder:` in the family file; today the demo's)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from allspark_cli.engine.training.presets import DatasetBuilder, preset_named


def build_demo_when_missing(folder: Path, notify=None) -> None:
    """`allspark prepare demo`'s builder, for `train`/`ablate` of a demo preset whose dataset is missing."""
    from data_tools.demo import build_demo

    if notify is not None:
        notify(f"building the demo dataset in {folder} (first run only, about a minute)")
    build_demo(folder)


# Every builder a family file may name (tests/test_presets.py checks that none is missing).
DATASET_BUILDERS: dict[DatasetBuilder, Callable[..., None]] = {"demo": build_demo_when_missing}


def dataset_builder_for(preset: str | None, manifest: Path | str):
    """The builder `train` may call when the dataset at `manifest` is missing: the one of the
    preset's family, and only at the preset's own path (never at a path a user gave or a run
    recorded: building the demo there would put demo images into the user's dataset folder and
    train on them)."""
    found = preset_named(preset) if preset else None
    if found is None or found.family is None or found.family.builder is None:
        return None
    from allspark_cli.data.manifest import MANIFEST_NAME

    own = Path(found.info.settings.data.manifest).expanduser().absolute()
    given = Path(manifest).expanduser().absolute()
    return DATASET_BUILDERS[found.family.builder] if own in (given, given / MANIFEST_NAME) else None
