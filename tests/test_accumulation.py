"""Gradient accumulation over groups (engine/training/accumulation.py): N micro-steps compute the
one-shot step (losses, every gradient, the Semantic Memory) when the head's BatchNorm uses its
running statistics and dropout is off; with BatchNorm in train mode they differ, which is the one
stated difference. Plus the setting's checks, `--dry-run`, `auto` and DDP."""
from __future__ import annotations

import contextlib
import copy
import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from train_fixtures import free_port, make_dataset, tiny_layer
from typer.testing import CliRunner

from allspark_cli.cli.app import app
from allspark_cli.engine.settings_layers import build_settings
from allspark_cli.engine.training.accumulation import accumulated_step
from allspark_cli.engine.training.alignment import DistributionAlignment
from allspark_cli.engine.training.losses import build_criterion
from allspark_cli.engine.training.memory_plan import StepMeasure, choose_micro_steps
from allspark_cli.engine.training.step import StepRecipe, TrainForward
from allspark_cli.engine.training.train import train
from allspark_cli.errors import ResourceError, SettingsError
from allspark_cli.model.config import ModelConfig, build_model
from allspark_cli.model.methods import METHODS

NO_DROPOUT = {"drop_path_rate": 0.0, "attention_dropout": 0.0, "projection_dropout": 0.0, "decoder_dropout": 0.0}
CROP = 64
CLASSES = 3
BATCH = 4  # images of each kind; groups of one image: 4 groups
GIB = 1024**3


