"""`train.unlabeled_rampup`: the unlabeled loss's weight rises from ~0 to the reference's 0.5 over
T iterations; T = 0 (every preset's default) is the reference's plain mean."""
from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch

from allspark_cli.engine.settings import LoopSettings
from allspark_cli.engine.training.losses import build_criterion
from allspark_cli.engine.training.step import RAMP_SHARPNESS, StepRecipe, TrainForward, rampup_factor, train_step
from allspark_cli.model.config import ModelConfig, build_model

NO_DROPOUT = {"drop_path_rate": 0.0, "attention_dropout": 0.0, "projection_dropout": 0.0, "decoder_dropout": 0.0}
CROP = 64
RAMP = 100


def test_the_ramp_rises_from_almost_nothing_to_full_weight_and_stays():
    assert rampup_factor(0, 0) == 1.0 and rampup_factor(10_000, 0) == 1.0  # no ramp: the reference
    assert rampup_factor(0, RAMP) == pytest.approx(math.exp(-RAMP_SHARPNESS))
    weights = [rampup_factor(t, RAMP) for t in range(RAMP + 5)]
    assert all(a < b for a, b in zip(weights[:RAMP], weights[1 : RAMP + 1]))
    assert weights[RAMP:] == [1.0] * 5
    assert rampup_factor(RAMP // 2, RAMP) == pytest.approx(math.exp(-RAMP_SHARPNESS / 4))


def test_every_preset_trains_without_a_ramp():
    assert LoopSettings().unlabeled_rampup == 0
    with pytest.raises(ValueError, match="unlabeled_rampup"):
        LoopSettings(unlabeled_rampup=-1)


@pytest.mark.parametrize("method", ["semi", "allspark"])
def test_the_step_weights_the_unlabeled_loss_by_the_ramp(method):
    torch.manual_seed(0)
    config = ModelConfig(backbone="b0", method=method, num_classes=3, head_dim=16, memory_tokens=4, **NO_DROPOUT)
    initial = build_model(config).train()
    images = torch.randn(4, 3, CROP, CROP)
    batch_l = (images[:2], torch.randint(0, 3, (2, CROP, CROP)))
    batch_u = (images[2:], torch.zeros(2, CROP, CROP, dtype=torch.long), torch.arange(2))
    criterion = build_criterion("ce", ohem_thresh=0.7, ohem_min_kept=1)

    def step(iteration: int, ramp: int):
        model = copy.deepcopy(initial)  # each step from the same weights and BatchNorm statistics
        torch.manual_seed(1)
        return train_step(TrainForward(model), model, batch_l, batch_u, criterion_l=criterion, use_memory=False,
                          iteration=iteration, gather=None, autocast=contextlib.nullcontext,
                          recipe=StepRecipe(unlabeled_rampup=ramp))

    plain = step(10, 0)
    assert plain.total.item() == pytest.approx(0.5 * plain.loss_x.item() + 0.5 * plain.loss_u.item(), rel=1e-6)
    ramped = step(10, RAMP)
    assert torch.equal(ramped.loss_x, plain.loss_x) and torch.equal(ramped.loss_u, plain.loss_u)
    expected = 0.5 * plain.loss_x.item() + 0.5 * rampup_factor(10, RAMP) * plain.loss_u.item()
    assert ramped.total.item() == pytest.approx(expected, rel=1e-6)
    assert step(RAMP, RAMP).total.item() == pytest.approx(plain.total.item(), rel=1e-6)
