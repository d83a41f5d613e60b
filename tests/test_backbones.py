"""The backbone seam (model/encoder.py, model/backbones.py) and its second family, DINOv2: every
variant builds through the registry with the stages it declares, the grid rule matches the real
maps, DINOv2's stages are timm's normed block outputs, Meta's release files load completely, the
settings name the known backbones, and checkpoints record and dispatch on the family."""
from __future__ import annotations

import math

import pytest
import torch

from allspark_cli.engine.settings import model_config_for
from allspark_cli.engine.settings_layers import build_settings
from allspark_cli.errors import DataError, SettingsError
from allspark_cli.model.backbones import BACKBONES, build_backbone, display_name, family_of
from allspark_cli.model.checkpoint import infer_model_config, load_model, read_checkpoint, save_checkpoint
from allspark_cli.model.config import ModelConfig, build_model, grid_for_crop, tokens_for_crop
from allspark_cli.model.dinov2 import DINOV2_VARIANTS, PRETRAIN_SIZE, DinoV2Spec
from allspark_cli.model.weights import load_pretrained_backbone, match_state_dict
from backbone_fixtures import TINY_DINOV2, meta_release_layout, shrink_dinov2, write_meta_release
from train_fixtures import make_dataset, tiny_layer

# An input whose sides are multiples of neither 14 nor 32, so that every grid rule rounds.
ODD_SIZE = (65, 97)
CROP = 56
CLASSES = ["background", "square", "disc"]
SETTINGS_BASE = {"data": {"manifest": "data/x/dataset.yaml", "split": "1/8", "crop": PRETRAIN_SIZE}}


@pytest.fixture
def tiny_dinov2(monkeypatch) -> None:
    shrink_dinov2(monkeypatch)


def _tiny_segmentor(backbone: str = "dinov2-s") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone=backbone, num_classes=len(CLASSES), head_dim=16,
                                   memory_tokens=tokens_for_crop(CROP, backbone)))


def test_the_registry_holds_every_variant_once() -> None:
    assert [v for family in BACKBONES.values() for v in family.variants] == [
        "b0", "b1", "b2", "b3", "b4", "b5", "dinov2-s", "dinov2-b", "dinov2-l"]
    assert (display_name("b5"), display_name("dinov2-s")) == ("MiT-B5", "DINOv2-S")
    assert (family_of("b0").weight_file("b0"), family_of("dinov2-b").weight_file("dinov2-b")) == (
        "mit_b0.pth", "dinov2_vitb14_pretrain.pth")
    for spec in DINOV2_VARIANTS.values():  # four increasing read-outs, the last block among them (none left unused)
        assert len(spec.stage_blocks) == 4 and sorted(set(spec.stage_blocks)) == list(spec.stage_blocks)
        assert spec.stage_blocks[-1] == spec.depth - 1


@pytest.mark.parametrize("variant", ["b0", *DINOV2_VARIANTS])
def test_each_variant_builds_through_the_seam_with_the_stages_it_declares(variant: str) -> None:
    family = family_of(variant)
    with torch.device("meta"):  # shapes only: no time spent initialising ViT-L's 300M weights
        backbone = build_backbone(variant, drop_path_rate=0.0)
        maps = backbone(torch.empty(1, 3, *ODD_SIZE))
    assert backbone.family is family and backbone.variant == variant
    assert [m.shape[1] for m in maps] == list(family.dims(variant)) == list(backbone.dims)
    for stage, features in zip(backbone.feature_info, maps):
        assert tuple(features.shape[-2:]) == tuple(math.ceil(side / stage.reduction) for side in ODD_SIZE)
    assert tuple(maps[-1].shape[-2:]) == grid_for_crop(ODD_SIZE, variant)


def test_dinov2_stages_are_timms_normed_block_outputs_at_the_pretrained_size(tiny_dinov2) -> None:
    """At 518 pixels the position grid is used as stored. At other sizes ours is resized by plain
    bicubic (as DINOv2 does, and as ONNX exports), timm's by antialiased bicubic: a small difference."""
    backbone = build_backbone("dinov2-s", drop_path_rate=0.0).eval()
    images = torch.randn(1, 3, PRETRAIN_SIZE, PRETRAIN_SIZE)
    with torch.no_grad():
        ours = backbone(images)
        timms = backbone.encoder.forward_intermediates(images, indices=list(TINY_DINOV2.stage_blocks), norm=True,
                                                       intermediates_only=True)
    for got, expected in zip(ours, timms, strict=True):
        torch.testing.assert_close(got, expected)


def test_a_dinov2_segmentor_takes_any_image_size_per_image(tiny_dinov2) -> None:
    model = _tiny_segmentor().eval()
    images = torch.randn(2, 3, *ODD_SIZE)
    with torch.no_grad():
        logits = model(images)
        alone = model(images[1:])
    assert logits.shape == (2, len(CLASSES), *ODD_SIZE) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits[1:], alone)


def test_a_meta_release_file_loads_completely(tmp_path, tiny_dinov2) -> None:
    path = write_meta_release(tmp_path / "dinov2_vits14_pretrain.pth", TINY_DINOV2)
    published = torch.load(path, weights_only=True)
    backbone = build_backbone("dinov2-s", drop_path_rate=0.0)
    report = load_pretrained_backbone(backbone, path)
    assert report.complete and (report.unexpected, report.mismatched) == ([], [])  # mask_token dropped, not reported
    assert report.matched == len(backbone.encoder.state_dict())
    assert torch.equal(backbone.encoder.blocks[1].attn.qkv.weight, published["blocks.1.attn.qkv.weight"])
    assert torch.equal(backbone.encoder.pos_embed, published["pos_embed"])


