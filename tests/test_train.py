"""The training loop end to end on a tiny dataset, and its building blocks (loss, schedule, order)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from train_fixtures import make_dataset, tiny_layer

from allspark_cli.data.datasets import build_eval_dataset
from allspark_cli.data.manifest import load_manifest
from allspark_cli.engine.training import epoch as epoch_module
from allspark_cli.engine.training import train as train_module
from allspark_cli.engine.inference.evaluate import evaluate_dataset
from allspark_cli.engine.training.losses import OhemCrossEntropy, cross_entropy
from allspark_cli.engine.output_folders import run_dir_for
from allspark_cli.engine.training.sampling import EpochBatchSampler
from allspark_cli.engine.settings import TrainSettings
from allspark_cli.engine.settings_layers import build_settings
from allspark_cli.engine.training.step import StepRecipe, pseudo_labels
from allspark_cli.engine.training.epoch import poly_lr
from allspark_cli.engine.training.train import train
from allspark_cli.errors import ResourceError, SettingsError
from allspark_cli.model.checkpoint import load_model, read_checkpoint
from allspark_cli.model.config import ModelConfig, build_model


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tiny"))


def test_tiny_run_writes_a_complete_run_folder(manifest: Path, tmp_path: Path) -> None:
    settings = build_settings(base=tiny_layer(manifest, tmp_path / "runs"))
    result = train(settings)
    run = tmp_path / "runs" / "tiny" / "exp"
    assert result.run_dir == run and result.finished and result.iterations == 2
    for name in ("config.yaml", "env.json", "train.log", "metrics.jsonl", "results.csv", "weights/last.pt",
                 "weights/best.pt", "plots/results.png", "plots/val_mosaic.png"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    saved = TrainSettings.model_validate(yaml.safe_load((run / "config.yaml").read_text()))
    assert saved.data.manifest == manifest.resolve() and saved.eval.mode == "whole"
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 1 and env["seed"] == 0 and "torch" in env and "git_commit" in env
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2] and all(m["loss_u"] is not None for m in metrics)
    rows = list(csv.DictReader((run / "results.csv").open()))
    assert list(rows[0]) == ["epoch", "iteration", "lr", "loss_x", "loss_u", "miou", "pixel_accuracy"]
    assert len(rows) == 1 and float(rows[0]["miou"]) == pytest.approx(result.best_miou)
    assert {m["epoch"] for m in metrics} == {int(rows[0]["epoch"])} == {1}  # one epoch, counted from 1 in both
    last = read_checkpoint(run / "weights/last.pt")
    assert last.train_state["finished"] and last.train_state["iteration"] == 2
    assert last.settings["data"]["manifest"] == str(manifest.resolve()) and last.settings["data"]["crop"] == 64
    assert last.class_names == ["background", "square", "disc"]
    # best.pt is a plain checkpoint that the eval developer's function scores as training did.
    model = load_model(run / "weights/best.pt")
    again = evaluate_dataset(model, build_eval_dataset(load_manifest(manifest)), mode="whole", device="cpu")
    assert again.metrics.miou == pytest.approx(result.best_miou, abs=1e-4)
    # The next run of the preset is auto-numbered; a taken --name is refused unless --exist-ok.
    assert run_dir_for(tmp_path / "runs", "tiny", None, False).name == "exp2"
    with pytest.raises(SettingsError, match="--exist-ok"):
        run_dir_for(tmp_path / "runs", "tiny", "exp", False)


def test_the_in_training_evaluation_reports_its_progress(manifest: Path, tmp_path: Path) -> None:
    """The reporter sees the validation images advance (a bar, not a display frozen at the epoch's end)."""
    import io

    from allspark_cli.engine.training.events import PlainReporter

    seen: list[tuple[int, int]] = []

    class Recorder(PlainReporter):
        def evaluating(self, done: int, total: int) -> None:
            seen.append((done, total))

    train(build_settings(base=tiny_layer(manifest, tmp_path)), reporter=Recorder(io.StringIO()))
    images = len(build_eval_dataset(load_manifest(manifest)))
    assert seen and seen[-1] == (images, images) and [done for done, _ in seen] == sorted({d for d, _ in seen})


def test_sup_on_a_fully_labeled_split_makes_one_pass_over_the_labeled_list(manifest: Path, tmp_path: Path) -> None:
    layer = tiny_layer(manifest, tmp_path, data={"split": "full"}, model={"method": "sup"})
    result = train(build_settings(base=layer))
    assert result.iterations == 4  # 8 labeled images / global batch 2
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(m["loss_u"] is None for m in metrics)


@pytest.mark.parametrize("method", ["cca", "allspark"])
def test_a_run_in_groups_trains_and_records_its_recipe(manifest: Path, tmp_path: Path, monkeypatch, method) -> None:
    """4 + 4 images in groups of 2 (two reference GPUs in one process): the step receives the
    groups and the recipe, and config.yaml records them."""
    seen = []
    real_step = epoch_module.train_step

    def spy(*args, **kwargs):
        seen.append(kwargs["recipe"])
        return real_step(*args, **kwargs)

    monkeypatch.setattr(epoch_module, "train_step", spy)
    layer = tiny_layer(manifest, tmp_path / "runs", model={"method": method},
                       train={"batch_size": 4, "group_size": 2, "unlabeled_padding": "ignore"})
    result = train(build_settings(base=layer))
    assert result.iterations == 1 and np.isfinite(result.best_miou)
    assert [(r.groups, r.pseudo_label_pass, r.ignore_padding) for r in seen] == [(2, "group", True)]
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())["train"]
    assert (saved["group_size"], saved["pseudo_label_pass"], saved["unlabeled_padding"]) == (2, "group", "ignore")


