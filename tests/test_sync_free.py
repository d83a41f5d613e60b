"""The per-step and per-image code that no longer waits for the device (OHEM, the confusion matrix)
computes what the plain, host-synchronising rules compute. (That they do not sync is checked on a
GPU by benchmarks/gpu_check.py with torch.cuda.set_sync_debug_mode("error").)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from allspark_cli.engine.training.losses import OhemCrossEntropy
from allspark_cli.engine.inference.metrics import ConfusionMatrix

IGNORE = 255


def _plain_ohem(logits, target, thresh, min_kept):
    """The rule as written in losses.py's docstring, with Python control flow."""
    valid = target != IGNORE
    if int(valid.sum()) == 0:
        return logits.sum() * 0
    pixel_loss = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")
    true_prob = logits.detach().softmax(1).gather(1, target.masked_fill(~valid, 0)[:, None])[:, 0]
    keep = valid
    if int(valid.sum()) > min_kept:
        threshold = max(float(true_prob[valid].sort().values[min_kept - 1]), thresh)
        keep = valid & (true_prob <= threshold)
    return pixel_loss[keep].mean()


@pytest.mark.parametrize("min_kept", [1, 50, 299, 300, 301, 5000])
@pytest.mark.parametrize("ignored_share", [0.0, 0.25, 1.0])
def test_ohem_equals_the_plain_rule(min_kept, ignored_share):
    """min_kept below, at and above the number of valid pixels (300 of 400 when a quarter is ignored)."""
    generator = torch.Generator().manual_seed(min_kept)
    logits = (3 * torch.randn(2, 4, 10, 20, generator=generator)).requires_grad_()
    target = torch.randint(0, 4, (2, 10, 20), generator=generator)
    target.view(-1)[: int(ignored_share * target.numel())] = IGNORE
    ours = OhemCrossEntropy(thresh=0.7, min_kept=min_kept, ignore_index=IGNORE)(logits, target)
    plain = _plain_ohem(logits, target, 0.7, min_kept)
    torch.testing.assert_close(ours, plain)
    grad_ours, = torch.autograd.grad(ours, logits)
    grad_plain, = torch.autograd.grad(plain, logits)
    torch.testing.assert_close(grad_ours, grad_plain)


def test_confusion_matrix_counts_like_bincount_and_skips_ignored_and_out_of_range():
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (3, 7, 9), generator=generator)
    pred = torch.randint(0, 4, (3, 7, 9), generator=generator)
    target[0, 0, :4] = IGNORE
    target[1, 1, :3] = 4  # class 4 of a 4-class model: out of range
    matrix = ConfusionMatrix(4, IGNORE)
    matrix.update(target[:2], pred[:2])
    matrix.update(target[2:], pred[2:])
    counted = (target != IGNORE) & (target < 4)
    expected = torch.bincount(target[counted] * 4 + pred[counted], minlength=16).reshape(4, 4)
    assert torch.equal(torch.from_numpy(matrix.to_numpy()), expected)
    assert matrix.out_of_range == int(((target != IGNORE) & (target >= 4)).sum())
