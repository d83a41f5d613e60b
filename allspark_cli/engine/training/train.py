"""`train(settings) -> RunResult`: the training loop (DESIGN.md section 3), shaped like torchvision's.

Reads top to bottom: data -> model -> parameter groups -> scheduler -> explicit resume -> run
folder -> epoch loop (step, log, evaluate, atomic checkpoint). One process or several under
torchrun (DDP on the TrainForward wrapper, SyncBatchNorm on CUDA only, the memory update gathered
over all ranks). Only rank 0 writes. Ctrl-C / SIGTERM save last.pt and raise Interrupted; a
non-finite loss saves the last good state and stops; CUDA OOM becomes ResourceError with remedies.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from allspark_cli.data.fingerprint import (
    DatasetFingerprint,
    fingerprint_differences,
    read_fingerprint,
    take_fingerprint,
    training_roles,
    write_fingerprint,
)
from allspark_cli.engine import distributed as D
from allspark_cli.engine.inference.protocol import SavedRecipe, resolve_protocol
from allspark_cli.engine.precision import (
    autocast_factory,
    check_amp,
    configure_cuda_math,
    make_scaler,
)
from allspark_cli.engine.settings import SETTINGS_VERSION, TrainSettings, model_config_for
from allspark_cli.engine.settings_layers import dump_settings_yaml
from allspark_cli.engine.training.epoch import EpochLoop, step_recipe, train_epoch
from allspark_cli.engine.training.events import (
    EvalInfo,
    TrainReporter,
    format_start,
    start_info,
)
from allspark_cli.engine.training.losses import build_criterion
from allspark_cli.engine.training.alignment import DistributionAlignment
from allspark_cli.engine.training.teacher import EmaTeacher
from allspark_cli.engine.training.accumulation import accumulated_step, check_accumulation
from allspark_cli.engine.training.memory_plan import (
    StepMeasure,
    candidate_micro_steps,
    choose_micro_steps,
    device_capacity,
    measure,
    timed,
)
from allspark_cli.engine.training.pseudo_labels import CollapseMonitor, collapse_remedy
from allspark_cli.engine.training.resume import (
    capture_rng,
    check_resumable,
    check_unchanged,
    restore_rng,
)
from allspark_cli.engine.training.rundir import (
    RunFolder,
    environment_info,
    run_dir_of_checkpoint,
)
from allspark_cli.engine.output_folders import run_dir_for
from allspark_cli.engine.training.state import TrainState
from allspark_cli.engine.training.step import TrainForward
from allspark_cli.engine.training.tensorboard import open_log, wanted
from allspark_cli.engine.training.train_data import (
    BatchGroups,
    DatasetBuilder,
    build_loaders,
    eval_dataset,
    manifest_path,
    open_dataset,
    process_groups,
    run_group_of,
    with_dataset_defaults,
)
from allspark_cli.engine.training.train_eval import evaluate_epoch
from allspark_cli.errors import DataError, Interrupted, ResourceError, SettingsError
from allspark_cli.model.backbones import family_of
from allspark_cli.model.checkpoint import read_checkpoint, save_checkpoint
from allspark_cli.model.config import build_model
from allspark_cli.model.weights import load_pretrained_backbone
from allspark_cli.signals import StopRequest

NO_RUN = Path()


@dataclass
class RunResult:
    """Outcome of `train`: where it wrote, the best and last validation mIoU (percent)."""

    run_dir: Path
    best_miou: float
    best_epoch: int
    last_miou: float
    epochs_done: int
    iterations: int
    finished: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)


def _resolved(settings: TrainSettings, protocol) -> TrainSettings:
    """Settings as stored: absolute manifest, the evaluation protocol actually used."""
    data = settings.data.model_copy(update={"manifest": manifest_path(settings).resolve()})
    evaluation = settings.eval.model_copy(update={"mode": protocol.mode, "crop": protocol.crop, "stride": protocol.stride})
    return settings.model_copy(update={"data": data, "eval": evaluation})


def _build_model(settings: TrainSettings, num_classes: int, dist: D.DistInfo, notes: list[str]) -> nn.Module:
    torch.manual_seed(settings.train.seed)  # identical initialisation on every rank
    model = build_model(model_config_for(settings, num_classes))
    if settings.model.pretrained is None:
        notes.append("training from scratch (model.pretrained: null): expect far lower mIoU than with ImageNet weights")
    else:
        path = Path(settings.model.pretrained).expanduser()
        if not path.is_file():
            family = family_of(settings.model.backbone)
            raise SettingsError(
                f"model.pretrained: {path} not found; put the {family.display_name(settings.model.backbone)} weights "
                f"there ({family.weight_file(settings.model.backbone)} from {family.publisher}), point --pretrained "
                "at them, or pass --no-pretrained"
            )
        notes.append(f"pretrained {path}: {load_pretrained_backbone(model.backbone, path, allow_partial=settings.model.allow_partial_pretrained).summary()}")
    if dist.is_distributed and dist.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(dist.device)


def _settle_attention(model: nn.Module, settings: TrainSettings, groups: BatchGroups, micro_steps: int) -> str:
    """Decides the labeled branch's attention path of `model` once, before its first step, for the
    run's largest call; returns how the banner names it ("" for a method without the module)."""
    if model.allspark is None:
        return ""
    path = model.allspark.settle_attention_path(group_images=groups.size,
                                                step_images=groups.per_process // micro_steps)
    return f"{path} (auto)" if settings.model.attention_path == "auto" else path


def _param_groups(model: nn.Module, settings: TrainSettings) -> list[dict[str, Any]]:
    return [
        {"params": model.backbone_parameters(), "lr": settings.optim.lr, "base_lr": settings.optim.lr},
        {"params": model.head_parameters(), "lr": settings.optim.lr * settings.optim.head_lr_multiplier,
         "base_lr": settings.optim.lr * settings.optim.head_lr_multiplier},
    ]


def _optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    groups, optim = _param_groups(model, settings), settings.optim
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


def _oom_error(settings: TrainSettings, dist: D.DistInfo) -> ResourceError:
    batch, crop = settings.train.batch_size, settings.data.crop
    return ResourceError(
        f"CUDA out of memory with global batch {batch}+{batch} ({batch // dist.world_size} per GPU), crop {crop}, "
        f"amp {settings.train.amp}: try --batch-size {max(batch // 2, 1)}, --amp bf16, a smaller --crop, "
        "or more GPUs (torchrun --nproc_per_node N)"
    )


def _check_same_dataset(run_dir: Path, now: DatasetFingerprint, settings: TrainSettings, force: bool) -> list[str]:
    """Refuses (without `force`) a resume onto a dataset other than the one the run recorded;
    returns the notes for the log. Runs from before fingerprints were recorded are checked by their
    class names only (on the checkpoint)."""
    recorded = read_fingerprint(run_dir)
    if recorded is None:
        return []
    differences = fingerprint_differences(recorded, now, training_roles(settings.data.split, settings.eval.split))
    if not differences:
        return []
    if not force:
        raise DataError(f"--resume: {now.manifest} is not the dataset run {run_dir} started on "
                        f"({recorded.manifest}): {'; '.join(differences)}; point --data at that dataset, "
                        "or pass --force to go on with this one")
    return [f"resumed on another dataset (--force): {now.manifest}: {'; '.join(differences)}"]


def _measured_step(settings: TrainSettings, dist: D.DistInfo, loaders, num_classes: int) -> Callable[[int], float]:
    """`one_step(N)`: two whole training steps with N micro-steps of a freshly built model (random
    weights: memory does not depend on them) on the run's first batch, for the memory plan; returns
    the seconds of the second (the first pays one-off costs: allocations, kernel choice). The real
    model is built afterwards from the seed, so measuring changes no number of the run."""
    for sampler in loaders.samplers:
        sampler.set_epoch(0, 0)
    batch_l = [t.to(dist.device) for t in next(iter(loaders.labeled))]
    batch_u = None if loaders.unlabeled is None else [t.to(dist.device) for t in next(iter(loaders.unlabeled))]
    recipe = step_recipe(settings, loaders.groups.count, num_classes)
    autocast = autocast_factory(settings.train.amp, dist.device)
    criterion = build_criterion(settings.train.loss, ohem_thresh=settings.train.ohem_thresh,
                                ohem_min_kept=settings.train.ohem_min_kept)

    def one_step(micro_steps: int) -> float:
        model = build_model(model_config_for(settings, num_classes)).to(dist.device).train()
        _settle_attention(model, settings, loaders.groups, micro_steps)  # the path the run would take
        runner, optimizer = TrainForward(model), _optimizer(model, settings)
        scaler = make_scaler(settings.train.amp, dist.device)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            accumulated_step(runner, model, batch_l, batch_u, micro_steps=micro_steps,
                             backward=lambda loss: scaler.scale(loss).backward(), criterion_l=criterion,
                             use_memory=True, iteration=0, gather=None, autocast=autocast, recipe=recipe)
            scaler.step(optimizer)
            scaler.update()

        step()
        return timed(dist.device, step)

    return one_step


def _what_fits(settings: TrainSettings) -> str:
    return (f"--amp bf16 (now {settings.train.amp}), a smaller --crop (now {settings.data.crop}), or a smaller "
            f"train.group_size (now {settings.train.group_size or 'the whole batch'}) with a proportionally smaller "
            "--batch-size")


def _accumulation(settings: TrainSettings, dist: D.DistInfo, loaders, num_classes: int) -> int:
    """The run's micro-steps: as set, or `auto` (1 on CPU; on CUDA measured, engine/training/memory_plan.py)."""
    wanted = settings.train.accumulation_steps
    if wanted != "auto":
        return wanted
    if dist.device.type != "cuda":
        return 1
    one_step = _measured_step(settings, dist, loaders, num_classes)
    chosen, _ = choose_micro_steps(loaders.groups.count, lambda n: measure(dist.device, n, one_step),
                                   device_capacity(dist.device), settings.train.memory_fraction,
                                   what_fits=_what_fits(settings))
    return chosen


@dataclass
class RunPlan:
    """What `train --dry-run` measured: one step per candidate micro-step count, the count `auto`
    picks (None: none fits), and the projected training time at that count."""

    device: str
    groups: int
    measures: list[StepMeasure]
    chosen: int | None
    capacity_bytes: float
    total_iterations: int
    projected_seconds: float | None
    problem: str | None = None


def plan_run(settings: TrainSettings, build_missing: DatasetBuilder | None = None) -> RunPlan:
    """`allspark train --dry-run`: the run's model and first batch on its device, one measured step
    per candidate micro-step count. Nothing goes into runs/; `build_missing` builds a missing
    dataset first, as the run itself would (the demo presets)."""
    dist = D.init_distributed(settings.train.device)
    try:
        groups = process_groups(settings, dist.world_size)
        manifest = open_dataset(settings, dist, build_missing=build_missing)
        loaders = build_loaders(settings, manifest, dist, groups)
        one_step = _measured_step(settings, dist, loaders, manifest.num_classes)
        measures = [measure(dist.device, n, one_step) for n in candidate_micro_steps(groups.count)]
        capacity = device_capacity(dist.device)
        fitting = [m for m in measures if m.peak_bytes <= settings.train.memory_fraction * capacity]
        chosen = (1 if dist.device.type != "cuda" else fitting[0].micro_steps) if fitting else None
        total = settings.train.epochs * loaders.iterations_per_epoch
        seconds = next((m.seconds for m in measures if m.micro_steps == chosen), None)
        problem = None if chosen is not None else f"no micro-step count fits; what would fit: {_what_fits(settings)}"
        return RunPlan(str(dist.device), groups.count, measures, chosen, capacity, total,
                       None if seconds is None else seconds * total, problem)
    finally:
        D.shutdown_distributed(dist)


def train(
    settings: TrainSettings,
    *,
    resume: str | Path | None = None,
    force: bool = False,
    reporter: TrainReporter | None = None,
    build_missing: DatasetBuilder | None = None,
) -> RunResult:
    """Trains (or, with `resume` = a run's last.pt, continues) the run described by `settings`.

    Raises SettingsError / DataError / EnvError before anything is written when the settings,
    data or device do not fit; ResourceError on CUDA OOM; Interrupted after saving on Ctrl-C/SIGTERM.
    `build_missing` builds the dataset when its manifest does not exist yet (the demo presets).
    """
    dist = D.init_distributed(settings.train.device)
    try:
        return _train(settings, dist, Path(resume) if resume else None, force, reporter, build_missing)
    finally:
        D.shutdown_distributed(dist)


def _train(settings, dist: D.DistInfo, resume: Path | None, force: bool, reporter, build_missing) -> RunResult:
    main = dist.rank == 0
    reporter = reporter if main else None
    check_amp(settings.train.amp, dist.device)
    configure_cuda_math(tf32=settings.train.tf32, cudnn_benchmark=settings.train.cudnn_benchmark)
    wanted(settings.run.tensorboard)  # `on` without the package is refused before any work
    groups = process_groups(settings, dist.world_size)  # so is a group size that does not divide the batch
    if settings.train.accumulation_steps != "auto":
        check_accumulation(settings.train.accumulation_steps, groups.count)
    # Data: checked before any compute; the loaders' order is a function of (seed, epoch). A resume
    # trains on the dataset its run started on, or on none.
    resumed_dir = run_dir_of_checkpoint(resume) if resume else None
    if resumed_dir is not None and not manifest_path(settings).is_file():
        raise DataError(f"--resume: the dataset of run {resumed_dir} is missing: {manifest_path(settings)}; "
                        "move it back, or pass --data with its new place")
    manifest = open_dataset(settings, dist, notify=reporter.message if reporter is not None else None,
                            build_missing=None if resume else build_missing)
    settings = with_dataset_defaults(settings, manifest)  # the split and crop a run leaves to its dataset
    fingerprint = take_fingerprint(manifest, manifest_path(settings).resolve())
    dataset_notes = _check_same_dataset(resumed_dir, fingerprint, settings, force) if resumed_dir else []
    # In-run evaluation reads the live settings as eval reads a checkpoint's: one rule for both.
    protocol = resolve_protocol(manifest, run=SavedRecipe.from_settings(settings.to_dict()))
    settings = _resolved(settings, protocol)
    loaders = build_loaders(settings, manifest, dist, groups)
    micro_steps = _accumulation(settings, dist, loaders, manifest.num_classes)
    settings = settings.model_copy(update={"train": settings.train.model_copy(update={"accumulation_steps": micro_steps})})
    val_set = eval_dataset(settings, manifest)
    checkpoint = read_checkpoint(resume) if resume else None
    resume_changes: list[str] = []
    if checkpoint is not None:
        check_resumable(checkpoint.train_state, checkpoint=str(resume), world_size=dist.world_size,
                        batch_size=settings.train.batch_size, force=force)
        resume_changes = check_unchanged(checkpoint.settings, settings.to_dict(), checkpoint=str(resume), force=force)
        if checkpoint.class_names and list(checkpoint.class_names) != list(manifest.classes):
            raise DataError(f"--resume: {manifest_path(settings)} has the classes {list(manifest.classes)}, the run "
                            f"was trained on {list(checkpoint.class_names)}; point --data at the run's dataset")
    # Model, parameter groups, scheduler.
    notes: list[str] = []
    segmentor = _build_model(settings, manifest.num_classes, dist, notes)
    attention = _settle_attention(segmentor, settings, loaders.groups, micro_steps)
    semi = loaders.unlabeled is not None
    # Copied before TrainForward hooks the student's parameters; loaded below on a resume.
    teacher = EmaTeacher(segmentor, settings.train.teacher_momentum) if semi and settings.train.teacher_momentum else None
    runner: nn.Module = TrainForward(segmentor)
    if dist.is_distributed:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        # Buffers are not broadcast: the memory is kept identical by gathering, BN stats per rank.
        runner = DistributedDataParallel(runner, device_ids=device_ids, broadcast_buffers=False)
    optimizer = _optimizer(segmentor, settings)
    scaler = make_scaler(settings.train.amp, dist.device)
    autocast = autocast_factory(settings.train.amp, dist.device)
    criterion_l = build_criterion(settings.train.loss, ohem_thresh=settings.train.ohem_thresh,
                                  ohem_min_kept=settings.train.ohem_min_kept, ignore_index=manifest.ignore_index)
    per_epoch = loaders.iterations_per_epoch
    total_iterations = settings.train.epochs * per_epoch
    gather = D.all_gather_cat if dist.is_distributed else None
    weak_to_strong = settings.train.recipe == "weak-to-strong"
    alignment = (DistributionAlignment(manifest.num_classes, dist.device, manifest.ignore_index)
                 if semi and weak_to_strong and settings.train.distribution_alignment else None)
    # Explicit resume.
    state = TrainState()
    if checkpoint is not None:
        segmentor.load_state_dict(checkpoint.state_dict)
        saved = checkpoint.train_state
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        state = TrainState.from_checkpoint(saved)
        # A run resumed with --force after turning either on starts it from here (the student's weights).
        if alignment is not None and saved.get("alignment") is not None:
            alignment.load_state_dict(saved["alignment"])
        if teacher is not None:
            teacher.load_state_dict(saved.get("teacher") or checkpoint.state_dict)
        if saved.get("rng") is not None and dist.rank == 0:
            restore_rng(saved["rng"])
        else:  # only rank 0's RNG is saved; the others get a fresh, position-dependent seed
            torch.manual_seed(settings.train.seed + dist.rank + state.iteration)
        if state.epoch >= settings.train.epochs:
            raise SettingsError(f"--resume: the run already reached epoch {state.epoch} of {settings.train.epochs}")
        run_dir = run_dir_of_checkpoint(resume)
        state.saved_iteration = state.iteration
    else:
        torch.manual_seed(settings.train.seed + dist.rank)  # dropout differs across ranks
        run_dir = run_dir_for(Path(settings.run.root).expanduser(), run_group_of(settings), settings.run.name,
                              settings.run.exist_ok) if main else NO_RUN
        run_dir = Path(D.broadcast_object(str(run_dir)))  # rank 0 picks the auto-numbered name
    run_folder = RunFolder(run_dir)
    # The outermost folder this run creates (runs/<preset>/<name> may all be new): removed again
    # when the run fails before its first checkpoint.
    created = None
    if main and not run_dir.exists():
        created = run_dir
        while not created.parent.exists():
            created = created.parent
    cleared = 0
    if main:
        if checkpoint is None and created is None:  # a new run in an existing folder (--exist-ok)
            cleared = run_folder.clear()
        run_folder.create(config_text=dump_settings_yaml(settings),
                          env=environment_info(device=dist.device, world_size=dist.world_size, seed=settings.train.seed))
        write_fingerprint(run_folder.path, fingerprint)
        # A resumed run drops the steps it redoes; a run started again in its folder (killed before
        # its first save, or --exist-ok) drops all the old ones.
        run_folder.truncate_metrics(state.iteration)
        if cleared:
            run_folder.log(f"started anew in {run_folder.path}: removed {cleared} files of the run before")
        if checkpoint is not None:
            run_folder.log(f"resumed from {resume} at iteration {state.iteration}")
            for change in resume_changes:
                run_folder.log(f"note: resumed with a changed setting (--force): {change}")
            for note in dataset_notes:
                run_folder.log(f"note: {note}")
    D.barrier()
    banner = start_info(settings, run_folder.path, dist, loaders, state.iteration, notes, attention=attention)
    if main:
        run_folder.log(format_start(banner))
        for note in notes:
            run_folder.log(f"note: {note}")
    if reporter is not None:
        reporter.start(banner)

    def save(path: Path, *, finished: bool = False) -> None:
        if not main:
            return
        train_state = {**state.stored(), "finished": finished, "epochs": settings.train.epochs,
                       "world_size": dist.world_size, "batch_size": settings.train.batch_size,
                       "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": capture_rng(),
                       "alignment": alignment.state_dict() if alignment is not None else None,
                       "teacher": teacher.state_dict() if teacher is not None else None}
        save_checkpoint(path, segmentor, class_names=manifest.classes, palette=manifest.palette,
                        settings=settings.to_dict(), settings_version=SETTINGS_VERSION, train_state=train_state)
        if path == run_folder.last:
            state.saved_iteration = state.iteration  # named by the non-finite-loss error

    stop = StopRequest()
    tensorboard = open_log(settings.run.tensorboard, run_folder.path, main)
    collapse = CollapseMonitor(list(manifest.classes), settings.train.collapse_window, total_iterations,
                               collapse_remedy(weak_to_strong)) if main and semi else None
    loop = EpochLoop(settings, dist, runner, segmentor, optimizer, scaler, autocast, criterion_l, gather, loaders,
                     run_folder, reporter, state, stop, save, total_iterations, tensorboard,
                     class_names=list(manifest.classes) if semi else [], collapse=collapse, alignment=alignment,
                     teacher=teacher)
    try:
        with stop.installed():
            for epoch in range(state.epoch, settings.train.epochs):
                start_batch = state.batch if epoch == state.epoch else 0
                epoch_losses, lr = train_epoch(loop, epoch, start_batch)
                state.epoch, state.batch = epoch + 1, 0
                last_epoch = epoch + 1 == settings.train.epochs
                if (epoch + 1) % settings.eval.every == 0 or last_epoch:
                    result = evaluate_epoch(segmentor, val_set, settings, protocol, dist, manifest, run_folder, state,
                                            lr=lr, main=main, losses=epoch_losses, tensorboard=tensorboard,
                                            progress=reporter.evaluating if reporter is not None else None)
                    if main and result.improved:  # with its state: resumable if last.pt is ever lost
                        save(run_folder.best, finished=last_epoch)
                    if reporter is not None:
                        reporter.evaluated(EvalInfo(epoch, result.miou, result.pixel_accuracy, state.best_miou,
                                                    state.best_epoch, result.seconds))
                save(run_folder.last, finished=last_epoch)
                stop_now = D.all_reduce_(torch.tensor([float(stop.requested)], device=dist.device))
                if stop_now.item() > 0 and not last_epoch:  # a signal during the evaluation
                    raise Interrupted(f"stopped after epoch {epoch + 1}; resume with "
                                      f"allspark train --resume {run_folder.path}")
    except BaseException as error:
        if created is not None and not run_folder.last.exists():  # failed before its first checkpoint
            shutil.rmtree(created, ignore_errors=True)
        if isinstance(error, torch.OutOfMemoryError):
            raise _oom_error(settings, dist) from None
        raise
    finally:
        if reporter is not None:
            reporter.close()
        if tensorboard is not None:
            tensorboard.close()
    return RunResult(run_dir=run_folder.path, best_miou=state.best_miou, best_epoch=state.best_epoch,
                     last_miou=state.last_miou, epochs_done=state.epoch, iterations=state.iteration,
                     finished=state.epoch >= settings.train.epochs, history=list(state.history), model=segmentor)
