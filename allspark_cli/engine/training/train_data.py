"""Start-up checks and loaders of a training run: everything data-related before the first step.

`open_dataset` builds a missing dataset through the builder the caller passes (the CLI passes
`allspark prepare demo`'s for the demo presets), loads and checks
the manifest (fast check, bad data refused before compute is spent); the evaluation protocol is
engine/inference/protocol.py's. `build_loaders` makes the two deterministic loaders (see engine/training/sampling.py).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader

from allspark_cli.data.datasets import EvalDataset, TrainDatasets, build_eval_dataset, build_train_datasets
from allspark_cli.data.manifest import MANIFEST_NAME, DatasetManifest, load_manifest
from allspark_cli.engine.distributed import DistInfo, barrier
from allspark_cli.engine.training.rundir import run_group
from allspark_cli.engine.training.sampling import LABELED_STREAM, UNLABELED_STREAM, EpochBatchSampler
from allspark_cli.engine.settings import TrainSettings
from allspark_cli.model.methods import METHODS
from allspark_cli.signals import ignore_stop_signals
from allspark_cli.text import plural
from allspark_cli.errors import SettingsError

# Builds a dataset whose manifest is missing, into the given folder; `notify(text)` may be told
# about the slow one-off work.
DatasetBuilder = Callable[[Path, Callable[[str], None] | None], object]


class BatchGroups(NamedTuple):
    """How each process's batch splits into equal groups, each what one of the reference's GPUs
    held (engine/training/step.py): checked once by `process_groups`, then passed along."""

    per_process: int  # images of each kind (labeled, unlabeled) in each process's batch
    size: int  # images of each kind per group (`train.group_size`, or the whole per-process batch)

    @property
    def count(self) -> int:
        """Groups of each process's batch."""
        return self.per_process // self.size


class Loaders(NamedTuple):
    labeled: DataLoader
    unlabeled: DataLoader | None
    samplers: tuple[EpochBatchSampler, ...]
    datasets: TrainDatasets
    iterations_per_epoch: int
    groups: BatchGroups


def manifest_path(settings: TrainSettings) -> Path:
    path = Path(settings.data.manifest).expanduser()
    return path / MANIFEST_NAME if path.is_dir() else path


def open_dataset(
    settings: TrainSettings, dist: DistInfo, *, fast_check: bool = True, notify: Callable[[str], None] | None = None,
    build_missing: DatasetBuilder | None = None,
) -> DatasetManifest:
    """The checked manifest of the run; `build_missing` builds it first (on rank 0) when it is missing."""
    path = manifest_path(settings)
    if not path.is_file() and build_missing is not None:
        if dist.rank == 0:
            build_missing(path.parent, notify)
        barrier()
    manifest = load_manifest(path)
    training_split(settings, manifest)  # named and present, or refused before any work
    if settings.eval.split not in manifest.eval_splits:
        raise SettingsError(f"eval.split: dataset {path} has no evaluation split '{settings.eval.split}'; "
                            f"available: {', '.join(manifest.eval_splits)}")
    from allspark_cli.data.check import check_dataset, raise_if_problems

    raise_if_problems(check_dataset(manifest, fast=fast_check))
    return manifest


def training_split(settings: TrainSettings, manifest: DatasetManifest) -> str:
    """The run's training split: `data.split`, or when it is null the dataset's only split besides
    `full`. SettingsError (listing the dataset's splits) for an unknown name or a choice to make."""
    split = settings.data.split or manifest.default_train_split()
    available = ", ".join(manifest.train_splits)
    if split is None:
        raise SettingsError(f"data.split: dataset '{manifest.name}' has several training splits ({available}); "
                            "choose one with --split NAME")
    if split not in manifest.train_splits:
        raise SettingsError(f"data.split: dataset '{manifest.name}' ({manifest_path(settings)}) has no training split "
                            f"'{split}'; available: {available}")
    return split


def with_dataset_defaults(settings: TrainSettings, manifest: DatasetManifest) -> TrainSettings:
    """`settings` with what they leave to the dataset filled in: the training split (null:
    `training_split`) and the crop (null: the manifest's train_crop)."""
    data = settings.data.model_copy(update={"split": training_split(settings, manifest),
                                            "crop": settings.data.crop or manifest.train_crop})
    return settings.model_copy(update={"data": data})