def _freeze_batchnorm(model: torch.nn.Module) -> None:
    """BatchNorm normalises with its running statistics even in train mode (and leaves them alone)."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.forward = lambda x, m=module: F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias,
                                                              False, 0.0, m.eps)


def _batches(weak_to_strong: bool):
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(2 * BATCH, 3, CROP, CROP, generator=generator)
    masks = torch.randint(0, CLASSES, (BATCH, CROP, CROP), generator=generator)
    pad = torch.zeros(BATCH, CROP, CROP, dtype=torch.long)
    pad[:, :, -8:] = 255  # a padded border
    batch_u = [images[BATCH:], pad, torch.arange(BATCH)]
    if weak_to_strong:
        boxes = torch.zeros(BATCH, CROP, CROP, dtype=torch.long)
        boxes[:, 10:30, 5:40] = 1
        batch_u += [images[BATCH:].flip(-1), boxes]
    return (images[:BATCH], masks), batch_u


def _step(model, batch_l, batch_u, micro_steps: int, recipe: StepRecipe, use_memory: bool, gather=None,
          alignment=None, teacher=None):
    model.zero_grad(set_to_none=True)
    losses = accumulated_step(TrainForward(model), model, batch_l, batch_u, micro_steps=micro_steps,
                              backward=lambda loss: loss.backward(), criterion_l=build_criterion(
                                  "ce", ohem_thresh=0.7, ohem_min_kept=1),
                              use_memory=use_memory, iteration=5, gather=gather, autocast=contextlib.nullcontext,
                              recipe=recipe, alignment=alignment, teacher=teacher)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return losses, grads


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


CASES = [
    ("sup", "reference", "group", 4), ("semi", "reference", "group", 4), ("cca", "reference", "group", 2),
    ("cca+smem", "reference", "group", 4), ("allspark", "reference", "group", 4), ("allspark", "reference", "image", 2),
    ("allspark", "weak-to-strong", "group", 2), ("semi", "weak-to-strong", "image", 4),
]


# Memory methods both in warm-up (memory written, not read) and after it (read by every piece).
WITH_MEMORY = [(*case, use_memory) for case in CASES for use_memory in (False, True)
               if use_memory is False or METHODS[case[0]].semantic_memory]


@pytest.mark.parametrize(("method", "recipe_name", "pseudo_pass", "micro_steps", "use_memory"), WITH_MEMORY)
def test_micro_steps_compute_the_one_shot_step(method, recipe_name, pseudo_pass, micro_steps, use_memory):
    torch.manual_seed(0)
    config = ModelConfig(backbone="b0", method=method, num_classes=CLASSES, head_dim=16, memory_tokens=4, **NO_DROPOUT)
    initial = build_model(config).train()
    _freeze_batchnorm(initial)
    batch_l, batch_u = _batches(recipe_name == "weak-to-strong")
    batch_u = batch_u if METHODS[method].unlabeled else None
    recipe = StepRecipe(groups=BATCH, pseudo_label_pass=pseudo_pass, weak_to_strong=recipe_name == "weak-to-strong",
                        confidence_threshold=0.4, num_classes=CLASSES)
    one_shot, accumulated = copy.deepcopy(initial), copy.deepcopy(initial)
    _freeze_batchnorm(one_shot), _freeze_batchnorm(accumulated)
    expected, expected_grads = _step(one_shot, batch_l, batch_u, 1, recipe, use_memory)
    got, got_grads = _step(accumulated, batch_l, batch_u, micro_steps, recipe, use_memory)
    assert got.total.item() == pytest.approx(expected.total.item(), rel=1e-5)
    assert got.loss_x.item() == pytest.approx(expected.loss_x.item(), rel=1e-5)
    if expected.loss_u is not None:
        assert got.loss_u.item() == pytest.approx(expected.loss_u.item(), rel=1e-5, abs=1e-7)
        assert torch.allclose(got.health, expected.health, rtol=1e-5)  # the confidence sums in another order
    assert expected_grads.keys() == got_grads.keys()
    for name in expected_grads:
        assert _relative(got_grads[name], expected_grads[name]) < 1e-5, name
    if one_shot.memory is not None:  # the same writes, in the same order
        difference = (accumulated.memory.bank - one_shot.memory.bank).abs().max().item()
        assert difference < 1e-5, difference  # float rounding: batched products of 4 vs 1 image
        assert torch.equal(accumulated.memory.pointer, one_shot.memory.pointer)
        assert torch.equal(accumulated.memory.source_sample, one_shot.memory.source_sample)


@pytest.mark.parametrize("method", ["semi", "allspark"])
def test_micro_steps_align_the_pseudo_labels_as_the_one_shot_step(method: str):
    """The distribution alignment sees the whole step's unlabeled pixels once, whatever the count."""
    torch.manual_seed(0)
    config = ModelConfig(backbone="b0", method=method, num_classes=CLASSES, head_dim=16, memory_tokens=4, **NO_DROPOUT)
    initial = build_model(config).train()
    batch_l, batch_u = _batches(True)
    recipe = StepRecipe(groups=BATCH, weak_to_strong=True, confidence_threshold=0.4, num_classes=CLASSES)
    results = []
    for micro_steps in (1, 4):
        model = copy.deepcopy(initial)
        _freeze_batchnorm(model)
        alignment = DistributionAlignment(CLASSES, torch.device("cpu"), ignore_index=255)
        alignment.observe_labeled(batch_l[1])
        losses, grads = _step(model, batch_l, batch_u, micro_steps, recipe, True, alignment=alignment)
        results.append((losses, grads, alignment))
    (expected, expected_grads, expected_alignment), (got, got_grads, got_alignment) = results
    assert expected_alignment.steps == got_alignment.steps == 1
    assert torch.allclose(got_alignment.predicted, expected_alignment.predicted, rtol=1e-6)
    assert torch.allclose(got.health, expected.health, rtol=1e-5)
    assert got.loss_u.item() == pytest.approx(expected.loss_u.item(), rel=1e-5, abs=1e-7)
    for name in expected_grads:
        assert _relative(got_grads[name], expected_grads[name]) < 1e-5, name


