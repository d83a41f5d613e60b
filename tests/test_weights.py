"""Weights in and out: MiT ImageNet weights (SegFormer and Hugging Face naming), checkpoints of this
toolkit and of the reference, and refusals of wrong, truncated or unsafe files."""
from __future__ import annotations

import pickle
import re

import pytest
import torch
from safetensors.torch import save_file

from allspark_cli import load_model
from allspark_cli.errors import DataError, SettingsError
from allspark_cli.model.allspark import MemoryStep
from allspark_cli.model.checkpoint import read_checkpoint, save_checkpoint
from allspark_cli.model.config import ModelConfig, build_model, tokens_for_crop
from allspark_cli.model.mit import MiTBackbone
from allspark_cli.model.weights import load_pretrained_backbone


def segformer_names(backbone: MiTBackbone) -> dict[str, torch.Tensor]:
    """The backbone's weights in the SegFormer release naming, plus an ImageNet head (as mit_b*.pth)."""
    out = {}
    for name, tensor in backbone.encoder.state_dict().items():
        name = re.sub(r"^patch_embed\.", "patch_embed1.", name)
        name = re.sub(r"^stages\.(\d)\.downsample\.", lambda m: f"patch_embed{int(m[1]) + 1}.", name)
        name = re.sub(r"^stages\.(\d)\.blocks\.(\d+)\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}.", name)
        name = re.sub(r"^stages\.(\d)\.norm\.", lambda m: f"norm{int(m[1]) + 1}.", name)
        out[name.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")] = tensor.clone()
    out["head.weight"], out["head.bias"] = torch.randn(1000, backbone.dims[-1]), torch.zeros(1000)
    return out


def huggingface_names(segformer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SegFormer release names -> `nvidia/mit-b*` model.safetensors names."""
    out = {}
    for name, tensor in segformer.items():
        if name.startswith("head."):
            out["classifier." + name[5:]] = tensor
            continue
        kv = re.match(r"^(.*)\.attn\.kv\.(weight|bias)$", name)
        new = re.sub(r"^patch_embed(\d)\.norm\.", lambda m: f"patch_embeddings.{int(m[1]) - 1}.layer_norm.", name)
        new = re.sub(r"^patch_embed(\d)\.", lambda m: f"patch_embeddings.{int(m[1]) - 1}.", new)
        new = re.sub(r"^block(\d)\.", lambda m: f"block.{int(m[1]) - 1}.", new)
        new = re.sub(r"^norm(\d)\.", lambda m: f"layer_norm.{int(m[1]) - 1}.", new)
        for old, hf in ((".norm1.", ".layer_norm_1."), (".norm2.", ".layer_norm_2."), (".attn.q.", ".attention.self.query."),
                        (".attn.sr.", ".attention.self.sr."), (".attn.norm.", ".attention.self.layer_norm."),
                        (".attn.proj.", ".attention.output.dense."), (".mlp.fc1.", ".mlp.dense1."), (".mlp.fc2.", ".mlp.dense2.")):
            new = new.replace(old, hf)
        if kv:
            base = re.sub(r"\.attn\.kv\.(weight|bias)$", "", new)
            key, value = tensor.chunk(2, dim=0)
            out[f"segformer.encoder.{base}.attention.self.key.{kv[2]}"] = key.contiguous()
            out[f"segformer.encoder.{base}.attention.self.value.{kv[2]}"] = value.contiguous()
        else:
            out[f"segformer.encoder.{new}"] = tensor.contiguous()
    return out


@pytest.fixture(scope="module")
def source_backbone() -> MiTBackbone:
    torch.manual_seed(3)
    return MiTBackbone("b0")


def _assert_same_weights(a: MiTBackbone, b: MiTBackbone) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_segformer_release_weights_load_completely(tmp_path, source_backbone):
    path = tmp_path / "mit_b0.pth"
    torch.save(segformer_names(source_backbone), path)
    target = MiTBackbone("b0")
    report = load_pretrained_backbone(target, path)
    assert report.complete and report.matched == len(target.encoder.state_dict())
    assert report.unexpected == []  # the ImageNet head is dropped, not reported
    _assert_same_weights(source_backbone, target)


def test_hugging_face_safetensors_load_completely(tmp_path, source_backbone):
    path = tmp_path / "model.safetensors"
    save_file(huggingface_names(segformer_names(source_backbone)), str(path))
    target = MiTBackbone("b0")
    report = load_pretrained_backbone(target, path)
    assert report.complete
    _assert_same_weights(source_backbone, target)


def test_weights_of_another_variant_are_refused(tmp_path):
    path = tmp_path / "mit_b1.pth"
    with torch.device("meta"):
        b1 = MiTBackbone("b1")
    torch.save({k: torch.zeros(v.shape) for k, v in segformer_names(b1).items()}, path)
    target = MiTBackbone("b0")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(SettingsError, match=r"mit_b1\.pth: does not fit MiT-B0"):
        load_pretrained_backbone(target, path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing loaded
    report = load_pretrained_backbone(target, path, allow_partial=True)
    assert report.mismatched and not report.complete


def test_truncated_and_unsafe_files_are_refused_as_unreadable(tmp_path, source_backbone):
    good = tmp_path / "mit_b0.pth"
    torch.save(segformer_names(source_backbone), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(DataError, match="truncated.pth: not a readable PyTorch file"):
        load_pretrained_backbone(MiTBackbone("b0"), truncated)

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    unsafe = tmp_path / "unsafe.pth"
    unsafe.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(DataError, match="unsafe.pth"):
        load_pretrained_backbone(MiTBackbone("b0"), unsafe)


def _tiny_model():
    return build_model(ModelConfig(backbone="b0", num_classes=3, head_dim=16, memory_tokens=tokens_for_crop(64)))


def test_checkpoint_round_trip_keeps_weights_memory_and_context(tmp_path):
    model = _tiny_model().train()
    images = torch.randn(4, 3, 64, 64)
    step = MemoryStep(torch.randn(2, 3, 64, 64), sample_ids_u=torch.tensor([4, 9]), iteration=5)
    model.forward_train(images[:2], images[2:], memory_step=step)
    path = save_checkpoint(tmp_path / "weights" / "last.pt", model, class_names=["bg", "a", "b"],
                           settings={"data": {"crop": 64}}, train_state={"epoch": 1})
    assert not list(path.parent.glob(".*tmp*"))  # atomic: no temporary left behind
    checkpoint = read_checkpoint(path)
    assert checkpoint.class_names == ["bg", "a", "b"] and checkpoint.settings["data"]["crop"] == 64
    assert checkpoint.train_state == {"epoch": 1} and checkpoint.source == "allspark"
    loaded = load_model(path)
    assert not loaded.training
    assert torch.equal(loaded.memory.bank, model.memory.bank)
    assert loaded.memory.source_sample.max().item() == 9
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))


def test_reference_checkpoint_loads_with_numpy_scalar_allowed(reference_dir):
    model = load_model(reference_dir / "reference_ckpt_b0.pth")
    assert model.memory.bank.shape == (21, 256, 9)
    assert (model.memory.source_channel == -1).all()  # no provenance in reference checkpoints


def test_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "numbers.pt"
    torch.save({"a": torch.zeros(2)}, path)
    with pytest.raises(DataError, match="numbers.pt: not a SegFormer/AllSpark checkpoint"):
        load_model(path)
    with pytest.raises(DataError, match="checkpoint not found"):
        load_model(tmp_path / "missing.pt")