@pytest.mark.parametrize("variant", list(DINOV2_VARIANTS))
def test_the_full_size_release_layouts_fit(variant: str) -> None:
    """Every name and shape of the real releases, checked on the meta device (no 300M-float files)."""
    family = family_of(variant)
    with torch.device("meta"):
        backbone = build_backbone(variant, drop_path_rate=0.0)
        published = {name: torch.empty(shape) for name, shape in meta_release_layout(DINOV2_VARIANTS[variant]).items()}
    _, report = match_state_dict(backbone.encoder, family.encoder_state_dict(published, backbone.encoder))
    assert report.complete and report.unexpected == []


def test_weights_of_another_size_are_refused_naming_the_file_to_use(tmp_path, tiny_dinov2, monkeypatch) -> None:
    wider = DinoV2Spec(48, TINY_DINOV2.depth, TINY_DINOV2.num_heads, TINY_DINOV2.stage_blocks, "dinov2_vitb14_pretrain.pth")
    monkeypatch.setitem(DINOV2_VARIANTS, "dinov2-b", wider)
    path = write_meta_release(tmp_path / "dinov2_vitb14_pretrain.pth", wider)
    backbone = build_backbone("dinov2-s", drop_path_rate=0.0)
    before = backbone.encoder.pos_embed.detach().clone()
    with pytest.raises(SettingsError, match=r"vitb14_pretrain\.pth: does not fit DINOv2-S .*\(dinov2_vits14_pretrain\.pth\)"):
        load_pretrained_backbone(backbone, path)
    assert torch.equal(backbone.encoder.pos_embed, before)  # nothing loaded


def test_a_missing_weight_file_names_the_release_file_to_get(tmp_path, tiny_dinov2) -> None:
    from allspark_cli.engine.training.train import train

    layer = tiny_layer(make_dataset(tmp_path / "data"), tmp_path / "runs",
                       model={"backbone": "dinov2-s", "pretrained": str(tmp_path / "missing.pth")})
    with pytest.raises(SettingsError, match=r"put the DINOv2-S weights there \(dinov2_vits14_pretrain\.pth from Meta"):
        train(build_settings(base=layer))
    assert not (tmp_path / "runs").exists()


def test_an_unknown_backbone_is_refused_in_one_line_naming_the_known_ones() -> None:
    with pytest.raises(SettingsError) as error:
        build_settings(base=SETTINGS_BASE, sets=["model.backbone=dinov2-x"])
    message = str(error.value)
    assert "model.backbone" in message and "\n" not in message
    for name in ("b0", "b5", "dinov2-s", "dinov2-b", "dinov2-l"):
        assert name in message


def test_the_settings_select_dinov2_and_its_patch_grid() -> None:
    settings = build_settings(base=SETTINGS_BASE, sets=["model.backbone=dinov2-s"])
    config = model_config_for(settings, num_classes=len(CLASSES))
    assert (config.backbone_family, config.memory_grid, config.memory_tokens) == ("dinov2", (37, 37), 37 * 37)


def test_checkpoints_record_the_family_and_older_ones_read_as_mit(tmp_path, tiny_dinov2) -> None:
    model = _tiny_segmentor()
    path = save_checkpoint(tmp_path / "dino.pt", model, class_names=CLASSES, settings={})
    assert torch.load(path, weights_only=True)["model_config"]["backbone_family"] == "dinov2"
    assert read_checkpoint(path).model_config.backbone_family == "dinov2"
    images = torch.randn(1, 3, CROP, CROP)
    with torch.no_grad():
        torch.testing.assert_close(load_model(path)(images), model.eval()(images))

    older = tmp_path / "older.pt"
    content = torch.load(save_checkpoint(older, _tiny_segmentor("b0"), class_names=CLASSES), weights_only=True)
    del content["model_config"]["backbone_family"]  # as written before the family was recorded
    torch.save(content, older)
    assert read_checkpoint(older).model_config.backbone_family == "mit"

    content["model_config"]["backbone_family"] = "convnext"
    torch.save(content, older)
    with pytest.raises(DataError, match="encoder family 'convnext' is not one this allspark knows"):
        read_checkpoint(older)
    content["model_config"]["backbone_family"] = "dinov2"  # disagrees with backbone b0
    torch.save(content, older)
    with pytest.raises(DataError, match="'b0' is not a DINOv2 variant"):
        read_checkpoint(older)


def test_the_state_dict_reader_dispatches_on_the_family(tiny_dinov2) -> None:
    state_dict = _tiny_segmentor().state_dict()
    config = infer_model_config(state_dict, family="dinov2")
    assert (config.backbone, config.backbone_family, config.method) == ("dinov2-s", "dinov2", "allspark")
    assert config.memory_tokens == tokens_for_crop(CROP, "dinov2-s")
    with pytest.raises(DataError, match="not a SegFormer/AllSpark checkpoint .*stages"):
        infer_model_config(state_dict, family="mit")
