"""The run folder: `<run.root>/<group>/<name>/` and everything training writes into it.

The group (`run_group`) names the recipe and the dataset: a preset on its own dataset keeps the
preset's name (`runs/pascal-1_8`), any other run is named after its dataset and split
(`runs/mine-1_8`), followed by the preset that gave the recipe (`runs/mine-1_8-demo-1_16`).

Layout: `config.yaml` (resolved settings), `env.json` (versions, device, world size, seed, git
commit), `train.log` (plain log lines), `metrics.jsonl` (one JSON object per log step),
`results.csv` (one row per evaluation), `dataset.json` (the dataset's fingerprint),
`weights/last.pt` and `weights/best.pt`, `plots/results.png` and `plots/val_mosaic.png`,
`tensorboard/` events. Names are auto-numbered `exp`, `exp2`, ... unless given (engine/output_folders.py). Only rank 0
writes; every whole-file write is atomic; the logs are appended line by line. A run started anew
in an existing folder (`--exist-ok`) first removes these files of the run before it (`clear`),
and nothing else: files of your own in the folder stay.
"""
from __future__ import annotations

import csv
import io
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from allspark_cli.constants import WEIGHTS_DIR
from allspark_cli.data.fingerprint import FINGERPRINT_FILE
from allspark_cli.engine.training.tensorboard import TENSORBOARD_DIR
from allspark_cli.errors import SettingsError, WriteError
from allspark_cli.fileio import atomic_write_text, remove_stale_temps

CONFIG_FILE = "config.yaml"
ENV_FILE = "env.json"
LOG_FILE = "train.log"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.csv"
PLOTS_DIR = "plots"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
RESULTS_PLOT = "results.png"
MOSAIC_PLOT = "val_mosaic.png"
TENSORBOARD_EVENTS = "events.out.tfevents.*"  # the files TensorBoard's SummaryWriter writes
RESULTS_COLUMNS = ("epoch", "iteration", "lr", "loss_x", "loss_u", "miou", "pixel_accuracy")
GIT_TIMEOUT_S = 5  # a hung git (network file systems) must not block training


def _folder_name(text: str) -> str:
    """`pascal-1/8` -> `pascal-1_8`: one folder name (split and preset names hold slashes)."""
    return text.replace("/", "_").replace("\\", "_")


def run_group(preset: str | None, dataset: str, split: str) -> str:
    """The folder under run.root for a run of `preset` (None: no preset) on the dataset named
    `dataset` (its manifest's name), training split `split` (see the module docstring). A preset's
    own dataset is the one its name starts with: `pascal` for pascal-aug-1/16, `demo` for demo-1/16."""
    data = _folder_name(f"{dataset}-{split}")
    if preset is None:
        return data
    if preset == dataset or preset.startswith(f"{dataset}-"):
        return _folder_name(preset)
    return f"{data}-{_folder_name(preset)}"


def _record(line: str) -> dict[str, Any] | None:
    """One metrics.jsonl record; None for a blank line or the partial last line of a killed run."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_DIR).is_dir()


def checkpoint_to_resume(path: str | Path) -> Path:
    """`RUN_DIR` or `RUN_DIR/weights/last.pt` -> the last.pt to resume; SettingsError otherwise."""
    path = Path(path)
    if path.is_dir():
        candidate = path / WEIGHTS_DIR / LAST_CHECKPOINT
        if not is_run_dir(path) or not candidate.is_file():
            raise SettingsError(f"{path} is not a training run folder (expected {CONFIG_FILE} and {WEIGHTS_DIR}/{LAST_CHECKPOINT})")
        return candidate
    if not path.is_file():
        raise SettingsError(f"--resume: {path} does not exist")
    return path


def run_dir_of_checkpoint(checkpoint: Path) -> Path:
    """The run folder a `weights/last.pt` belongs to; SettingsError when it is not inside a run."""
    run_dir = checkpoint.resolve().parent.parent
    if checkpoint.resolve().parent.name != WEIGHTS_DIR or not is_run_dir(run_dir):
        raise SettingsError(f"{checkpoint} is not inside a run folder (RUN_DIR/{WEIGHTS_DIR}/{LAST_CHECKPOINT})")
    return run_dir


def git_commit(cwd: Path | None = None) -> str | None:
    """The checked-out commit of the source tree, or None (no git, not a repository, timeout)."""
    folder = cwd or Path(__file__).resolve().parent
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def environment_info(*, device: torch.device, world_size: int, seed: int) -> dict[str, Any]:
    """What env.json records: versions, device, world size, seed and the git commit."""
    import numpy
    import timm

    from allspark_cli import __version__

    return {
        "allspark": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "world_size": world_size,
        "threads": torch.get_num_threads(),
        "seed": seed,
        "git_commit": git_commit(),
        "argv": sys.argv,
    }


class RunFolder:
    """Writes the files of one run folder (use only on rank 0)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.weights = self.path / WEIGHTS_DIR
        self.plots = self.path / PLOTS_DIR
        self.last = self.weights / LAST_CHECKPOINT
        self.best = self.weights / BEST_CHECKPOINT

    def previous_run_files(self) -> list[Path]:
        """The files a run wrote here (those this module names), nothing else."""
        names = [CONFIG_FILE, ENV_FILE, LOG_FILE, METRICS_FILE, RESULTS_FILE, FINGERPRINT_FILE]
        files = [self.path / name for name in names]
        files += [self.last, self.best, self.plots / RESULTS_PLOT, self.plots / MOSAIC_PLOT]
        files += sorted((self.path / TENSORBOARD_DIR).glob(TENSORBOARD_EVENTS))
        return [path for path in files if path.is_file()]

    def clear(self) -> int:
        """Removes the files of an earlier run in this folder (`previous_run_files`), so a run
        started anew here (--exist-ok) never mixes its logs, results, events or weights with the
        old ones; returns how many were removed."""
        removed = self.previous_run_files()
        for path in removed:
            try:
                path.unlink()
            except OSError as error:
                raise WriteError(f"could not remove {path} of the earlier run: {error.strerror or error}") from None
        return len(removed)

    def create(self, *, config_text: str, env: dict[str, Any]) -> None:
        """Makes the folders and writes config.yaml and env.json; removes the half-written checkpoint
        of a killed predecessor (its temporary file: last.pt/best.pt themselves are always whole)."""
        self.weights.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.weights)
        self.plots.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / CONFIG_FILE, config_text)
        atomic_write_text(self.path / ENV_FILE, json.dumps(env, indent=2) + "\n")

    def log(self, line: str) -> None:
        with open(self.path / LOG_FILE, "a", encoding="utf-8") as handle:
            handle.write(line.rstrip("\n") + "\n")

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.path / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """The metrics.jsonl records so far (one per logged iteration)."""
        path = self.path / METRICS_FILE
        if not path.is_file():
            return []
        records = (_record(line) for line in path.read_text(encoding="utf-8").splitlines())
        return [record for record in records if record is not None]

    def truncate_metrics(self, after_iteration: int) -> None:
        """Drops metrics.jsonl lines logged after `after_iteration` (steps a resumed run redoes)."""
        path = self.path / METRICS_FILE
        if not path.is_file():
            return
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if _record(line) is not None and _record(line).get("iteration", 0) <= after_iteration]
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write_results(self, rows: list[dict[str, Any]]) -> None:
        """Rewrites results.csv from all evaluation rows so far (atomic, so resume never duplicates)."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=RESULTS_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path / RESULTS_FILE, buffer.getvalue())
