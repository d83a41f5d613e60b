"""The weak-to-strong recipe (DESIGN.md section 3a): the strong view, CutMix within groups, the
confidence-filtered unlabeled loss, the loss weighting, and training every method with it."""
from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_transforms import write_dataset
from train_fixtures import make_dataset, stop_training_at, tiny_layer
from typer.testing import CliRunner

from allspark_cli.cli.app import app
from allspark_cli.constants import IGNORE_INDEX
from allspark_cli.data import transforms as T
from allspark_cli.data.datasets import UnlabeledDataset
from allspark_cli.data.splits import SplitEntry
from allspark_cli.engine.settings_layers import build_settings
from allspark_cli.engine.training.losses import build_criterion
from allspark_cli.engine.training.pseudo_labels import (
    ConfidentTargets,
    confident_cross_entropy,
    confident_targets,
    cutmix,
    group_partners,
)
from allspark_cli.engine.training.step import StepRecipe, TrainForward, loss_weights, train_step
from allspark_cli.engine.training.train import train
from allspark_cli.errors import Interrupted
from allspark_cli.model.checkpoint import read_checkpoint
from allspark_cli.model.config import ModelConfig, build_model
from allspark_cli.model.methods import METHODS

NO_DROPOUT = {"drop_path_rate": 0.0, "attention_dropout": 0.0, "projection_dropout": 0.0, "decoder_dropout": 0.0}
CROP = 64
CUTMIX_DRAWS = 400


def test_cutmix_boxes_follow_unimatchs_published_ranges():
    rng = np.random.default_rng(0)
    boxes = [T.cutmix_box(CROP, rng) for _ in range(CUTMIX_DRAWS)]
    drawn = [box for box in boxes if box.any()]
    assert 0.4 < len(drawn) / CUTMIX_DRAWS < 0.6  # probability 0.5
    for box in drawn:
        rows, cols = np.nonzero(box)
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert box.sum() == height * width  # one solid rectangle
        # int() truncation of each side can lose up to one row and one column of the drawn area
        assert (math.sqrt(0.02) * CROP - 1) ** 2 <= box.sum() <= 0.4 * CROP * CROP
        assert 0.3 - 0.1 <= height / width <= 1 / 0.3 + 1  # the ratio, up to the truncation


def test_cutmix_probability_zero_leaves_the_strong_view_unmixed_and_its_draws_unmoved(tmp_path):
    entries = [SplitEntry(e.image, None) for e in write_dataset(tmp_path, count=4, size=(50, 60))]
    mixed = UnlabeledDataset(tmp_path, entries, crop=32, seed=4, strong_view=True)
    unmixed = UnlabeledDataset(tmp_path, entries, crop=32, seed=4, strong_view=True, cutmix_probability=0.0)
    always = UnlabeledDataset(tmp_path, entries, crop=32, seed=4, strong_view=True, cutmix_probability=1.0)
    for index in range(4):
        with_box, without_box, with_every_box = mixed[index], unmixed[index], always[index]
        assert not without_box[4].any() and with_every_box[4].any()
        for view in (0, 1, 3):  # weak view, padding, strong view: the same draws whatever the probability
            assert torch.equal(with_box[view], without_box[view])


def test_the_weak_view_is_the_references_draw_for_draw(tmp_path):
    entries = [SplitEntry(e.image, None) for e in write_dataset(tmp_path, count=3, size=(50, 60))]
    reference = UnlabeledDataset(tmp_path, entries, crop=32, seed=4)
    with_strong = UnlabeledDataset(tmp_path, entries, crop=32, seed=4, strong_view=True)
    for index in range(3):
        weak, pad, sample, strong, box = with_strong[index]
        ref_image, ref_pad, ref_sample = reference[index]
        assert torch.equal(weak, ref_image) and torch.equal(pad, ref_pad) and sample == ref_sample
        assert strong.shape == weak.shape and box.shape == pad.shape and set(box.unique().tolist()) <= {0, 1}
        # The strong view changes colours, never geometry: padding (black) stays exactly where it was.
        again = with_strong[index]
        assert torch.equal(again[3], strong) and torch.equal(again[4], box)  # a function of (seed, epoch, index)
    assert any(not torch.equal(with_strong[i][3], with_strong[i][0]) for i in range(3))


