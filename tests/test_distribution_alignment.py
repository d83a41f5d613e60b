"""Distribution alignment of the pseudo labels (`train.distribution_alignment`): a class the teacher
under-predicts gets its labeled share back in the pseudo labels; padding stays out of the mean; the
running shares continue over steps and across a resume. Expected values are worked out by hand
from the module's formula p~_k = p_k r_k / sum_j p_j r_j, r_k = target_k / predicted_k."""
from __future__ import annotations

import pytest
import torch

from allspark_cli.data.transforms import UNLABELED_PADDING
from allspark_cli.engine.training.alignment import ALIGNMENT_MOMENTUM, DistributionAlignment
from allspark_cli.engine.training.pseudo_labels import confident_targets

IGNORE = 255


def _probabilities(foreground: list[float]) -> torch.Tensor:
    """(1, 2, 1, W) probabilities of a two-class image: class 1 has `foreground` at each pixel."""
    p1 = torch.tensor(foreground).view(1, 1, 1, -1)
    return torch.cat([1 - p1, p1], dim=1)


def _half_and_half_masks() -> torch.Tensor:
    return torch.tensor([[[0, 0, 1, 1]]])


def test_an_under_predicted_class_gets_its_labeled_share_back():
    alignment = DistributionAlignment(2, torch.device("cpu"), IGNORE)
    alignment.observe_labeled(_half_and_half_masks())  # target (0.5, 0.5)
    # The teacher gives class 1 a probability of 0.2 or 0.4: argmax says background everywhere.
    logits = _probabilities([0.2, 0.4, 0.2, 0.4]).log()
    pad = torch.zeros(1, 1, 4, dtype=torch.long)
    plain = confident_targets(logits, pad, threshold=0.0)
    assert plain.labels.tolist() == [[[0, 0, 0, 0]]]
    aligned = confident_targets(logits, pad, threshold=0.0, align=alignment.align)
    # predicted = (0.7, 0.3), r = (5/7, 5/3): p = 0.4 becomes (2/3) / (2/3 + 3/7) = 14/23 for class 1;
    # p = 0.2 becomes 1/3 against 4/7 (class 0 at 12/19).
    assert aligned.labels.tolist() == [[[0, 1, 0, 1]]]
    assert aligned.confidence[0, 0].tolist() == pytest.approx([12 / 19, 14 / 23, 12 / 19, 14 / 23], abs=1e-6)


def test_alignment_is_the_identity_when_the_teacher_already_predicts_the_labeled_shares():
    alignment = DistributionAlignment(2, torch.device("cpu"), IGNORE)
    alignment.observe_labeled(torch.tensor([[[0, 0, 0, 1]]]))  # target (0.75, 0.25)
    probabilities = _probabilities([0.1, 0.4, 0.2, 0.3])  # mean of class 1: 0.25
    aligned = alignment.align(probabilities, torch.ones(1, 1, 4, dtype=torch.bool))
    assert torch.allclose(aligned, probabilities, atol=1e-6)


def test_padding_and_ignored_labels_stay_out_of_the_shares():
    alignment = DistributionAlignment(2, torch.device("cpu"), IGNORE)
    alignment.observe_labeled(torch.tensor([[[0, 1, IGNORE, IGNORE]]]))
    assert alignment.labeled.tolist() == [1.0, 1.0]
    probabilities = _probabilities([0.2, 0.4, 0.99, 0.99])
    pad = torch.tensor([[[0, 0, UNLABELED_PADDING, UNLABELED_PADDING]]])
    targets = confident_targets(probabilities.log(), pad, threshold=0.0, align=alignment.align)
    assert alignment.predicted.tolist() == pytest.approx([0.7, 0.3])  # the padded 0.99s are not in it
    assert targets.passing.tolist() == [[[True, True, False, False]]]


def test_the_predicted_shares_are_a_moving_average_over_steps():
    alignment = DistributionAlignment(2, torch.device("cpu"), IGNORE)
    alignment.observe_labeled(_half_and_half_masks())
    valid = torch.ones(1, 1, 2, dtype=torch.bool)
    alignment.align(_probabilities([0.2, 0.2]), valid)  # the first step sets it: (0.8, 0.2)
    alignment.align(_probabilities([0.6, 0.6]), valid)
    expected = ALIGNMENT_MOMENTUM * 0.2 + (1 - ALIGNMENT_MOMENTUM) * 0.6
    assert alignment.predicted[1].item() == pytest.approx(expected)
    assert alignment.steps == 2


def test_a_class_without_labeled_pixels_keeps_its_probability():
    alignment = DistributionAlignment(3, torch.device("cpu"), IGNORE)
    alignment.observe_labeled(torch.tensor([[[0, 0, 1, 1]]]))  # class 2 not seen yet
    probabilities = torch.tensor([0.5, 0.3, 0.2]).view(1, 3, 1, 1)
    alignment.align(probabilities, torch.ones(1, 1, 1, dtype=torch.bool))
    ratio = alignment.ratio()
    assert ratio[2].item() == 1.0
    assert ratio[:2].tolist() == pytest.approx([0.5 / 0.5, 0.5 / 0.3])


def test_the_state_continues_after_a_resume():
    first = DistributionAlignment(2, torch.device("cpu"), IGNORE)
    first.observe_labeled(_half_and_half_masks())
    valid = torch.ones(1, 1, 4, dtype=torch.bool)
    first.align(_probabilities([0.2, 0.4, 0.2, 0.4]), valid)
    resumed = DistributionAlignment(2, torch.device("cpu"), IGNORE)
    resumed.load_state_dict(first.state_dict())
    step = _probabilities([0.3, 0.1, 0.6, 0.3])
    assert torch.equal(first.align(step, valid), resumed.align(step, valid))
    assert torch.equal(first.predicted, resumed.predicted) and resumed.steps == 2