def test_micro_steps_pseudo_label_with_the_teacher_as_the_one_shot_step():
    """An EMA teacher labels the step's unlabeled images once; the micro-steps compute the one-shot step."""
    torch.manual_seed(0)
    config = ModelConfig(backbone="b0", method="allspark", num_classes=CLASSES, head_dim=16, memory_tokens=4,
                         **NO_DROPOUT)
    initial = build_model(config).train()
    teacher = copy.deepcopy(initial).eval()
    with torch.no_grad():
        for param in teacher.parameters():
            param.mul_(0.5)  # labels differently from the student
    batch_l, batch_u = _batches(True)
    recipe = StepRecipe(groups=BATCH, weak_to_strong=True, confidence_threshold=0.0, num_classes=CLASSES)
    results = {}
    for micro_steps, labeler in ((1, teacher), (4, teacher), (1, None)):
        model = copy.deepcopy(initial)
        _freeze_batchnorm(model)
        results[micro_steps, labeler is None] = _step(model, batch_l, batch_u, micro_steps, recipe, True,
                                                      teacher=labeler)
    (expected, expected_grads), (got, got_grads) = results[1, False], results[4, False]
    assert torch.allclose(got.health, expected.health, rtol=1e-5)
    assert not torch.equal(results[1, True][0].health, expected.health)  # the teacher's labels, not the student's
    assert not teacher.training  # the pseudo-label pass leaves the teacher in eval mode, the student in train
    for name in expected_grads:
        assert _relative(got_grads[name], expected_grads[name]) < 1e-5, name


@pytest.mark.parametrize("use_memory", [False, True])
def test_gathered_writes_keep_the_one_shot_order(use_memory: bool):
    """Under DDP a write is gathered over the ranks: a gather per micro-step would interleave the
    ranks' pieces, so every micro-step count writes the step's tokens in one gathered write. Two
    ranks are stood in for by a gather that repeats the tensor with a different sample id."""
    torch.manual_seed(0)
    config = ModelConfig(backbone="b0", method="allspark", num_classes=CLASSES, head_dim=16, memory_tokens=4,
                         **NO_DROPOUT)
    initial = build_model(config).train()
    batch_l, batch_u = _batches(False)

    def two_ranks(tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, tensor + BATCH if tensor.dtype == torch.long and tensor.dim() == 1 else tensor])

    memories = []
    for micro_steps in (1, 4):
        model = copy.deepcopy(initial)
        _freeze_batchnorm(model)
        _step(model, batch_l, batch_u, micro_steps, StepRecipe(groups=BATCH), use_memory, gather=two_ranks)
        memories.append(model.memory)
    one_shot, accumulated = memories
    assert (accumulated.bank - one_shot.bank).abs().max().item() < 1e-5
    assert torch.equal(accumulated.source_sample, one_shot.source_sample)
    assert torch.equal(accumulated.pointer, one_shot.pointer)


def test_the_heads_batchnorm_in_train_mode_is_the_difference():
    torch.manual_seed(0)
    config = ModelConfig(backbone="b0", method="semi", num_classes=CLASSES, head_dim=16, **NO_DROPOUT)
    initial = build_model(config).train()
    batch_l, batch_u = _batches(False)
    recipe = StepRecipe(groups=BATCH)
    expected, _ = _step(copy.deepcopy(initial), batch_l, batch_u, 1, recipe, False)
    got, _ = _step(copy.deepcopy(initial), batch_l, batch_u, 4, recipe, False)
    assert abs(got.total.item() - expected.total.item()) > 1e-4  # batch statistics of 1 + 1 images, not 4 + 4


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tiny"))


def _config(tmp_path: Path, manifest: Path, **sections) -> Path:
    path = tmp_path / "tiny.yaml"
    layer = tiny_layer(manifest, tmp_path / "runs", **sections)
    path.write_text(yaml.safe_dump(layer))
    return path


def test_accumulation_must_divide_the_groups(manifest: Path, tmp_path: Path):
    with pytest.raises(SettingsError, match="train.accumulation_steps: 3 micro-steps must divide the 2 group"):
        train(build_settings(base=tiny_layer(manifest, tmp_path, train={"group_size": 1, "accumulation_steps": 3})))
    assert not (tmp_path / "tiny").exists()
    result = CliRunner().invoke(app, ["train", "--config", str(_config(tmp_path, manifest)), "--accumulate", "0"])
    assert result.exit_code == 2 and "accumulation_steps" in result.output