def test_a_non_finite_loss_stops_and_never_reaches_a_checkpoint(manifest: Path, tmp_path: Path, monkeypatch) -> None:
    """The flags are read a step late: the loss of iteration 2 turns NaN, the run stops naming it,
    and last.pt keeps the state saved at iteration 2 (before that step), with finite weights."""
    real_step = epoch_module.train_step

    def exploding(*args, **kwargs):
        losses = real_step(*args, **kwargs)
        return losses._replace(total=losses.total * float("nan")) if kwargs["iteration"] >= 2 else losses

    monkeypatch.setattr(epoch_module, "train_step", exploding)
    layer = tiny_layer(manifest, tmp_path, data={"split": "full"}, model={"method": "sup"},
                       train={"log_every": 10, "save_every": 2})
    with pytest.raises(SettingsError, match=r"non-finite at epoch 1, iteration 2; the last good state is in .*last.pt "
                                            r"\(iteration 2\)"):
        train(build_settings(base=layer))
    saved = read_checkpoint(tmp_path / "tiny" / "exp" / "weights" / "last.pt")
    assert saved.train_state["iteration"] == 2 and not saved.train_state["finished"]
    assert all(torch.isfinite(tensor).all() for tensor in saved.state_dict.values() if tensor.is_floating_point())


@pytest.mark.parametrize(
    ("sections", "error", "fragment"),
    [
        ({"data": {"split": "1/3"}}, SettingsError, "no training split '1/3'; available: half, full"),
        ({"train": {"batch_size": 6}}, SettingsError, "fewer than one global batch of 6"),
        ({"model": {"pretrained": "missing/mit_b0.pth"}}, SettingsError, "--no-pretrained"),
        ({"model": {"method": "semi"}, "data": {"split": "full"}}, SettingsError, "needs unlabeled images"),
        ({"train": {"amp": "fp16"}}, Exception, "fp16 needs a CUDA device"),
        ({"train": {"group_size": 3}}, SettingsError, "not a multiple of the group size 3"),
        ({"data": {"manifest": "missing/dataset.yaml"}, "train": {"group_size": 3}}, SettingsError,
         "train.group_size"),  # refused before the dataset is even opened
    ],
)
def test_bad_inputs_leave_no_run_folder(manifest: Path, tmp_path: Path, sections, error, fragment) -> None:
    with pytest.raises(error, match=None) as raised:
        train(build_settings(base=tiny_layer(manifest, tmp_path / "runs", **sections)))
    assert fragment in str(raised.value)
    assert not (tmp_path / "runs").exists()


def test_poly_schedule() -> None:
    assert poly_lr(0.01, 0, 100, 0.9) == 0.01
    assert poly_lr(0.01, 50, 100, 0.9) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(0.01, 100, 100, 0.9) == 0.0


def test_cross_entropy_ignores_255_and_ohem_keeps_the_hardest() -> None:
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 0, 0] = torch.tensor([4.0, 4.0, -4.0, 0.0])  # easy, easy, hard, medium for class 0
    target = torch.tensor([[[0, 0, 0, 255]]])
    per_pixel = torch.nn.functional.cross_entropy(logits, target, ignore_index=255, reduction="none")[0, 0]
    assert cross_entropy(logits, target) == pytest.approx(per_pixel[:3].mean())
    ohem = OhemCrossEntropy(thresh=0.7, min_kept=1)
    assert ohem(logits, target) == pytest.approx(per_pixel[2])  # only the hard pixel is below 0.7
    assert OhemCrossEntropy(thresh=0.7, min_kept=10)(logits, target) == pytest.approx(per_pixel[:3].mean())