def test_cutmix_partners_stay_inside_their_group():
    assert group_partners(4, 2, torch.device("cpu")).tolist() == [1, 0, 3, 2]
    assert group_partners(6, 2, torch.device("cpu")).tolist() == [1, 2, 0, 4, 5, 3]
    assert group_partners(2, 2, torch.device("cpu")).tolist() == [0, 1]  # groups of one: no mixing


def test_cutmix_moves_images_labels_and_padding_with_the_pixels():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    labels = torch.tensor([[[1] * 4] * 4, [[2] * 4] * 4])
    box = torch.zeros(2, 4, 4, dtype=torch.long)
    box[0, 1:3, 0:2] = 1  # image 0 takes image 1's pixels there; image 1 takes nothing
    partners = torch.tensor([1, 0])
    mixed_images, mixed_labels = cutmix(images, box, partners), cutmix(labels, box, partners)
    for y in range(4):
        for x in range(4):
            source = 1 if (1 <= y < 3 and x < 2) else 0
            assert torch.equal(mixed_images[0, :, y, x], images[source, :, y, x])
            assert mixed_labels[0, y, x].item() == labels[source, y, x].item()
    assert torch.equal(mixed_images[1], images[1]) and torch.equal(mixed_labels[1], labels[1])


def test_the_unlabeled_loss_counts_confident_pixels_over_valid_ones():
    # One image, 2 classes, 4 pixels: confidences 0.9, 0.6, 0.99 and a padded pixel.
    p = torch.tensor([0.9, 0.6, 0.01, 0.5])
    teacher = torch.stack([torch.log(p), torch.log(1 - p)]).reshape(1, 2, 1, 4)
    pad = torch.tensor([[[0, 0, 0, T.UNLABELED_PADDING]]])
    targets = confident_targets(teacher, pad, threshold=0.8)
    assert targets.labels.tolist() == [[[0, 0, 1, IGNORE_INDEX]]]
    assert targets.passing.tolist() == [[[True, False, True, False]]]
    student = torch.tensor([[[[2.0, 0.0, 1.0, 5.0]], [[0.0, 1.0, 3.0, 0.0]]]])
    # CE by hand: pixel 0 (label 0) and pixel 2 (label 1) pass; 3 valid pixels.
    ce0 = -math.log(math.exp(2.0) / (math.exp(2.0) + 1.0))
    ce2 = -math.log(math.exp(3.0) / (math.exp(1.0) + math.exp(3.0)))
    assert confident_cross_entropy(student, targets).item() == pytest.approx((ce0 + ce2) / 3, rel=1e-6)
    nothing = ConfidentTargets(targets.labels, targets.confidence, torch.zeros_like(targets.passing))
    assert confident_cross_entropy(student, nothing).item() == 0.0


def _model(method: str):
    torch.manual_seed(0)
    config = ModelConfig(backbone="b0", method=method, num_classes=3, head_dim=16, memory_tokens=4, **NO_DROPOUT)
    return build_model(config).train()


