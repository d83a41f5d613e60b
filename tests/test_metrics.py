"""ConfusionMatrix: hand-computed counts, the NaN policy for absent classes, ignore pixels, DDP sum."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from allspark_cli.engine.inference.metrics import ConfusionMatrix, metrics_from_confusion

# 4 classes: 0 and 1 present, 2 only predicted (a false positive), 3 absent from both;
# the last two pixels are ignore (255) and must not count whatever is predicted there.
TARGET = torch.tensor([[0, 0, 0, 1, 1, 255, 255]])
PRED = torch.tensor([[0, 0, 1, 1, 2, 3, 0]])
EXPECTED = [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_hand_computed_matrix_and_metrics() -> None:
    cm = ConfusionMatrix(4)
    cm.update(TARGET, PRED)
    assert cm.to_numpy().tolist() == EXPECTED
    m = cm.compute()
    assert m.iou[0] == pytest.approx(100 * 2 / 3)  # TP 2, GT 3, pred 2 -> 2 / 3
    assert m.iou[1] == pytest.approx(100 * 1 / 3)  # TP 1, GT 2, pred 2 -> 1 / 3
    assert m.iou[2] == 0.0  # predicted but absent from the ground truth: an error, counts as 0
    assert math.isnan(m.iou[3])  # absent from both: n/a, left out of the mean
    assert m.miou == pytest.approx(100 * (2 / 3 + 1 / 3 + 0) / 3)
    assert m.accuracy[0] == pytest.approx(100 * 2 / 3)
    assert m.accuracy[1] == pytest.approx(50.0)
    assert math.isnan(m.accuracy[2]) and math.isnan(m.accuracy[3])  # no ground-truth pixel
    assert m.pixel_accuracy == pytest.approx(60.0)  # 3 right of 5 labelled pixels


def test_sums_over_batches_not_mean_of_batches() -> None:
    whole = ConfusionMatrix(4)
    whole.update(TARGET, PRED)
    split = ConfusionMatrix(4)
    for i in range(TARGET.shape[1]):
        split.update(TARGET[:, i : i + 1], PRED[:, i : i + 1])
    assert split.to_numpy().tolist() == whole.to_numpy().tolist()
    assert split.compute().to_dict() == whole.compute().to_dict()


def test_out_of_range_targets_are_skipped_and_counted() -> None:
    cm = ConfusionMatrix(2, ignore_index=255)
    cm.update(torch.tensor([0, 1, 7, 255, -1]), torch.tensor([0, 1, 1, 1, 0]))
    assert cm.to_numpy().tolist() == [[1, 0], [0, 1]]
    assert cm.out_of_range == 2


def test_custom_ignore_index_and_json_nan() -> None:
    cm = ConfusionMatrix(3, ignore_index=0)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([2, 1, 1]))
    m = cm.compute()
    assert m.iou[1] == 100.0 and math.isnan(m.iou[0]) and math.isnan(m.iou[2])
    assert m.miou == 100.0
    assert m.to_dict()["iou"] == [None, 100.0, None]


def test_empty_matrix_gives_nan_not_error() -> None:
    m = ConfusionMatrix(3).compute()
    assert math.isnan(m.miou) and math.isnan(m.pixel_accuracy)
    assert metrics_from_confusion(torch.eye(2, dtype=torch.int64)).miou == 100.0


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(2).update(torch.zeros(2, 3), torch.zeros(3, 2))


class _Dist:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.device = torch.device("cpu")


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cm = ConfusionMatrix(4)
        if rank == 0:  # rank 1 saw no image at all and must still join the reduction
            cm.update(TARGET, PRED)
        cm.all_reduce_(_Dist(2))
        results[rank] = cm.to_numpy().tolist()
    finally:
        torch_dist.destroy_process_group()


def test_all_reduce_sums_over_processes() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(port, results), nprocs=2, join=True)
        assert results[0] == EXPECTED and results[1] == EXPECTED


def test_all_reduce_is_a_no_op_for_one_process() -> None:
    cm = ConfusionMatrix(4)
    cm.update(TARGET, PRED)
    assert cm.all_reduce_(None).to_numpy().tolist() == EXPECTED
    assert cm.all_reduce_(_Dist(1)).to_numpy().tolist() == EXPECTED
