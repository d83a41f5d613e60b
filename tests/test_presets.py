"""Presets: every family file expands into presets that validate, map to their names and build a
tiny variant of their model; the recipe values match DESIGN.md section 3; family files and one's
own preset files report their problems by file and key. (tests/test_preset_fixture.py checks every
resolved preset against the settings of the one-file-per-preset loader.)"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import yaml

from allspark_cli.engine.training.presets import (
    PRESET_DIR,
    PRESET_DIR_ENV,
    DatasetBuilder,
    Preset,
    find_preset,
    list_presets,
    read_preset_file,
)
from allspark_cli.engine.settings import model_config_for
from allspark_cli.engine.settings_layers import build_settings
from allspark_cli.errors import SettingsError
from allspark_cli.model.config import ModelConfig, build_model

PRESETS = list_presets()


@functools.lru_cache(maxsize=None)
def _tiny_logits(config: ModelConfig) -> tuple[ModelConfig, torch.Tensor]:
    # Many presets share one architecture (pascal, aug, u2pl, coco at K=3): build each once.
    model = build_model(config).eval()
    with torch.no_grad():
        return model.config, model(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.folder_name)
def test_preset_validates_and_builds_a_tiny_model(preset: Preset) -> None:
    assert preset.name.startswith(f"{preset.family.name}-")
    assert preset.path == PRESET_DIR / f"{preset.family.name}.yaml"
    assert preset.folder_name == preset.name.replace("/", "_")  # runs/<folder>/ and the name users type
    assert find_preset(preset.folder_name) == preset and find_preset(preset.name) == preset
    settings = build_settings(base=preset.layer)
    assert settings.preset == preset.name
    tiny = settings.model_copy(update={"model": settings.model.model_copy(update={"backbone": "b0", "head_dim": 16})})
    config, logits = _tiny_logits(model_config_for(tiny, num_classes=3))
    assert logits.shape == (1, 3, 64, 64) and torch.isfinite(logits).all()
    # the model is built with the preset's own method: the paper's AllSpark unless the file says otherwise
    assert config.method == preset.layer.get("model", {}).get("method", "allspark")


def test_aliases_and_file_stems_resolve() -> None:
    assert find_preset("pascal-92").name == "pascal-1/16"
    assert find_preset("pascal-1464").name == "pascal-full"
    assert find_preset("pascal-1_8").name == "pascal-1/8"


def test_unknown_preset_lists_close_names() -> None:
    with pytest.raises(SettingsError, match=r"unknown preset 'pascal-1/9'.*closest: pascal-1/8"):
        find_preset("pascal-1/9")


@pytest.mark.parametrize(
    ("name", "crop", "epochs", "batch", "lr", "head", "warmup", "loss", "split", "miou", "source", "group"),
    [
        ("pascal-1/8", 513, 80, 8, 0.001, 10, 5, "ce", "183", 78.41, "Table 1", 2),
        ("pascal-aug-1/2", 513, 80, 8, 0.001, 10, 5, "ce", "aug-1/2", 81.14, "Table 3", 2),
        ("pascal-u2pl-1/16", 513, 80, 8, 0.001, 10, 5, "ce", "u2pl-1/16", 81.56, "Table 3 †", 2),
        ("pascal-u2pl-1/8", 513, 80, 8, 0.001, 10, 5, "ce", "u2pl-1/8", 82.04, "Table 3 †", 2),
        ("pascal-u2pl-1/4", 513, 80, 8, 0.001, 10, 5, "ce", "u2pl-1/4", 80.92, "Table 3 †", 2),
        ("cityscapes-1/16", 801, 240, 8, 0.005, 1, 15, "ohem", "1/16", 78.33, "Table 2", 2),
        ("coco-1/512", 513, 10, 16, 0.001, 10, 1, "ce", "1/512", 34.10, "Table 4", 4),
    ],
)
def test_paper_recipe_values(name, crop, epochs, batch, lr, head, warmup, loss, split, miou, source, group) -> None:
    preset = find_preset(name)
    s = preset.info.settings
    assert (s.data.crop, s.train.epochs, s.train.batch_size, s.optim.lr) == (crop, epochs, batch, lr)
    assert (s.optim.head_lr_multiplier, s.train.warmup_epochs, s.train.loss, s.data.split) == (head, warmup, loss, split)
    assert (s.model.backbone, s.model.head_dim, s.model.attention_heads) == ("b5", 768, 2)
    assert s.model.pretrained == Path("weights/mit_b5.pth")
    assert (s.optim.name, s.optim.momentum, s.optim.weight_decay, s.optim.poly_power) == ("sgd", 0.9, 1e-4, 0.9)
    assert (preset.info.paper_miou, preset.info.paper_source) == (miou, source)
    # The reference's per-GPU coupling: group = images per GPU, coupled pseudo-label
    # pass, padded border pseudo-labeled, epochs over the unlabeled list.
    assert (s.train.group_size, s.train.pseudo_label_pass, s.train.unlabeled_padding) == (group, "group", "pseudo-label")
    assert (s.train.epoch_length, s.train.baseline_recipe) == ("unlabeled", "reference")


def test_cityscapes_presets_use_sliding_window_and_ohem() -> None:
    s = find_preset("cityscapes-1/4").info.settings
    assert (s.eval.mode, s.eval.crop, s.eval.stride) == ("slide", 801, 534)
    assert (s.train.ohem_thresh, s.train.ohem_min_kept) == (0.7, 200_000)


def test_demo_presets_are_cpu_sized() -> None:
    for name in ("demo-1/16", "demo-full"):
        s = find_preset(name).info.settings
        assert (s.model.backbone, s.data.crop, s.model.pretrained) == ("b0", 128, None)
        assert s.train.batch_size <= 8 and s.train.epoch_iterations is not None
    assert find_preset("demo-full").info.settings.model.method == "sup"
    assert find_preset("demo-1/16").info.settings.model.method == "allspark"


def test_paper_presets_keep_the_references_recipe_and_the_demo_uses_weak_to_strong() -> None:
    """Fidelity: every paper preset trains the reference's unlabeled loss and weighting by default;
    the demo presets (the family with a dataset builder, and so the recipe for one's own data) use
    the recipe that served both demo families better (README, the demo), with UniMatch's published
    thresholds everywhere."""
    from allspark_cli.engine.training.presets import custom_recipe

    for preset in PRESETS:
        train_settings = preset.info.settings.train
        if preset.family.builder == "demo":
            assert (train_settings.recipe, train_settings.loss_weighting) == ("weak-to-strong", "fixmatch"), preset.name
        else:
            assert (train_settings.recipe, train_settings.loss_weighting) == ("reference", "mean"), preset.name
        expected_threshold = 0.0 if preset.family.name == "cityscapes" else 0.95
        assert train_settings.confidence_threshold == expected_threshold, preset.name
    assert custom_recipe()["train"]["recipe"] == "weak-to-strong"


def test_every_dataset_builder_a_family_may_name_has_a_function() -> None:
    from typing import get_args

    from allspark_cli.cli.demo_data import DATASET_BUILDERS

    assert set(DATASET_BUILDERS) == set(get_args(DatasetBuilder))


def _family_folder(tmp_path: Path, *names: str) -> Path:
    folder = tmp_path / "presets"
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / f"{name}.yaml").write_text((PRESET_DIR / f"{name}.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    return folder


def test_a_new_family_is_its_file(tmp_path: Path, monkeypatch) -> None:
    """Adding a dataset family to the presets: one file. Its name, order, splits and dataset
    builder come from it: --list-presets, --preset and the build of a missing dataset follow."""
    from allspark_cli.cli.demo_data import build_demo_when_missing, dataset_builder_for

    folder = _family_folder(tmp_path, "pascal", "demo")
    toy = yaml.safe_load((folder / "demo.yaml").read_text(encoding="utf-8"))
    toy.update(order=0, description="toy split {split}, {labeled_count} labeled",
               splits={"1/3": {"labeled_count": 9, "aliases": ["toy-9"]}, "1/9": {"labeled_count": 3}})
    toy["settings"]["data"]["manifest"] = "data/toy/dataset.yaml"
    (folder / "toy.yaml").write_text(yaml.safe_dump(toy), encoding="utf-8")
    presets = list_presets(folder)
    assert [p.name for p in presets][:3] == ["toy-1/9", "toy-1/3", "pascal-1/16"]
    toy_third = find_preset("toy-9", folder)
    assert toy_third.info.description == "toy split 1/3, 9 labeled" and toy_third.folder_name == "toy-1_3"
    assert toy_third.info.settings.data.split == "1/3" and toy_third.layer["preset"] == "toy-1/3"
    monkeypatch.setenv(PRESET_DIR_ENV, str(folder))
    assert dataset_builder_for("toy-1/3", "data/toy") is build_demo_when_missing
    assert dataset_builder_for("toy-1/3", tmp_path / "mine") is None  # never into a folder a user gave
    assert dataset_builder_for("pascal-1/8", "data/pascal") is None  # no builder in its family
    assert dataset_builder_for("mine", "data/toy") is None  # not a preset of the folder (a file of one's own)


@pytest.mark.parametrize(
    ("family", "edit", "fragment"),
    [
        ("demo", lambda text: text.replace("crop: ", "crops: ", 1), r"demo.yaml.*did you mean 'data.crop'"),
        ("demo", lambda text: text.replace("{labeled_count: 125}", "{labeled_count: 125, settings: {trian: {}}}"),
         r"unknown setting 'trian' in preset family demo.yaml splits.1/16"),
        ("demo", lambda text: text.replace("{labeled_count: 250}", "{labeled_count: 0}"),
         r"demo.yaml: splits.1/8.labeled_count: Input should be greater than or equal to 1"),
        ("demo", lambda text: text.replace("lr: 0.01", "lr: -1", 1), r"demo.yaml: splits.1/16: settings.optim.lr"),
        ("demo", lambda text: text.replace("builder: demo", "builder: pascal"), r"demo.yaml: builder: Input should be 'demo'"),
        ("demo", lambda text: text.replace("{split} labeled", "{count} labeled"), r"demo.yaml: description: \{count\} is not a placeholder"),
        ("pascal-aug", lambda text: text.replace("extends: pascal", "extends: pascal-voc"),
         r"pascal-aug.yaml: extends: no preset family 'pascal-voc'"),
        ("pascal", lambda text: text.replace("order: 1", "order: 1\nextends: pascal-aug"),
         r"extends: families extend each other in a circle \(pascal-aug -> pascal -> pascal-aug\)"),
        ("pascal-aug", lambda text: text.replace("data_split: aug-1/16, ", "data_split: aug-1/16, aliases: [pascal-92], "),
         r"preset name 'pascal-92' is given twice"),
    ],
    ids=["unknown-key", "unknown-key-in-a-split", "bad-split-field", "bad-value", "unknown-builder",
         "unknown-placeholder", "unknown-parent", "circle", "name-twice"],
)
def test_bad_family_file_names_the_file_and_the_key(tmp_path: Path, family: str, edit, fragment: str) -> None:
    folder = _family_folder(tmp_path, "pascal", "pascal-aug", "demo")
    path = folder / f"{family}.yaml"
    path.write_text(edit(path.read_text(encoding="utf-8")), encoding="utf-8")
    with pytest.raises(SettingsError, match=fragment):
        list_presets(folder)


def _own_preset_file(path: Path, preset: Preset) -> Path:
    """`preset` written as a preset file of one's own (the one-preset schema)."""
    info = preset.info.model_dump(mode="json", exclude={"settings"})
    settings = {key: value for key, value in preset.layer.items() if key != "preset"}
    path.write_text(yaml.safe_dump({**info, "settings": settings}, sort_keys=False), encoding="utf-8")
    return path


def test_a_preset_file_of_ones_own_trains_as_the_preset_it_copies(tmp_path: Path) -> None:
    demo = find_preset("demo-1/16")
    own = find_preset(str(_own_preset_file(tmp_path / "mine.yaml", demo)))
    assert (own.layer, own.info, own.family, own.folder_name) == (demo.layer, demo.info, None, "mine")
    assert build_settings(base=own.layer) == build_settings(base=demo.layer)


def test_a_preset_folder_may_hold_a_preset_file_of_ones_own_beside_the_families(tmp_path: Path) -> None:
    folder = _family_folder(tmp_path, "demo")
    own = _own_preset_file(folder / "mine.yaml", find_preset("demo-1/8"))
    own.write_text(own.read_text(encoding="utf-8").replace("name: demo-1/8", "name: mine", 1), encoding="utf-8")
    presets = list_presets(folder)
    assert [p.name for p in presets] == ["demo-1/16", "demo-1/8", "demo-1/4", "demo-1/2", "demo-full", "mine"]
    assert presets[-1].family is None and find_preset("mine", folder).layer["data"]["split"] == "1/8"


def test_bad_preset_file_names_the_key(tmp_path: Path) -> None:
    bad = _own_preset_file(tmp_path / "bad.yaml", find_preset("pascal-1/8"))
    bad.write_text(bad.read_text(encoding="utf-8").replace("crop: ", "crops: ", 1), encoding="utf-8")
    with pytest.raises(SettingsError, match=r"bad.yaml.*did you mean 'data.crop'"):
        read_preset_file(bad)