@pytest.mark.parametrize("method", ["semi", "allspark"])
def test_without_threshold_box_or_colour_change_weak_to_strong_is_the_reference_loss(method):
    """Same images for both views, no box, threshold 0, no padding: the two recipes' unlabeled
    losses are the same number (the reference: mean CE over every pixel; weak-to-strong: the sum
    over passing pixels divided by the valid ones, all of them here)."""
    initial = _model(method)
    images = torch.randn(4, 3, CROP, CROP)
    batch_l = (images[:2], torch.randint(0, 3, (2, CROP, CROP)))
    pad = torch.zeros(2, CROP, CROP, dtype=torch.long)
    no_box = torch.zeros(2, CROP, CROP, dtype=torch.long)
    criterion = build_criterion("ce", ohem_thresh=0.7, ohem_min_kept=1)

    def step(batch_u, recipe):
        model = copy.deepcopy(initial)
        return train_step(TrainForward(model), model, batch_l, batch_u, criterion_l=criterion, use_memory=False,
                          iteration=0, gather=None, autocast=contextlib.nullcontext, recipe=recipe)

    reference = step((images[2:], pad, torch.arange(2)), StepRecipe())
    w2s = step((images[2:], pad, torch.arange(2), images[2:].clone(), no_box),
               StepRecipe(weak_to_strong=True, confidence_threshold=0.0))
    assert w2s.loss_u.item() == pytest.approx(reference.loss_u.item(), rel=1e-5)
    everything_filtered = step((images[2:], pad, torch.arange(2), images[2:].clone(), no_box),
                               StepRecipe(weak_to_strong=True, confidence_threshold=1.0))
    assert everything_filtered.loss_u.item() == 0.0


