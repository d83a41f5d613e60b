"""The method table (model/methods.py): paper order, the components each method needs, the one
check of a method name, and a method added as one entry training, saving and evaluating through the CLI."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from train_fixtures import make_dataset, tiny_layer
from typer.testing import CliRunner

from allspark_cli.cli.app import app
from allspark_cli.engine.settings_layers import build_settings
from allspark_cli.engine.training.presets import list_presets, read_preset_file
from allspark_cli.errors import DataError, SettingsError
from allspark_cli.model.checkpoint import load_for_inference, read_checkpoint
from allspark_cli.model.methods import METHODS, MethodSpec, method_of_weights

PAPER_ORDER = ["sup", "semi", "cca", "cca+smem", "allspark"]
# A method the table does not have: AllSpark's components under the name of its last one.
ADDED = MethodSpec("csg", "+ Channel-wise Semantic Grouping", unlabeled=True, channel_attention=True,
                   semantic_memory=True, class_grouping=True)


def _components(spec: MethodSpec) -> int:
    return sum((spec.unlabeled, spec.channel_attention, spec.semantic_memory, spec.class_grouping))


def test_the_table_is_in_paper_order_and_each_row_adds_one_component() -> None:
    assert list(METHODS) == PAPER_ORDER
    assert [_components(spec) for spec in METHODS.values()] == list(range(len(PAPER_ORDER)))
    assert [name for name, spec in METHODS.items() if spec.reference_baseline] == ["sup", "semi"]


@pytest.mark.parametrize(("components", "reason"), [
    ({"class_grouping": True}, "class grouping needs a Semantic Memory"),
    ({"semantic_memory": True}, "a Semantic Memory needs the AllSpark module"),
    ({"channel_attention": True}, "the AllSpark module needs unlabeled images"),
])
def test_a_method_without_a_component_it_needs_is_refused(components: dict[str, bool], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        replace(METHODS["sup"], name="broken", **components)


def test_an_unknown_method_is_refused_once_naming_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"model.method: unknown method 'bogus'; "
                                            r"known: sup, semi, cca, cca\+smem, allspark"):
        build_settings(base=tiny_layer(tmp_path / "dataset.yaml", tmp_path), options={"model.method": "bogus"})


def test_reference_weights_are_read_as_the_methods_the_reference_trains() -> None:
    def named(channel_attention: bool, semantic_memory: bool) -> str | None:
        return method_of_weights(channel_attention=channel_attention, semantic_memory=semantic_memory)

    assert (named(False, False), named(True, False), named(True, True)) == ("semi", "cca", "allspark")
    assert named(False, True) is None


def test_a_preset_baseline_for_a_method_without_a_baseline_script_is_refused(tmp_path: Path) -> None:
    demo = next(preset for preset in list_presets() if preset.name == "demo-1/16")
    raw = {"name": "odd", "settings": demo.layer, "baselines": {"allspark": {"optim": {"lr": 0.1}}}}
    path = tmp_path / "odd.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SettingsError, match=r"odd.yaml: baselines: allspark: the reference has no baseline script"):
        read_preset_file(path)


def test_a_method_added_as_one_entry_trains_saves_and_evaluates_through_the_cli(tmp_path: Path, monkeypatch) -> None:
    manifest = make_dataset(tmp_path / "data")
    layer_file = tmp_path / "tiny.yaml"
    layer_file.write_text(yaml.safe_dump(tiny_layer(manifest, tmp_path / "runs")))
    run = tmp_path / "runs" / "tiny" / "added"
    with monkeypatch.context() as patch:
        patch.setitem(METHODS, ADDED.name, ADDED)
        trained = CliRunner().invoke(app, ["train", "--config", str(layer_file), "--method", ADDED.name,
                                           "--name", "added"])
        assert trained.exit_code == 0, trained.output
        assert yaml.safe_load((run / "config.yaml").read_text())["model"]["method"] == ADDED.name
        checkpoint, model = load_for_inference(run / "weights" / "best.pt")
        assert checkpoint.model_config.method == model.method == ADDED.name
        assert model.memory is not None and model.allspark.group_by_class
        assert f"[{ADDED.name}, MiT-B0]" in (run / "train.log").read_text()
        evaluated = CliRunner().invoke(app, ["eval", str(run / "weights" / "best.pt"), "--workers", "0"])
        assert evaluated.exit_code == 0, evaluated.output
        metrics = json.loads((run / "eval" / "val" / "metrics.json").read_text())
        assert metrics["miou"] == pytest.approx(checkpoint.train_state["best_miou"])
    # The checkpoint records the method by name: without its entry the name is refused, not guessed.
    with pytest.raises(DataError, match=f"unknown method '{ADDED.name}'"):
        read_checkpoint(run / "weights" / "best.pt")
