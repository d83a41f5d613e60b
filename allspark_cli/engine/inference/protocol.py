"""The evaluation protocol and the inference window, each decided in one place (DESIGN.md section 3b).

Training's in-run evaluation and `allspark eval` ask `resolve_protocol` for the inference mode,
window (crop) and stride; `allspark predict`, which picks whole or slide per image, asks
`resolve_window` for the window and stride. Both read the same three sources, first match wins:

1. what the caller asks for: `--mode`, `--crop`, `--stride`;
2. the run's settings (`SavedRecipe`: a checkpoint's recorded settings, or the live settings of
   the training that evaluates): the evaluation section `eval.mode/crop/stride`, completed field
   by field by the dataset's declared protocol (the manifest's `eval_mode/eval_crop/eval_stride`:
   how a benchmark is scored, e.g. Cityscapes' 801 / 534 window; predict has no dataset);
3. for the window only: the run's training crop (`data.crop`), then UNRECORDED_WINDOW for a
   checkpoint that records no crop at all (reference checkpoints, settings-less API ones).

The stride belongs to its window: an explicit `--crop` without `--stride` slides floor(2/3 crop)
(`inference.default_stride`), never a stride recorded for another window. The manifest's
`train_crop` is not a source: it is what a NEW run's settings take as `data.crop`
(training/train_data.py), which the run then records; a checkpoint's window is what it was
trained and evaluated with, not a property of the images it is later run on.

`SavedRecipe.from_settings` is the one reader of a settings dict for inference: it accepts the
complete settings of this toolkit's checkpoints (any version), partial dicts written through the
Python API, and the empty settings of reference checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from allspark_cli.constants import MIN_CROP
from allspark_cli.data.manifest import DatasetManifest, EvalMode
from allspark_cli.engine.inference.inference import EVAL_MODES, default_stride
from allspark_cli.errors import SettingsError

# The window of a checkpoint that records no crop: the crop of the reference's Pascal and COCO
# configs, which trained the reference checkpoints this toolkit reads.
UNRECORDED_WINDOW = 513


@dataclass(frozen=True)
class EvalProtocol:
    """Inference mode and its window: crop and stride are None where the mode has none."""

    mode: EvalMode
    crop: int | None
    stride: int | None


class Window(NamedTuple):
    """A sliding window: its side and the step between two windows, in pixels."""

    crop: int
    stride: int


@dataclass(frozen=True)
class SavedRecipe:
    """What inference reads from a run's settings; None where they do not say."""

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

    def completed_by(self, dataset: DatasetManifest | None) -> SavedRecipe:
        """This recipe with the evaluation fields it leaves open taken from the dataset's declared protocol."""
        if dataset is None:
            return self
        return SavedRecipe(
            manifest=self.manifest, split=self.split, train_crop=self.train_crop,
            eval_mode=self.eval_mode or dataset.eval_mode,
            eval_crop=self.eval_crop or dataset.eval_crop,
            eval_stride=self.eval_stride or dataset.eval_stride,
        )


def _window_crop(crop: int | None, run: SavedRecipe) -> int:
    """Sources 1 to 3 of the module docstring for the window."""
    crop = crop or run.eval_crop or run.train_crop or UNRECORDED_WINDOW
    if crop < MIN_CROP:
        raise SettingsError(f"a window of {crop} pixels is smaller than the backbone's coarsest stride ({MIN_CROP})")
    return crop


def resolve_window(
    crop: int | None = None,
    stride: int | None = None,
    *,
    run: SavedRecipe = SavedRecipe(),
) -> Window:
    """The sliding window from the sources in the module docstring's order (`run` completed by
    the dataset's protocol where there is one: `resolve_protocol`).

    SettingsError for a window under MIN_CROP or a stride larger than the window (pixels skipped).
    """
    window = _window_crop(crop, run)
    # A recorded or declared stride was chosen for the recorded window, not for one asked for here.
    paired_stride = run.eval_stride if crop is None else None
    stride = stride or paired_stride or default_stride(window)
    if stride > window:
        raise SettingsError(f"--stride {stride} is larger than the window (--crop {window}): pixels would be skipped")
    return Window(window, stride)


def resolve_protocol(
    dataset: DatasetManifest,
    *,
    mode: EvalMode | None = None,
    crop: int | None = None,
    stride: int | None = None,
    run: SavedRecipe = SavedRecipe(),
) -> EvalProtocol:
    """The evaluation protocol on `dataset` from the sources in the module docstring's order."""
    run = run.completed_by(dataset)
    mode = mode or run.eval_mode
    if mode not in EVAL_MODES:
        raise SettingsError(f"eval mode {mode!r} is not one of {', '.join(EVAL_MODES)}")
    if mode == "whole":
        return EvalProtocol(mode, None, None)
    if mode == "center-crop":
        return EvalProtocol(mode, _window_crop(crop, run), None)
    window = resolve_window(crop, stride, run=run)
    return EvalProtocol(mode, window.crop, window.stride)
