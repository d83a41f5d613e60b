"""Pseudo-label health: the counts a step reports, their summary, and the collapse warning (fires
on a collapsed run, once per class; silent on a healthy one)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from train_fixtures import make_dataset, tiny_layer

from allspark_cli.constants import IGNORE_INDEX
from allspark_cli.engine.settings_layers import build_settings
from allspark_cli.engine.training import step as step_module
from allspark_cli.engine.training.pseudo_labels import (
    CollapseMonitor,
    ConfidentTargets,
    health_counts,
    summarize_health,
)
from allspark_cli.engine.training.train import train

CLASSES = ["background", "square", "disc"]


def test_health_counts_and_summary():
    labels = torch.tensor([[[0, 0, 1, IGNORE_INDEX]]])
    confidence = torch.tensor([[[0.9, 0.5, 0.7, 0.1]]])
    passing = torch.tensor([[[True, False, False, False]]])
    masks_l = torch.tensor([[[0, 2, 2, IGNORE_INDEX]]])
    counts = health_counts(ConfidentTargets(labels, confidence, passing), masks_l, 3).tolist()
    summary = summarize_health(counts, 3)
    assert summary.pass_share == pytest.approx(100 / 3)  # 1 of 3 valid pixels
    assert summary.pseudo_share == pytest.approx([200 / 3, 100 / 3, 0.0])
    assert summary.labeled_share == pytest.approx([100 / 3, 0.0, 200 / 3])
    assert summary.confidence[:2] == pytest.approx([0.7, 0.7]) and math.isnan(summary.confidence[2])


def _counts(pseudo: list[float], labeled: list[float]) -> list[float]:
    return [sum(pseudo), sum(pseudo), *pseudo, *[0.9 * v for v in pseudo], *labeled]


def test_the_monitor_warns_once_per_collapsed_class_after_the_grace_period():
    monitor = CollapseMonitor(CLASSES, window=20, total_iterations=400, remedy="try X")
    collapsed = _counts([995.0, 5.0, 0.0], [800.0, 100.0, 100.0])  # square 0.5% vs 10%, disc 0% vs 10%
    assert monitor.add(collapsed, 1, 100) == []  # inside the first quarter of the run: never
    assert monitor.add(collapsed, 101, 110) == []  # half a window
    warnings = monitor.add(collapsed, 111, 120)
    assert len(warnings) == 2 and "'square' at iteration 120" in warnings[0] and "'disc'" in warnings[1]
    assert "try X" in warnings[0] and "over the last 20 iterations" in warnings[0]
    assert monitor.add(collapsed, 121, 140) == []  # once per class


def test_the_monitor_is_silent_on_a_healthy_run_and_on_thin_labeled_classes():
    monitor = CollapseMonitor(CLASSES, window=10, total_iterations=40, remedy="")
    healthy = _counts([850.0, 80.0, 70.0], [800.0, 100.0, 100.0])
    thin = _counts([1000.0, 0.0, 0.0], [995.0, 5.0, 0.0])  # square 0.5% of labeled pixels: under 1%
    for start in range(11, 41, 10):
        assert monitor.add(healthy if start < 30 else thin, start, start + 9) == []
    assert CollapseMonitor(CLASSES, window=0, total_iterations=40, remedy="").add(_counts([1.0, 0, 0], [1, 1, 1]), 20, 40) == []


def test_a_collapsing_run_warns_in_train_log(tmp_path: Path, monkeypatch):
    """Pseudo labels forced to all background: the warning names the other classes in train.log."""
    manifest = make_dataset(tmp_path / "data")
    real = step_module.pseudo_labels

    def background_only(segmentor, images_u, pad_mask, autocast, recipe):
        logits, _ = real(segmentor, images_u, pad_mask, autocast, recipe)
        forced = torch.full_like(logits, -10.0)
        forced[:, 0] = 10.0
        return forced, forced.argmax(dim=1)

    monkeypatch.setattr(step_module, "pseudo_labels", background_only)
    layer = tiny_layer(manifest, tmp_path / "runs", train={"epochs": 4, "collapse_window": 2}, eval={"every": 4})
    done = train(build_settings(base=layer))
    log = (done.run_dir / "train.log").read_text()
    assert "pseudo labels collapse on class 'square'" in log and "--recipe weak-to-strong" in log
    assert "collapse on class 'background'" not in log
    assert log.count("collapse on class 'square'") == 1


def test_health_counts_use_no_boolean_indexing() -> None:
    """They run every step: fixed-shape scatter sums only (boolean indexing would make the host wait
    for the device on CUDA). Padding / ignore and out-of-range ids land in no class."""
    import inspect

    from allspark_cli.engine.training import pseudo_labels

    source = inspect.getsource(pseudo_labels.health_counts) + inspect.getsource(pseudo_labels._class_sums)
    assert "bincount" not in source and "[valid]" not in source
    labels = torch.tensor([[[2, IGNORE_INDEX, 7]]])  # 7: out of range for K = 3
    counts = health_counts(ConfidentTargets(labels, torch.ones(1, 1, 3), torch.ones(1, 1, 3, dtype=torch.bool)),
                           torch.tensor([[[IGNORE_INDEX, 1, 1]]]), 3).tolist()
    assert counts[2:5] == [0.0, 0.0, 1.0] and counts[8:11] == [0.0, 2.0, 0.0]
