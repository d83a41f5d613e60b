"""Explicit resume: RNG state capture/restore and the compatibility rules of `--resume`.

A resumed run continues as if never stopped: weights, memory and its pointers (model buffers),
optimizer, schedule position (the iteration counter), and the RNG states of torch (CPU and CUDA),
numpy and python `random` come back; the data order is a function of (seed, epoch) and the
augmentation of (seed, epoch, index), so the already-done batches of the epoch are skipped
deterministically. Everything is stored as tensors and plain lists (torch.load weights_only).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from allspark_cli.errors import DataError, SettingsError
from allspark_cli.text import plural


def capture_rng() -> dict[str, Any]:
    """The RNG states of this process as weights_only-loadable values."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng` (CUDA states only when this machine has as many devices)."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
        numpy_state["has_gauss"], numpy_state["cached"],
    ))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def check_resumable(train_state: dict[str, Any] | None, *, checkpoint: str, world_size: int, batch_size: int,
                    force: bool) -> None:
    """Refuses a checkpoint without train state, a finished run, and (without `force`) a change of
    world size or global batch, which would change the data order and the schedule."""
    if not train_state:
        raise SettingsError(f"{checkpoint} holds no training state (only last.pt of a run can be resumed)")
    if train_state.get("finished"):
        epochs = train_state.get("epochs")
        raise SettingsError(
            f"{checkpoint}: this run already finished its {'epochs' if epochs is None else plural(epochs, 'epoch')}; "
            "evaluate it with 'allspark eval', or start a new run (e.g. with more --epochs)"
        )
    saved_world, saved_batch = train_state.get("world_size"), train_state.get("batch_size")
    if force:
        return
    if saved_world != world_size:
        raise SettingsError(
            f"{checkpoint} was trained with {saved_world} process(es), this run has {world_size}; "
            "pass --force to resume anyway (the data order changes)"
        )
    if saved_batch != batch_size:
        raise SettingsError(
            f"{checkpoint} was trained with global batch {saved_batch}, the settings now say {batch_size}; "
            "pass --force to resume anyway"
        )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`key: old -> new` for each setting that differs and would make the resumed run differ from
    an uninterrupted one (everything not marked REPORTING_ONLY in engine/settings.py)."""
    from allspark_cli.engine.settings import ANY_VALUE, reporting_only_settings, unrecorded_settings

    free, unrecorded = reporting_only_settings(), unrecorded_settings()
    before, after = _flatten(saved), _flatten(now)
    changes = []
    for key in sorted(before.keys() | after.keys()):
        if key.startswith(free) or before.get(key) == after.get(key):
            continue
        if key not in before and key in unrecorded and unrecorded[key] in (ANY_VALUE, after.get(key)):
            continue  # a setting the saved run predates, at the value that computes what it computed
        changes.append(f"{key}: {before.get(key, '(unset)')} -> {after.get(key, '(unset)')}")
    return changes


def check_unchanged(saved: dict[str, Any], now: dict[str, Any], *, checkpoint: str, force: bool) -> list[str]:
    """Refuses (without `force`) settings that differ from the checkpoint's; returns the changes."""
    changes = changed_settings(saved, now)
    if changes and not force:
        raise SettingsError(
            f"{checkpoint}: the resumed run would differ from an uninterrupted one ({'; '.join(changes)}); "
            "drop these changes, or pass --force to resume with them"
        )
    return changes


def _read_resumable(checkpoint_path: Path):
    """The checkpoint to resume; an unreadable one is reported with the save to fall back on."""
    from allspark_cli.engine.training.rundir import BEST_CHECKPOINT, LAST_CHECKPOINT
    from allspark_cli.model.checkpoint import read_checkpoint

    try:
        return read_checkpoint(checkpoint_path)
    except DataError as error:
        if checkpoint_path.name != LAST_CHECKPOINT:
            raise
        best = checkpoint_path.parent / BEST_CHECKPOINT
        try:
            fallback = read_checkpoint(best).train_state if best.is_file() else None
        except DataError:
            fallback = None
        if fallback:
            offer = (f"resume from the best evaluation's save instead: allspark train --resume {best} "
                     f"(it continues after epoch {fallback.get('epoch')}, iteration {fallback.get('iteration')}; "
                     "later steps are trained again)")
        elif best.is_file():
            offer = (f"{best} holds the best weights (eval/predict use it) but no training state; delete "
                     f"{checkpoint_path} and run --resume again to start the run anew in its folder")
        else:
            offer = "no other save is kept; delete it and run --resume again to start the run anew in its folder"
        raise DataError(f"{error}; {offer}") from None


def resume_base(path: str | Path) -> tuple[Path | None, dict[str, Any]]:
    """(last.pt to resume, the run's saved settings) for `--resume RUN_DIR|last.pt`.

    A run folder whose run was killed before its first save (config.yaml, no last.pt) gives
    (None, its config.yaml settings placed in that same folder): the run starts again there.
    SettingsError when the path is not a run folder (or a checkpoint inside one), or the checkpoint
    carries no settings; the saved settings become the lowest layer of the resumed run's settings.
    """
    from allspark_cli.engine.training.rundir import (
        CONFIG_FILE,
        LAST_CHECKPOINT,
        WEIGHTS_DIR,
        checkpoint_to_resume,
        run_dir_of_checkpoint,
    )
    from allspark_cli.engine.settings import SETTINGS_VERSION
    from allspark_cli.engine.settings_layers import read_settings_file

    folder = Path(path)
    if folder.is_dir() and (folder / CONFIG_FILE).is_file() and not (folder / WEIGHTS_DIR / LAST_CHECKPOINT).exists():
        settings = read_settings_file(folder / CONFIG_FILE)
        where = {"root": str(folder.resolve().parent.parent), "group": folder.resolve().parent.name,
                 "name": folder.name, "exist_ok": True}
        return None, {**settings, "run": {**settings.get("run", {}), **where}}
    checkpoint_path = checkpoint_to_resume(path)
    run_dir_of_checkpoint(checkpoint_path)
    checkpoint = _read_resumable(checkpoint_path)
    if checkpoint.settings_version > SETTINGS_VERSION:
        raise DataError(f"{checkpoint_path}: its settings (version {checkpoint.settings_version}) are newer than this "
                        f"allspark's (version {SETTINGS_VERSION}); upgrade allspark to resume it")
    if not checkpoint.settings or checkpoint.train_state is None:
        raise SettingsError(f"{checkpoint_path} holds no training settings/state; only a run's last.pt can be resumed")
    return checkpoint_path, dict(checkpoint.settings)