def test_a_run_with_micro_steps_trains_and_records_them(manifest: Path, tmp_path: Path):
    config = _config(tmp_path, manifest, train={"group_size": 1})
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--accumulate", "2", "--name", "acc"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny" / "acc"
    assert "2 micro-steps per step" in (run / "train.log").read_text()
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["accumulation_steps"] == 2
    auto = train(build_settings(base=tiny_layer(manifest, tmp_path / "auto")))  # auto on CPU: 1
    assert yaml.safe_load((auto.run_dir / "config.yaml").read_text())["train"]["accumulation_steps"] == 1


def test_dry_run_measures_and_writes_nothing(manifest: Path, tmp_path: Path):
    config = _config(tmp_path, manifest, train={"group_size": 1})
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "micro-steps" in result.output and "would pick 1 micro-step" in result.output
    assert "projected training time" in result.output
    assert not (tmp_path / "runs").exists()


def test_auto_picks_the_fewest_micro_steps_that_fit_a_device():
    """A fake 24 GiB card: a step's peak falls with the micro-steps (8 + 8 in 4 groups)."""
    peaks = {1: 40 * GIB, 2: 23 * GIB, 4: 14 * GIB}
    measured = []

    def fake(micro_steps: int) -> StepMeasure:
        measured.append(micro_steps)
        return StepMeasure(micro_steps, peaks[micro_steps], 1.0)

    chosen, rows = choose_micro_steps(4, fake, 24 * GIB, 0.9, what_fits="--amp bf16")
    assert chosen == 4 and measured == [1, 2, 4]  # 23 GiB is over 0.9 x 24 GiB
    chosen, _ = choose_micro_steps(4, fake, 80 * GIB, 0.9, what_fits="--amp bf16")
    assert chosen == 1
    with pytest.raises(ResourceError, match=r"even 4 micro-steps .* 12.0 GiB .* what would fit: --amp bf16"):
        choose_micro_steps(4, fake, 12 * GIB, 0.9, what_fits="--amp bf16")
    oom = choose_micro_steps(2, lambda n: StepMeasure(n, math.inf if n == 1 else GIB, 1.0), 8 * GIB, 0.9,
                             what_fits="-")
    assert oom[0] == 2 and math.isinf(oom[1][0].peak_bytes)


WORLD_SIZE = 2


def _ddp_worker(rank: int, port: int, manifest: str, out: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(WORLD_SIZE), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    # Global batch 4 in groups of 1: 2 groups per rank, 2 micro-steps of one group each.
    layer = tiny_layer(Path(manifest), Path(out) / "runs", train={"epochs": 2, "warmup_epochs": 1, "batch_size": 4,
                                                                  "group_size": 1, "accumulation_steps": 2},
                       eval={"every": 2}, model={"drop_path_rate": 0.0})
    result = train(build_settings(base=layer))
    torch.save({"weights": result.model.state_dict()}, Path(out) / f"rank{rank}.pt")


def test_ddp_with_micro_steps_keeps_the_ranks_identical(manifest: Path, tmp_path: Path):
    mp.spawn(_ddp_worker, args=(free_port(), str(manifest), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["weights"] for r in range(WORLD_SIZE))
    for name, value in rank0.items():
        if "running_" in name or "num_batches" in name:
            continue  # BatchNorm statistics are per process on CPU
        assert torch.equal(value, rank1[name]), name


def test_a_demo_dry_run_in_an_empty_folder_builds_the_demo_dataset_as_the_run_would(tmp_path: Path, monkeypatch):
    from allspark_cli.cli import demo_data
    from data_tools.demo import build_demo

    built = []

    def tiny_demo(folder, notify=None):  # the real builder, at a size a test affords
        built.append(Path(folder))
        build_demo(folder, num_train=32, num_val=4, size=(64, 96), workers=1)

    monkeypatch.setitem(demo_data.DATASET_BUILDERS, "demo", tiny_demo)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "--preset", "demo-1/16", "--dry-run", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert built == [Path("data/demo")] and (tmp_path / "data" / "demo" / "dataset.yaml").is_file()
    assert "would pick 1 micro-step" in result.output and not (tmp_path / "runs").exists()