def test_the_loss_weighting():
    assert loss_weights("mean", 3.0) == (0.5, 0.5)  # the reference ignores lambda
    assert loss_weights("fixmatch", 2.0) == (1.0, 2.0)
    initial = _model("semi")
    images = torch.randn(4, 3, CROP, CROP)
    batch_l = (images[:2], torch.randint(0, 3, (2, CROP, CROP)))
    batch_u = (images[2:], torch.zeros(2, CROP, CROP, dtype=torch.long), torch.arange(2))
    criterion = build_criterion("ce", ohem_thresh=0.7, ohem_min_kept=1)
    model = copy.deepcopy(initial)
    losses = train_step(TrainForward(model), model, batch_l, batch_u, criterion_l=criterion, use_memory=False,
                        iteration=0, gather=None, autocast=contextlib.nullcontext,
                        recipe=StepRecipe(labeled_weight=1.0, unlabeled_weight=2.0))
    assert losses.total.item() == pytest.approx(losses.loss_x.item() + 2.0 * losses.loss_u.item(), rel=1e-6)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_under_weak_to_strong_through_the_cli(manifest: Path, tmp_path: Path, method: str):
    layer_file = tmp_path / "tiny.yaml"
    import yaml

    layer_file.write_text(yaml.safe_dump(tiny_layer(manifest, tmp_path / "runs", model={"method": method})))
    result = CliRunner().invoke(app, ["train", "--config", str(layer_file), "--recipe", "weak-to-strong",
                                      "--set", "train.loss_weighting=fixmatch", "--name", "w2s"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny" / "w2s"
    records = _metrics(run)
    if not METHODS[method].unlabeled:
        assert "pseudo_pass_share" not in records[-1]
        return
    assert "recipe weak-to-strong (threshold 0.95, fixmatch" in (run / "train.log").read_text()
    if method == "semi":  # a non-default CutMix probability and ramp are named in the banner
        result = CliRunner().invoke(app, ["train", "--config", str(layer_file), "--recipe", "weak-to-strong",
                                          "--set", "train.cutmix_probability=0", "--set", "train.unlabeled_rampup=2",
                                          "--set", "train.distribution_alignment=true", "--set",
                                          "train.teacher_momentum=0.99", "--name", "no-cutmix"])
        assert result.exit_code == 0, result.output
        log = (tmp_path / "runs" / "tiny" / "no-cutmix" / "train.log").read_text()
        assert ("weak-to-strong (threshold 0.95, CutMix p 0, distribution alignment, EMA teacher 0.99, ramp 2 iterations, "
                "mean") in log
        alignment = read_checkpoint(tmp_path / "runs" / "tiny" / "no-cutmix" / "weights" / "last.pt").train_state[
            "alignment"]
        assert alignment["steps"] > 0 and sum(alignment["labeled"]) > 0  # the run's shares go into its checkpoint
    record = records[-1]
    assert 0.0 <= record["pseudo_pass_share"] <= 100.0
    assert len(record["pseudo_class_share"]) == len(record["labeled_class_share"]) == 3
    assert sum(record["labeled_class_share"]) == pytest.approx(100.0, abs=0.01)


def test_the_reference_recipe_passes_every_pixel(manifest: Path, tmp_path: Path):
    done = train(build_settings(base=tiny_layer(manifest, tmp_path)))
    assert all(record["pseudo_pass_share"] == 100.0 for record in _metrics(done.run_dir))


@pytest.mark.parametrize(("alignment", "teacher_momentum"), [(False, 0.0), (True, 0.0), (False, 0.9)],
                         ids=["plain", "distribution-alignment", "ema-teacher"])
def test_weak_to_strong_resumes_mid_epoch_bit_exact(manifest: Path, tmp_path: Path, monkeypatch, alignment: bool,
                                                    teacher_momentum: float):
    def layer(root):
        return tiny_layer(manifest, root, train={"epochs": 2, "warmup_epochs": 1, "recipe": "weak-to-strong",
                                                 "confidence_threshold": 0.5, "distribution_alignment": alignment,
                                                 "teacher_momentum": teacher_momentum}, eval={"every": 2})

    reference = train(build_settings(base=layer(tmp_path / "a")))
    stop_training_at(monkeypatch, 2, signal.SIGTERM)
    with pytest.raises(Interrupted):
        train(build_settings(base=layer(tmp_path / "b")))
    monkeypatch.undo()
    from allspark_cli.engine.training.resume import resume_base

    checkpoint, saved = resume_base(tmp_path / "b" / "tiny" / "exp")
    train(build_settings(base=saved), resume=checkpoint)
    expected_checkpoint = read_checkpoint(reference.run_dir / "weights" / "last.pt")
    got_checkpoint = read_checkpoint(tmp_path / "b" / "tiny" / "exp" / "weights" / "last.pt")
    # The alignment's running shares continue where the stopped run left them (None when off).
    assert got_checkpoint.train_state["alignment"] == expected_checkpoint.train_state["alignment"]
    assert (expected_checkpoint.train_state["alignment"] is not None) == alignment
    expected, got = expected_checkpoint.state_dict, got_checkpoint.state_dict
    for name in expected:
        assert torch.allclose(expected[name].float(), got[name].float(), atol=1e-5), name
    expected_teacher, got_teacher = expected_checkpoint.train_state["teacher"], got_checkpoint.train_state["teacher"]
    assert (expected_teacher is not None) == (teacher_momentum > 0)
    for name in expected_teacher or {}:  # the teacher continues from where the stopped run left it
        assert torch.allclose(expected_teacher[name].float(), got_teacher[name].float(), atol=1e-5), name


def test_the_ema_teacher_follows_the_student_by_its_momentum():
    from allspark_cli.engine.training.teacher import EmaTeacher

    torch.manual_seed(0)
    student = build_model(ModelConfig(backbone="b0", method="semi", num_classes=3, head_dim=16))
    teacher = EmaTeacher(student, momentum=0.9)
    before = {name: p.clone() for name, p in teacher.model.named_parameters()}
    with torch.no_grad():
        for param in student.parameters():
            param.add_(1.0)  # every student weight one higher than the teacher's
        for buffer in student.buffers():
            if buffer.is_floating_point():
                buffer.add_(3.0)
    teacher.update(student)
    students = dict(student.named_parameters())
    for name, param in teacher.model.named_parameters():
        assert torch.allclose(param, 0.9 * before[name] + 0.1 * students[name], atol=1e-6), name
        assert torch.allclose(param, before[name] + 0.1, atol=1e-6), name  # t + (1 - m)(s - t), s - t = 1
        assert not param.requires_grad
    for (name, buffer), student_buffer in zip(teacher.model.named_buffers(), student.buffers()):
        assert torch.equal(buffer, student_buffer), name  # running statistics are copied, not averaged
    assert not teacher.model.training
