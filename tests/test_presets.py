"""Presets: every file validates, maps to its name, builds a tiny variant of its model, and the
recipe values match DESIGN.md section 3."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from allspark_cli.engine.training.presets import (
    PRESET_DIR,
    file_stem_for,
    find_preset,
    list_presets,
    read_preset_file,
)
from allspark_cli.engine.settings import model_config_for
from allspark_cli.engine.settings_layers import build_settings
from allspark_cli.errors import SettingsError
from allspark_cli.model.config import ModelConfig, build_model

PRESET_FILES = sorted(PRESET_DIR.glob("*.yaml"))
PAPER_SPLITS = (
    [f"pascal-{s}" for s in ("1/16", "1/8", "1/4", "1/2", "full")]
    + [f"pascal-aug-{s}" for s in ("1/16", "1/8", "1/4", "1/2")]
    + [f"pascal-u2pl-{s}" for s in ("1/16", "1/8", "1/4")]
    + [f"cityscapes-{s}" for s in ("1/30", "1/16", "1/8", "1/4", "1/2")]
    + [f"coco-{s}" for s in ("1/512", "1/256", "1/128", "1/64", "1/32")]
    + [f"demo-{s}" for s in ("1/16", "1/8", "1/4", "1/2", "full")]
)


def test_every_paper_split_has_a_preset() -> None:
    assert sorted(p.name for p in list_presets()) == sorted(PAPER_SPLITS)


@functools.lru_cache(maxsize=None)
def _tiny_logits(config: ModelConfig) -> tuple[ModelConfig, torch.Tensor]:
    # Many presets share one architecture (pascal, aug, u2pl, coco at K=3): build each once.
    model = build_model(config).eval()
    with torch.no_grad():
        return model.config, model(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
def test_preset_file_validates_and_builds_a_tiny_model(path: Path) -> None:
    preset = read_preset_file(path)
    assert file_stem_for(preset.name) == path.stem
    settings = build_settings(base=preset.layer)
    assert settings.preset == preset.name
    tiny = settings.model_copy(update={"model": settings.model.model_copy(update={"backbone": "b0", "head_dim": 16})})
    config, logits = _tiny_logits(model_config_for(tiny, num_classes=3))
    assert logits.shape == (1, 3, 64, 64) and torch.isfinite(logits).all()
    assert config.method == settings.model.method


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


def test_bad_preset_file_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(PRESET_FILES[0].read_text().replace("crop: ", "crops: ", 1))
    with pytest.raises(SettingsError, match=r"bad.yaml.*did you mean 'data.crop'"):
        read_preset_file(bad)


def test_paper_presets_keep_the_references_recipe_and_the_demo_uses_weak_to_strong() -> None:
    """Fidelity: every paper preset trains the reference's unlabeled loss and weighting by default;
    the demo presets (and so the recipe for one's own data) use the recipe that served both demo
    families better (README, the demo), with UniMatch's published thresholds everywhere."""
    from allspark_cli.engine.training.presets import custom_recipe, list_presets

    for preset in list_presets():
        train_settings = preset.info.settings.train
        if preset.name.startswith("demo-"):
            assert (train_settings.recipe, train_settings.loss_weighting) == ("weak-to-strong", "fixmatch"), preset.name
        else:
            assert (train_settings.recipe, train_settings.loss_weighting) == ("reference", "mean"), preset.name
        expected_threshold = 0.0 if preset.name.startswith("cityscapes") else 0.95
        assert train_settings.confidence_threshold == expected_threshold, preset.name
    assert custom_recipe()["train"]["recipe"] == "weak-to-strong"