def test_pseudo_labels_use_eval_mode_and_ignore_padding() -> None:
    model = build_model(ModelConfig(backbone="b0", method="semi", num_classes=3, head_dim=16)).train()
    images = torch.randn(2, 3, 64, 64)
    pad = torch.zeros(2, 64, 64, dtype=torch.int64)
    pad[:, :, 48:] = 255
    logits, pseudo = pseudo_labels(model, images, pad, torch.no_grad, StepRecipe(1, "image", ignore_padding=True))
    assert model.training  # restored
    with torch.no_grad():
        expected = model.eval()(images)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert (pseudo[:, :, 48:] == 255).all() and (pseudo[:, :, :48] < 3).all()


def test_data_order_is_a_function_of_seed_and_epoch_and_shards_by_rank() -> None:
    def batches(rank: int, world: int, epoch: int, start: int = 0) -> list[list[int]]:
        sampler = EpochBatchSampler(10, batch_size=2 // world, seed=3, stream=1, rank=rank, world_size=world)
        sampler.set_epoch(epoch, start)
        return list(sampler)

    assert batches(0, 1, 0) == batches(0, 1, 0) != batches(0, 1, 1)
    assert batches(0, 1, 0)[2:] == batches(0, 1, 0, start=2)  # resume skips the done batches
    merged = [a + b for a, b in zip(batches(0, 2, 0), batches(1, 2, 0))]
    assert sorted(np.concatenate(merged).tolist()) == sorted(np.concatenate(batches(0, 1, 0)).tolist())


def test_cuda_out_of_memory_becomes_a_resource_error_with_remedies(manifest: Path, tmp_path: Path, monkeypatch) -> None:
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(epoch_module, "train_step", out_of_memory)
    with pytest.raises(ResourceError, match=r"global batch 2\+2 .*crop 64, amp off: try --batch-size 1, --amp bf16"):
        train(build_settings(base=tiny_layer(manifest, tmp_path / "runs")))
    assert not (tmp_path / "runs").exists()  # failed before the first checkpoint: nothing left


def test_demo_preset_builds_its_dataset_when_missing(tmp_path: Path, monkeypatch) -> None:
    """`allspark train --preset demo-...` without the dataset: the CLI hands the engine the builder
    of `allspark prepare demo`, which runs once, into the manifest's folder."""
    from allspark_cli.cli.demo_data import dataset_builder_for

    built = []

    def build_demo(out_dir, **kwargs):  # stands in for data_tools.demo.build_demo (minutes for the real one)
        built.append(Path(out_dir))
        return make_dataset(Path(out_dir).resolve(), name="demo")  # named as the real builder names it

    monkeypatch.setattr("data_tools.demo.build_demo", build_demo)
    layer = tiny_layer(Path("data/demo/dataset.yaml"), tmp_path / "runs")  # the demo presets' own path
    layer["preset"] = "demo-1/16"
    settings = build_settings(base=layer)
    assert dataset_builder_for("pascal-1/8", "data/pascal") is None
    assert dataset_builder_for("demo-1/16", tmp_path / "mine") is None  # a path the user gave
    result = train(settings, build_missing=dataset_builder_for(settings.preset, settings.data.manifest))
    assert [path.resolve() for path in built] == [Path("data/demo").resolve()] and result.finished
    assert result.run_dir == tmp_path / "runs" / "demo-1_16" / "exp"


@pytest.mark.parametrize(("name", "kind"), [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_two_parameter_groups_with_the_head_multiplier(name: str, kind: type) -> None:
    settings = build_settings(base=tiny_layer(Path("d.yaml"), Path("runs")),
                              sets=[f"optim.name={name}", "optim.lr=0.002", "optim.head_lr_multiplier=10"])
    model = build_model(ModelConfig(backbone="b0", method="cca", num_classes=3, head_dim=16))
    optimizer = train_module._optimizer(model, settings)
    backbone, head = optimizer.param_groups
    assert isinstance(optimizer, kind) and (backbone["lr"], head["lr"]) == (0.002, pytest.approx(0.02))
    assert len(backbone["params"]) == len(list(model.backbone.parameters()))
    assert len(backbone["params"]) + len(head["params"]) == len(list(model.parameters()))
    if name == "sgd":
        assert (backbone["momentum"], backbone["weight_decay"]) == (0.9, 1e-4)


def test_the_loop_learns_an_easy_dataset(tmp_path: Path) -> None:
    # 16 images of a bright square and a disc on dark noise: 80 SGD steps must beat predicting
    # background everywhere (about 30 mIoU here) by far.
    manifest = make_dataset(tmp_path / "easy", num_train=16, num_val=4)
    layer = tiny_layer(manifest, tmp_path / "runs", data={"split": "full"}, model={"method": "sup"},
                       train={"epochs": 20, "batch_size": 4}, optim={"lr": 0.01, "head_lr_multiplier": 10},
                       eval={"every": 20, "mosaic_images": 0})
    assert train(build_settings(base=layer)).best_miou > 60
