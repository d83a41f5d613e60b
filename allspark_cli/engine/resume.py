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

from allspark_cli.errors import SettingsError


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
        raise SettingsError(
            f"{checkpoint}: this run already finished its {train_state.get('epochs', '?')} epochs; "
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


def resume_base(path: str | Path) -> tuple[Path | None, dict[str, Any]]:
    """(last.pt to resume, the run's saved settings) for `--resume RUN_DIR|last.pt`.

    A run folder whose run was killed before its first save (config.yaml, no last.pt) gives
    (None, its config.yaml settings placed in that same folder): the run starts again there.
    SettingsError when the path is not a run folder (or a checkpoint inside one), or the checkpoint
    carries no settings; the saved settings become the lowest layer of the resumed run's settings.
    """
    from allspark_cli.engine.rundir import (
        CONFIG_FILE,
        LAST_CHECKPOINT,
        WEIGHTS_DIR,
        checkpoint_to_resume,
        run_dir_of_checkpoint,
    )
    from allspark_cli.engine.settings import read_settings_file
    from allspark_cli.model.checkpoint import read_checkpoint

    folder = Path(path)
    if folder.is_dir() and (folder / CONFIG_FILE).is_file() and not (folder / WEIGHTS_DIR / LAST_CHECKPOINT).exists():
        settings = read_settings_file(folder / CONFIG_FILE)
        where = {"root": str(folder.resolve().parent.parent), "name": folder.name, "exist_ok": True}
        return None, {**settings, "run": {**settings.get("run", {}), **where}}
    checkpoint_path = checkpoint_to_resume(path)
    run_dir_of_checkpoint(checkpoint_path)
    checkpoint = read_checkpoint(checkpoint_path)
    if not checkpoint.settings or checkpoint.train_state is None:
        raise SettingsError(f"{checkpoint_path} holds no training settings/state; only a run's last.pt can be resumed")
    return checkpoint_path, dict(checkpoint.settings)
