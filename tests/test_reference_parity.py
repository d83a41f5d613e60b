"""Parity with the paper's reference implementation (../shared/reference, DESIGN.md section 1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from allspark_cli import load_model
from allspark_cli.model.allspark import MemoryStep
from allspark_cli.model.checkpoint import read_checkpoint
from allspark_cli.model.memory import SemanticMemory, group_channels, resize_logits_to_grid

LOGITS_TOLERANCE = 1e-4


def _load(path):
    return torch.load(path, weights_only=True)


def test_reference_checkpoint_architecture_is_inferred(reference_dir):
    checkpoint = read_checkpoint(reference_dir / "reference_ckpt_b0.pth")
    config = checkpoint.model_config
    assert checkpoint.source == "reference"
    assert (config.backbone, config.num_classes, config.head_dim) == ("b0", 21, 256)
    assert (config.method, config.attention_heads, config.memory_multiple, config.memory_tokens) == ("allspark", 2, 1, 9)
    assert checkpoint.class_names[0] == "background" and len(checkpoint.class_names) == 21


def test_reference_logits_features_and_module_output(reference_dir):
    model = load_model(reference_dir / "reference_ckpt_b0.pth")
    assert not model.training
    expected = _load(reference_dir / "eval_b0.pt")
    images = expected["x_sq"]
    with torch.no_grad():
        for i in range(images.shape[0]):  # the reference outputs were made one image at a time
            features = model.extract_features(images[i : i + 1])
            for stage, feature in enumerate(features, start=1):
                torch.testing.assert_close(feature, expected[f"feat{stage}_sq"][i : i + 1], atol=1e-5, rtol=0)
            module_out = model.allspark(features[3])
            torch.testing.assert_close(module_out, expected["allspark_out_sq_single"][i : i + 1], atol=1e-5, rtol=0)
            features[3] = module_out
            torch.testing.assert_close(model.head(features), expected["head_logits_sq_single"][i : i + 1], atol=1e-5, rtol=0)
        logits = model(images)  # batched: ours is per image, so it equals the single-image outputs
    assert logits.shape == (2, 21, 65, 65)
    assert (logits - expected["logits_sq_single"]).abs().max() < LOGITS_TOLERANCE


def test_reference_memory_update_is_reproduced_exactly(reference_dir):
    data = _load(reference_dir / "memory_update_b0.pt")
    pseudo_logits = F.interpolate(data["head_logits_pseudo"], size=(65, 65), mode="bilinear", align_corners=False)
    tokens_u = data["attn_in_train"][2:]
    classes = group_channels(resize_logits_to_grid(pseudo_logits, (3, 3)), tokens_u)
    assert torch.equal(classes, data["channel_cls"])

    memory = SemanticMemory(num_classes=21, multiple=1, tokens=9, channels=256)
    memory.bank.copy_(data["kv_queue_before"])
    memory.pointer.copy_(data["queue_ptr_before"])
    memory.write(tokens_u, classes, sample_ids=torch.tensor([0, 1]), iteration=0)
    assert torch.equal(memory.bank, data["kv_queue_after"])
    assert torch.equal(memory.pointer, data["queue_ptr_after"])


def test_reference_memory_update_through_the_training_forward(reference_dir):
    """The module's own training forward writes the same memory as the reference from the same batch."""
    data = _load(reference_dir / "memory_update_b0.pt")
    model = load_model(reference_dir / "reference_ckpt_b0.pth").train()
    module = model.allspark
    module.memory.bank.copy_(data["kv_queue_before"])
    module.memory.pointer.copy_(data["queue_ptr_before"])
    pseudo_logits = F.interpolate(data["head_logits_pseudo"], size=(65, 65), mode="bilinear", align_corners=False)
    tokens_u = data["attn_in_train"][2:]
    # Feed maps whose tokens after the first LayerNorm are the reference's: bypass by patching the norm.
    features = torch.zeros(4, 256, 3, 3)
    module.token_norm.forward = lambda t: data["attn_in_train"]  # noqa: ARG005 - fixed tokens
    with torch.no_grad():
        module.forward_train(features[:2], features[2:], memory_step=MemoryStep(pseudo_logits, use_memory=True))
    assert torch.equal(module.memory.bank, data["kv_queue_after"])
    assert torch.equal(module.memory.pointer, data["queue_ptr_after"])
    assert torch.equal(tokens_u, data["attn_in_train"][2:])
