"""The demo dataset a demo-preset run builds when it is missing (shared by `train` and `ablate`)."""
from __future__ import annotations

from pathlib import Path

DEMO_PRESET_PREFIX = "demo-"


def build_demo_when_missing(folder: Path, notify=None) -> None:
    """`allspark prepare demo`'s builder, for `train`/`ablate` of a demo preset whose dataset is missing."""
    from data_tools.demo import build_demo

    if notify is not None:
        notify(f"building the demo dataset in {folder} (first run only, about a minute)")
    build_demo(folder)


def dataset_builder_for(preset: str | None, manifest: Path | str):
    """The builder `train` may call when the dataset at `manifest` is missing: only the demo's, and
    only at the demo preset's own path (never at a path a user gave or a run recorded: building the
    demo there would put demo images into the user's dataset folder and train on them)."""
    if not (preset or "").startswith(DEMO_PRESET_PREFIX):
        return None
    from allspark_cli.data.manifest import MANIFEST_NAME
    from allspark_cli.engine.training.presets import find_preset

    own = Path(find_preset(preset).layer["data"]["manifest"]).expanduser().absolute()
    given = Path(manifest).expanduser().absolute()
    return build_demo_when_missing if own in (given, given / MANIFEST_NAME) else None