def run_group_of(settings: TrainSettings) -> str:
    """The folder under run.root of a run with these settings: `run.group`, else `rundir.run_group` of
    the preset and the dataset. A dataset that does not exist yet can only be a preset's own (the
    demo presets build theirs at their own path; any other is refused when the run opens it)."""
    if settings.run.group is not None:
        return settings.run.group
    path = manifest_path(settings)
    if settings.preset is not None and not path.is_file():
        return run_group(settings.preset, settings.preset, "")
    manifest = load_manifest(path)
    return run_group(settings.preset, manifest.name, training_split(settings, manifest))


def process_groups(settings: TrainSettings, world_size: int) -> BatchGroups:
    """The groups of each process's batch (engine/training/step.py); SettingsError when the group size does
    not divide the per-process batch (or the processes the global batch). Needs no data: `train` checks
    it before opening the dataset."""
    if settings.train.batch_size % world_size:
        raise SettingsError(f"train.batch_size: the global batch {settings.train.batch_size} must be a multiple of "
                            f"the {world_size} processes")
    per_rank = settings.train.batch_size // world_size
    group_size = settings.train.group_size or per_rank
    if per_rank % group_size:
        raise SettingsError(
            f"train.group_size: each of the {world_size} processes holds {per_rank} images of each kind "
            f"(global batch {settings.train.batch_size}), not a multiple of the group size {group_size}"
        )
    return BatchGroups(per_rank, group_size)


def build_loaders(settings: TrainSettings, manifest: DatasetManifest, dist: DistInfo, groups: BatchGroups) -> Loaders:
    """Loaders of this rank's share of `groups` (`process_groups`): per-rank batch = global batch /
    world size, drop-last."""
    global_batch = settings.train.batch_size
    seed = settings.train.seed
    datasets = build_train_datasets(manifest, settings.data.split, crop=settings.data.crop, seed=seed,
                                    repeat_labeled=settings.train.epoch_length == "unlabeled",
                                    strong_view=settings.train.recipe == "weak-to-strong",
                                    cutmix_probability=settings.train.cutmix_probability)
    use_unlabeled = METHODS[settings.model.method].unlabeled
    if use_unlabeled and datasets.unlabeled is None:
        supervised = " or ".join(name for name, spec in METHODS.items() if not spec.unlabeled)
        raise SettingsError(
            f"model.method: '{settings.model.method}' needs unlabeled images, but split '{settings.data.split}' "
            f"has none; use method {supervised} (or another split)"
        )
    pin = dist.device.type == "cuda"
    generator = torch.Generator().manual_seed(seed)  # keeps loader start-up off the global RNG (resume)

    def loader(dataset, stream: int) -> tuple[DataLoader, EpochBatchSampler]:
        sampler = EpochBatchSampler(len(dataset), batch_size=groups.per_process, seed=seed, stream=stream,
                                    rank=dist.rank, world_size=dist.world_size,
                                    max_batches=settings.train.epoch_iterations,
                                    groups=groups.count * dist.world_size)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=settings.data.workers, pin_memory=pin,
                          generator=generator, worker_init_fn=ignore_stop_signals), sampler

    labeled, labeled_sampler = loader(datasets.labeled, LABELED_STREAM)
    unlabeled, samplers = None, (labeled_sampler,)
    if use_unlabeled:
        unlabeled, unlabeled_sampler = loader(datasets.unlabeled, UNLABELED_STREAM)
        samplers = (labeled_sampler, unlabeled_sampler)
    iterations = min(sampler.batches_per_epoch for sampler in samplers)
    if iterations < 1:
        size = len(datasets.unlabeled) if use_unlabeled else len(datasets.labeled)
        raise SettingsError(f"train.batch_size: split '{settings.data.split}' has {plural(size, 'image')}, fewer than "
                            f"one global batch of {global_batch}")
    return Loaders(labeled, unlabeled, samplers, datasets, iterations, groups)


def eval_dataset(settings: TrainSettings, manifest: DatasetManifest) -> EvalDataset:
    return build_eval_dataset(manifest, settings.eval.split)
