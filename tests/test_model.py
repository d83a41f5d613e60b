"""The segmentor: every MiT variant and ablation variant, batch invariance, any crop, warm-up switch."""
from __future__ import annotations

import pytest
import torch

from allspark_cli.model.allspark import MemoryStep
from allspark_cli.model.config import ModelConfig, build_model, tokens_for_crop
from allspark_cli.model.mit import MIT_VARIANTS
from allspark_cli.model.methods import METHODS

CROP = 64
NUM_CLASSES = 4


def tiny(method: str = "allspark", backbone: str = "b0", **overrides):
    config = ModelConfig(
        backbone=backbone,
        method=method,
        num_classes=NUM_CLASSES,
        head_dim=16,
        memory_tokens=tokens_for_crop(CROP),
        **overrides,
    )
    return build_model(config)


def _train_step(model, use_memory=True, batch_l=2, batch_u=2):
    images_l = torch.randn(batch_l, 3, CROP, CROP)
    images_u = torch.randn(batch_u, 3, CROP, CROP) if METHODS[model.method].unlabeled else None
    model.train()
    pseudo = torch.randn(batch_u, NUM_CLASSES, CROP, CROP) if images_u is not None else None
    step = MemoryStep(pseudo, use_memory=use_memory, sample_ids_u=torch.arange(batch_u), iteration=0)
    return model.forward_train(images_l, images_u, memory_step=step)


@pytest.mark.parametrize("method", METHODS)
def test_each_ablation_variant_trains_and_infers(method):
    model, spec = tiny(method), METHODS[method]
    assert (model.allspark is not None) == spec.channel_attention
    assert (model.memory is not None) == spec.semantic_memory
    assert model.allspark is None or model.allspark.group_by_class == spec.class_grouping
    out = _train_step(model)
    assert out.logits_l.shape == (2, NUM_CLASSES, CROP, CROP)
    assert (out.logits_u is None) == (not spec.unlabeled)
    loss = out.logits_l.sum() + (out.logits_u.sum() if out.logits_u is not None else 0)
    loss.backward()
    # Every trainable parameter of every variant takes part in the training step, with a finite gradient.
    without = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert without == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, CROP, CROP))
    assert logits.shape == (1, NUM_CLASSES, CROP, CROP) and torch.isfinite(logits).all()


@pytest.mark.parametrize("variant", list(MIT_VARIANTS))
def test_every_mit_variant_has_the_published_widths_and_depths(variant):
    with torch.device("meta"):  # shapes only: no time spent initialising B5's 80M weights
        model = tiny(backbone=variant)
    spec = MIT_VARIANTS[variant]
    stages = model.backbone.encoder.stages
    assert [len(s.blocks) for s in stages] == list(spec.depths)
    assert [s.blocks[0].attn.num_heads for s in stages] == [1, 2, 5, 8]
    assert [s.blocks[0].mlp.fc1.out_features // d for s, d in zip(stages, spec.dims)] == [4, 4, 4, 4]
    with torch.device("meta"):
        features = model.extract_features(torch.randn(1, 3, CROP, CROP))
    assert [f.shape[1] for f in features] == list(spec.dims)
    assert [f.shape[-1] for f in features] == [16, 8, 4, 2]


@pytest.mark.parametrize("method", ["semi", "cca", "allspark"])
def test_inference_is_batch_invariant(method):
    model = tiny(method).eval()
    images = torch.randn(8, 3, CROP, CROP)
    with torch.no_grad():
        batched = model(images)
        single = torch.cat([model(images[i : i + 1]) for i in range(8)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(64, 96), (50, 77), (33, 33)])
def test_any_input_size_gives_logits_of_that_size(size):
    model = tiny().eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, NUM_CLASSES, *size)


def test_unequal_labeled_and_unlabeled_batches_train():
    model = tiny("allspark")
    out = _train_step(model, use_memory=False, batch_l=1, batch_u=3)
    assert out.logits_l.shape[0] == 1 and out.logits_u.shape[0] == 3
    out = _train_step(model, use_memory=True, batch_l=3, batch_u=1)
    assert out.logits_l.shape[0] == 3 and out.logits_u.shape[0] == 1


def _labeled_output(model, memory_value: float, use_memory: bool) -> torch.Tensor:
    model.memory.bank.fill_(memory_value)
    torch.manual_seed(1)
    images = torch.randn(4, 3, CROP, CROP)
    with torch.no_grad():  # no memory update: no pseudo logits given
        return model.forward_train(images[:2], images[2:], memory_step=MemoryStep(use_memory=use_memory)).logits_l


def test_warmup_switch_decides_whether_the_memory_is_read():
    model = tiny("allspark", attention_dropout=0.0, projection_dropout=0.0, decoder_dropout=0.0, drop_path_rate=0.0)
    model.train()
    before_a, before_b = _labeled_output(model, 0.0, False), _labeled_output(model, 5.0, False)
    torch.testing.assert_close(before_a, before_b)  # warm-up: keys from the batch's unlabeled tokens
    after_a, after_b = _labeled_output(model, 0.0, True), _labeled_output(model, 5.0, True)
    assert not torch.allclose(after_a, after_b)  # after warm-up: keys from the memory


def test_memory_is_updated_in_every_training_forward_warmup_included():
    model = tiny("allspark")
    bank = model.memory.bank.clone()
    _train_step(model, use_memory=False)
    assert not torch.equal(bank, model.memory.bank)
    assert model.memory.assigned_count.sum().item() == 2 * model.backbone.dims[-1]
    assert set(model.memory.source_sample[model.memory.source_channel >= 0].tolist()) <= {0, 1}


def test_longer_memory_is_read_as_groups_and_trains():
    model = tiny("allspark", memory_multiple=2)
    assert model.memory.slots == 2 * model.backbone.dims[-1]
    out = _train_step(model)
    out.logits_l.sum().backward()
    assert model.allspark.labeled_attention.q.weight.grad is not None


def test_memory_methods_need_the_token_count():
    with pytest.raises(ValueError, match="memory_tokens"):
        ModelConfig(backbone="b0", method="allspark", num_classes=3, memory_tokens=0)


def test_memory_attention_by_class_sums_each_classes_slots():
    """inspect-memory's per-class attention mass: the normalised map of the queries against every
    memory group's projected keys, summed over each class's groups (two groups per class here)."""
    from allspark_cli.model.allspark import AllSparkModule
    from allspark_cli.model.attention_maps import normalized_attention_map

    torch.manual_seed(0)
    module = AllSparkModule(16, 3, 2, memory_multiple=2, memory_tokens=9).eval()
    module.memory.bank.normal_()
    features = torch.randn(2, 16, 3, 3)
    mass = module.memory_attention_by_class(features)  # (B, hC, K)

    _, tokens = module._tokens(features)
    attention = module.labeled_attention
    queries = attention.q(tokens)  # (B, N, hC)
    sources = module.memory.as_sources()  # (K * 2, N, C), class-major
    keys = torch.cat([attention.k(source) for source in sources], dim=1)  # (N, K * 2 * hC), source-major
    expected = normalized_attention_map(queries.transpose(1, 2) @ keys)  # (B, hC, K * 2 * hC)
    expected = expected.view(2, 32, 3, -1).sum(-1)
    torch.testing.assert_close(mass, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mass.sum(-1), torch.ones(2, 32))
