"""The reference's baseline recipes on the paper presets, and how the batch is laid out in groups:
`--method sup` on pascal-1/16 trains the reference's 400 iterations,
not ~105,000; the same groups form on 1, 2 or 4 processes; bad group sizes are refused early."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from allspark_cli.data.manifest import (
    DatasetManifest,
    TrainSplit,
    load_manifest,
    write_manifest,
)
from allspark_cli.engine.distributed import DistInfo
from allspark_cli.engine.training.presets import find_preset
from allspark_cli.engine.training.sampling import EpochBatchSampler
from allspark_cli.engine.settings_layers import build_settings
from allspark_cli.engine.training.train_data import build_loaders, process_groups
from allspark_cli.errors import SettingsError

PASCAL_UNLABELED = 10_582 - 92  # the pascal-92 split: 92 labeled, the rest of the augmented set unlabeled


def _single_process() -> DistInfo:
    return DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def pascal_like(tmp_path_factory) -> Path:
    """A manifest with the pascal-92 list sizes (loaders read lists only, not images)."""
    root = tmp_path_factory.mktemp("pascal_like")
    (root / "splits").mkdir()
    (root / "splits/labeled.txt").write_text("".join(f"l{i}.jpg l{i}.png\n" for i in range(92)))
    (root / "splits/unlabeled.txt").write_text("".join(f"u{i}.jpg\n" for i in range(PASCAL_UNLABELED)))
    (root / "splits/val.txt").write_text("v.jpg v.png\n")
    manifest = DatasetManifest(
        name="pascal-like", root=root, classes=[f"c{i}" for i in range(21)], palette=[(i, i, i) for i in range(21)],
        train_splits={"92": TrainSplit(labeled="splits/labeled.txt", unlabeled="splits/unlabeled.txt")},
        eval_splits={"val": "splits/val.txt"}, eval_mode="whole", train_crop=513,
    )
    write_manifest(manifest, root / "dataset.yaml")
    return root / "dataset.yaml"


def _settings(preset_name: str, manifest: Path, method: str, *sets: str):
    preset = find_preset(preset_name)
    return build_settings(base=preset.layer, options={"model.method": method, "data.manifest": str(manifest)},
                          sets=["data.workers=0", *sets], method_recipes=preset.info.baselines)


def _iterations(settings, manifest: Path) -> int:
    dist = _single_process()
    loaders = build_loaders(settings, load_manifest(manifest), dist, process_groups(settings, dist.world_size))
    return loaders.iterations_per_epoch * settings.train.epochs


def test_pascal_92_sup_runs_the_reference_baseline_schedule(pascal_like: Path) -> None:
    sup = _settings("pascal-1/16", pascal_like, "sup")
    assert (sup.train.batch_size, sup.train.group_size, sup.train.epoch_length) == (16, 4, "labeled")
    assert _iterations(sup, pascal_like) == 5 * 80  # 92 // 16 batches an epoch, 80 epochs
    # The AllSpark run and `semi` make 80 passes over the unlabeled list at 8 + 8.
    for method in ("allspark", "semi"):
        assert _iterations(_settings("pascal-1/16", pascal_like, method), pascal_like) == 80 * (PASCAL_UNLABELED // 8)
    # The previous behaviour stays as a setting: the AllSpark recipe for the baseline too.
    shared = _settings("pascal-1/16", pascal_like, "sup", "train.baseline_recipe=method")
    assert (shared.train.batch_size, shared.train.epoch_length) == (8, "unlabeled")
    assert _iterations(shared, pascal_like) == 80 * (PASCAL_UNLABELED // 8)


def test_explicit_overrides_win_over_the_baseline_recipe(pascal_like: Path) -> None:
    sup = _settings("pascal-1/16", pascal_like, "sup", "train.batch_size=8")
    assert (sup.train.batch_size, sup.train.group_size, sup.train.epoch_length) == (8, 4, "labeled")


@pytest.mark.parametrize(
    ("preset", "method", "batch", "group", "lr", "epoch_length"),
    [
        ("cityscapes-1/16", "sup", 16, 4, 0.001, "labeled"),
        ("cityscapes-1/16", "semi", 8, 2, 0.001, "unlabeled"),
        ("cityscapes-1/16", "allspark", 8, 2, 0.005, "unlabeled"),
        ("coco-1/512", "sup", 32, 8, 0.001, "labeled"),
        ("coco-1/512", "semi", 16, 4, 0.001, "unlabeled"),
        ("pascal-aug-1/8", "semi", 8, 2, 0.001, "unlabeled"),
    ],
)
def test_baseline_recipes_of_design_section_3(pascal_like, preset, method, batch, group, lr, epoch_length) -> None:
    s = _settings(preset, pascal_like, method)
    assert (s.train.batch_size, s.train.group_size, s.optim.lr, s.train.epoch_length) == (batch, group, lr, epoch_length)
    assert s.model.method == method
    reference = find_preset(preset).info.settings
    assert (s.train.loss, s.optim.head_lr_multiplier, s.train.epochs) == (
        reference.train.loss, reference.optim.head_lr_multiplier, reference.train.epochs)


def test_groups_are_the_same_on_one_two_and_four_processes() -> None:
    def batches(world: int) -> list[list[int]]:
        per_rank = []
        for rank in range(world):
            sampler = EpochBatchSampler(40, batch_size=8 // world, seed=1, stream=1, rank=rank, world_size=world,
                                        groups=4)
            per_rank.append(list(sampler))
        # Each global batch as the concatenation of the ranks' parts, split into the 4 groups of 2.
        return [sum((part[b] for part in per_rank), []) for b in range(len(per_rank[0]))]

    one, two, four = batches(1), batches(2), batches(4)
    assert one == two == four
    # With as many groups as processes, each rank's batch is the DistributedSampler split.
    order = EpochBatchSampler(40, batch_size=8, seed=1, stream=1, groups=4).order()
    assert four[0][:2] == [int(order[0]), int(order[4])]


def test_a_group_size_that_does_not_divide_the_batch_is_refused(pascal_like: Path) -> None:
    settings = _settings("pascal-1/16", pascal_like, "allspark", "train.group_size=3")
    with pytest.raises(SettingsError, match=r"train.group_size: .*8 images of each kind.*group size 3"):
        process_groups(settings, _single_process().world_size)


def test_list_presets_shows_the_baseline_recipes_and_table_sources() -> None:
    from typer.testing import CliRunner

    from allspark_cli.cli.app import app

    result = CliRunner().invoke(app, ["train", "--list-presets"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    line = next(row for row in result.output.splitlines() if "pascal-u2pl-1/8" in row)
    assert "82.04" in line and "Table 3 †" in line and "sup: batch 16 /4" in line
    city = next(row for row in result.output.splitlines() if "cityscapes-1/16" in row)
    assert "semi: lr 0.001" in city
