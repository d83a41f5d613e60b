"""Every preset resolves to the settings it had as one YAML file per preset.

tests/fixtures/preset_settings.json was written by tests/fixtures/make_preset_settings.py with the
one-file-per-preset loader, before the presets became family files with per-split deltas: each
preset's name, aliases, metadata, raw settings layer, resolved settings (alone and under each
baseline method) and the --list-presets order, and the recipe for one's own data. A difference
here changes what `allspark train --preset NAME` trains.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))

from make_preset_settings import FIXTURE, preset_record  # noqa: E402

from allspark_cli.engine.training.presets import custom_recipe, find_preset, list_presets  # noqa: E402

EXPECTED = json.loads(FIXTURE.read_text(encoding="utf-8"))


def test_the_same_presets_in_the_same_order() -> None:
    assert [preset.name for preset in list_presets()] == [record["name"] for record in EXPECTED["presets"]]


@pytest.mark.parametrize("expected", EXPECTED["presets"], ids=lambda record: record["name"])
def test_each_preset_resolves_as_before(expected: dict) -> None:
    # Through JSON, as the fixture was written (tuples become lists).
    actual = json.loads(json.dumps(preset_record(find_preset(expected["name"]))))
    assert actual == expected
    for alias in expected["aliases"]:
        assert find_preset(alias).name == expected["name"]


def test_the_recipe_for_ones_own_data_is_unchanged() -> None:
    assert json.loads(json.dumps(custom_recipe())) == EXPECTED["custom_recipe"]
