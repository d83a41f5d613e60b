"""The evaluation protocol, decided in one place (DESIGN.md section 3b).

Training's in-run evaluation, `allspark eval` and `allspark predict` all ask this module which
inference mode, window (crop) and stride to use. The sources, first match wins:

1. what the command line (or the training settings' `eval:` section) asks for;
2. what the checkpoint's saved settings record (`SavedRecipe`: the protocol its training used);
3. the dataset manifest's protocol (`eval_mode`, `eval_crop`, `eval_stride`);
4. for the window of a windowed mode: the training crop (saved settings, then the manifest); for
   the stride of the sliding window: floor(2/3 crop) (`inference.default_stride`).

`SavedRecipe.from_settings` is the one reader of a checkpoint's settings dict for inference: it
accepts the complete settings of this toolkit's checkpoints (any version), partial dicts written
through the Python API, and the empty settings of reference checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from allspark_cli.data.manifest import DatasetManifest, EvalMode
from allspark_cli.engine.inference.inference import EVAL_MODES, default_stride
from allspark_cli.errors import SettingsError

# The window of a checkpoint that records no crop (a reference checkpoint): the crop of the
# reference's Pascal and COCO configs.
DEFAULT_WINDOW = 513


@dataclass(frozen=True)
class EvalProtocol:
    """Inference mode and its window: crop and stride are None where the mode has none."""

    mode: EvalMode
    crop: int | None
    stride: int | None


@dataclass(frozen=True)
class SavedRecipe:
    """What inference reads from a checkpoint's training settings; None where they do not say."""

    manifest: Path | None = None
    split: str | None = None
    train_crop: int | None = None
    eval_mode: EvalMode | None = None
    eval_crop: int | None = None
    eval_stride: int | None = None

    @classmethod
    def from_settings(cls, settings: dict[str, Any] | None) -> SavedRecipe:
        def value(section: str, key: str, kind: type) -> Any:
            node = (settings or {}).get(section)
            found = node.get(key) if isinstance(node, dict) else None
            return found if isinstance(found, kind) and not isinstance(found, bool) else None

        manifest = value("data", "manifest", str)
        split = value("data", "split", (str, int))
        mode = value("eval", "mode", str)
        return cls(
            manifest=Path(manifest) if manifest else None,
            split=str(split) if split is not None else None,
            train_crop=value("data", "crop", int),
            eval_mode=mode if mode in EVAL_MODES else None,
            eval_crop=value("eval", "crop", int),
            eval_stride=value("eval", "stride", int),
        )

    @property
    def window(self) -> int:
        """The window `predict` slides: the evaluation crop, else the training crop, else DEFAULT_WINDOW."""
        return self.eval_crop or self.train_crop or DEFAULT_WINDOW


def resolve_protocol(
    manifest: DatasetManifest,
    *,
    mode: EvalMode | None = None,
    crop: int | None = None,
    stride: int | None = None,
    saved: SavedRecipe = SavedRecipe(),
    train_crop: int | None = None,
) -> EvalProtocol:
    """The protocol from the sources in the module docstring's order. `train_crop`: the crop of
    the training that asks (in-run evaluation); otherwise the saved one is used."""
    mode = mode or saved.eval_mode or manifest.eval_mode
    if mode not in EVAL_MODES:
        raise SettingsError(f"eval mode {mode!r} is not one of {', '.join(EVAL_MODES)}")
    if mode == "whole":
        return EvalProtocol(mode, None, None)
    crop = crop or saved.eval_crop or manifest.eval_crop or train_crop or saved.train_crop or manifest.train_crop
    if mode == "center-crop":
        return EvalProtocol(mode, crop, None)
    stride = stride or saved.eval_stride or manifest.eval_stride or default_stride(crop)
    if stride > crop:
        raise SettingsError(f"--stride {stride} is larger than the window (--crop {crop}): pixels would be skipped")
    return EvalProtocol(mode, crop, stride)
