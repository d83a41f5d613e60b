"""The inference window and protocol rule (engine/inference/protocol.py), against expectations
written out by hand: which source wins for each kind of checkpoint, and the bounds it enforces."""
from __future__ import annotations

from pathlib import Path

import pytest

from allspark_cli.data.manifest import DatasetManifest, TrainSplit
from allspark_cli.engine.inference.protocol import EvalProtocol, SavedRecipe, Window, resolve_protocol, resolve_window
from allspark_cli.errors import SettingsError

# A toolkit checkpoint of a sliding-window run, as `train` records it (its eval section resolved).
CITYSCAPES_RUN = {"data": {"crop": 801}, "eval": {"mode": "slide", "crop": 801, "stride": 534}}
PASCAL_RUN = {"data": {"crop": 321}, "eval": {"mode": "whole", "crop": None, "stride": None}}


def dataset(**protocol) -> DatasetManifest:
    """A manifest whose training crop (257) is none of the windows below: it must never be picked."""
    return DatasetManifest(name="d", root=Path("/data"), classes=["a", "b"], palette=[(0, 0, 0), (1, 1, 1)],
                           train_splits={"full": TrainSplit(labeled="l.txt")}, eval_splits={"val": "v.txt"},
                           train_crop=257, **protocol)


WHOLE = dataset()
SLIDING = dataset(eval_mode="slide", eval_crop=48, eval_stride=32)

# (run settings, dataset, options) -> protocol, each worked out by hand from the rule.
CASES = [
    (CITYSCAPES_RUN, WHOLE, {}, ("slide", 801, 534)),  # the run's record beats the dataset's
    (CITYSCAPES_RUN, WHOLE, {"crop": 600}, ("slide", 600, 400)),  # the stride follows an asked window: 2/3
    (CITYSCAPES_RUN, WHOLE, {"crop": 600, "stride": 500}, ("slide", 600, 500)),
    (PASCAL_RUN, WHOLE, {}, ("whole", None, None)),
    (PASCAL_RUN, SLIDING, {"mode": "slide"}, ("slide", 48, 32)),  # the benchmark's window before the training crop
    (PASCAL_RUN, WHOLE, {"mode": "slide"}, ("slide", 321, 214)),  # the run's training crop
    (PASCAL_RUN, WHOLE, {"mode": "center-crop"}, ("center-crop", 321, None)),
    ({}, SLIDING, {}, ("slide", 48, 32)),  # a reference checkpoint: the dataset's declared protocol
    ({}, WHOLE, {"mode": "slide"}, ("slide", 513, 342)),  # ... and 513, never the manifest's train_crop
    ({"data": {"crop": 64}}, SLIDING, {}, ("slide", 48, 32)),  # a new run: the dataset fills its eval section
    ({"data": {"crop": 64}, "eval": {"crop": 96}}, SLIDING, {}, ("slide", 96, 32)),  # field by field
]


@pytest.mark.parametrize(("settings", "manifest", "options", "expected"), CASES)
def test_protocol_sources(settings: dict, manifest: DatasetManifest, options: dict, expected: tuple) -> None:
    run = SavedRecipe.from_settings(settings)
    assert resolve_protocol(manifest, run=run, **options) == EvalProtocol(*expected)


# predict: the same rule without a dataset.
WINDOW_CASES = [
    (CITYSCAPES_RUN, {}, (801, 534)),
    (CITYSCAPES_RUN, {"crop": 300}, (300, 200)),  # not the recorded 534, which would skip pixels
    (PASCAL_RUN, {}, (321, 214)),
    ({"eval": {"mode": "slide", "crop": 48}}, {}, (48, 32)),
    ({}, {}, (513, 342)),  # a reference checkpoint or a model object
    ({}, {"crop": 64, "stride": 64}, (64, 64)),
]


@pytest.mark.parametrize(("settings", "options", "expected"), WINDOW_CASES)
def test_window_sources(settings: dict, options: dict, expected: tuple[int, int]) -> None:
    assert resolve_window(run=SavedRecipe.from_settings(settings), **options) == Window(*expected)


@pytest.mark.parametrize(("options", "fragment"), [
    ({"crop": 16}, "smaller than the backbone's coarsest stride"),  # MIN_CROP, the settings' bound too
    ({"crop": 64, "stride": 65}, "larger than the window"),
])
def test_windows_the_backbone_cannot_slide_are_refused(options: dict, fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment):
        resolve_window(**options)
    with pytest.raises(SettingsError, match=fragment):
        resolve_protocol(WHOLE, mode="slide", **options)


def test_saved_recipe_reads_any_settings_dict() -> None:
    assert SavedRecipe.from_settings(None) == SavedRecipe() == SavedRecipe.from_settings({"data": "not a section"})
    odd = SavedRecipe.from_settings({"data": {"crop": True, "split": 8}, "eval": {"mode": "tiles"}})
    assert (odd.train_crop, odd.split, odd.eval_mode) == (None, "8", None)  # a bool is no crop, "tiles" no mode
