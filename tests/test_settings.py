"""Training settings: the precedence of the layers, the env-var scheme, validation and did-you-mean."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from allspark_cli.engine.settings import TrainSettings, model_config_for
from allspark_cli.engine.settings_layers import (
    build_settings,
    dump_settings_yaml,
    env_layer,
    read_settings_file,
    set_layer,
)
from allspark_cli.errors import SettingsError

BASE = {"data": {"manifest": "data/x/dataset.yaml", "split": "1/8", "crop": 513},
        "train": {"epochs": 80, "batch_size": 8, "seed": 0}, "optim": {"lr": 0.001}}


def test_each_layer_overrides_the_one_below(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("train: {epochs: 10, batch_size: 6, seed: 1}\noptim: {lr: 0.01}\n")
    environ = {"ALLSPARK_TRAIN__EPOCHS": "20", "ALLSPARK_TRAIN__BATCH_SIZE": "4"}
    options = {"train.epochs": 30, "data.crop": None}
    settings = build_settings(base=BASE, config=config, environ=environ, options=options, sets=["train.epochs=40"])
    assert settings.train.epochs == 40  # --set beats everything
    assert settings.train.batch_size == 4  # env beats config
    assert settings.train.seed == 1  # config beats preset
    assert settings.optim.lr == 0.01
    assert settings.data.crop == 513  # an option left at None keeps the lower layer's value
    assert build_settings(base=BASE, config=config, environ=environ, options=options).train.epochs == 30


def test_env_scheme_parses_yaml_and_skips_non_settings() -> None:
    layer = env_layer({"ALLSPARK_MODEL__PRETRAINED": "null", "ALLSPARK_DEBUG": "1", "ALLSPARK_TRAIN__AMP": "bf16",
                       "OTHER__X": "1"})
    assert layer == {"model": {"pretrained": None}, "train": {"amp": "bf16"}}


def test_set_values_are_yaml_never_code() -> None:
    assert set_layer(["train.epochs=3", "model.pretrained=null", "run.exist_ok=true"]) == {
        "train": {"epochs": 3}, "model": {"pretrained": None}, "run": {"exist_ok": True}}
    with pytest.raises(SettingsError, match="train.epochs"):
        build_settings(base=BASE, sets=["train.epochs=__import__('os').getcwd()"])


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"sets": ["trian.epochs=3"]}, "did you mean 'train.epochs'"),
        ({"sets": ["train.epoch=3"]}, "did you mean 'train.epochs'"),
        ({"environ": {"ALLSPARK_OPTIM__LRR": "1"}}, "did you mean 'optim.lr'"),
        ({"options": {"train.nope": 1}}, "unknown setting 'train.nope'"),
        ({"sets": ["data.crop=16"]}, "data.crop: Input should be greater than or equal to 32"),
        ({"sets": ["optim.lr=0"]}, "optim.lr: Input should be greater than 0"),
        ({"sets": ["train.batch_size=0"]}, "train.batch_size"),
        ({"sets": ["train.device=gpu"]}, "train.device"),
        ({"sets": ["model.backbone=b9"]}, "model.backbone"),
        ({"sets": ["epochs"]}, "--set expects key.path=value"),
        ({"sets": ["train=3"]}, "is a section"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict, fragment: str) -> None:
    with pytest.raises(SettingsError, match=None) as error:
        build_settings(base=BASE, **kwargs)
    assert fragment in str(error.value)


def test_config_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epocs: 3\n")
    with pytest.raises(SettingsError, match=r"bad.yaml.*did you mean 'train.epochs'"):
        read_settings_file(bad)
    with pytest.raises(SettingsError, match="not found"):
        read_settings_file(tmp_path / "missing.yaml")


def test_missing_manifest_is_reported() -> None:
    with pytest.raises(SettingsError, match="data: required"):
        build_settings(base={})


def test_saved_config_reloads_to_the_same_settings(tmp_path: Path) -> None:
    settings = build_settings(base=BASE, sets=["model.pretrained=null", "eval.mode=slide", "eval.crop=64"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_settings_yaml(settings))
    assert TrainSettings.model_validate(yaml.safe_load(path.read_text())) == settings
    assert build_settings(config=path) == settings


def test_model_config_builder_uses_the_crop_for_memory_tokens() -> None:
    settings = build_settings(base=BASE, sets=["model.backbone=b0", "model.head_dim=32"])
    config = model_config_for(settings, num_classes=21)
    assert (config.backbone, config.head_dim, config.num_classes, config.method) == ("b0", 32, 21, "allspark")
    assert config.memory_tokens == 17 * 17 and config.memory_grid == (17, 17)  # 513 -> stride-32 grid of 17 x 17
    with pytest.raises(ValueError, match="does not hold memory_tokens"):
        type(config).model_validate({**config.model_dump(), "memory_grid": (16, 17)})


@pytest.mark.parametrize(("setting", "fragment"), [("model.memory_multiple=17", "model.memory_multiple"),
                                                   ("model.head_dim=4", "model.head_dim"),
                                                   ("model.backbone=b9", "model.backbone")])
def test_an_architecture_value_out_of_range_is_refused_before_the_dataset_is_opened(tmp_path: Path, setting: str,
                                                                                    fragment: str) -> None:
    """The model section shares ModelConfig's declarations: one bound, checked with the settings.
    The manifest path does not exist, so reaching the dataset would fail with another message."""
    from allspark_cli.engine.training.train import train

    layer = {"data": {"manifest": str(tmp_path / "missing.yaml"), "split": "1/8"}}
    with pytest.raises(SettingsError, match=fragment):
        train(build_settings(base=layer, sets=[setting]))


def test_the_settings_a_resume_may_change_are_the_reporting_ones() -> None:
    """docs/training.md lists them: a resumed run changes them without --force."""
    from allspark_cli.engine.settings import reporting_only_settings

    assert sorted(reporting_only_settings()) == sorted(["run.", "train.log_every", "train.save_every", "data.workers",
                                                         "eval.batch_size", "eval.mosaic_images", "data.manifest",
                                                         "train.collapse_window", "train.memory_fraction"])


def test_missing_shared_data_fails_under_ci_and_skips_elsewhere(monkeypatch, tmp_path) -> None:
    """The parity tests cannot pass by skipping on CI, where ../shared is always laid out."""
    import pytest as _pytest
    from conftest import require_shared

    missing = tmp_path / "no-such-shared-folder"
    monkeypatch.setenv("CI", "true")
    with _pytest.raises(_pytest.fail.Exception, match="CI=true"):
        require_shared(missing)
    monkeypatch.delenv("CI")
    with _pytest.raises(_pytest.skip.Exception, match="not available"):
        require_shared(missing)
    require_shared(tmp_path)  # present: nothing happens
