"""Faults around saves and resumes: a write that fails mid-checkpoint (disk
full, permission lost), an unreadable last.pt, and a resume with changed settings. Each ends with one
line and its exit code, and what was on disk before stays readable."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from train_fixtures import make_dataset, stop_training_at, tiny_layer
from typer.testing import CliRunner

from allspark_cli.cli.app import app
from allspark_cli.engine.settings_layers import build_settings
from allspark_cli.engine.training.train import train
from allspark_cli.errors import Interrupted, WriteError
from allspark_cli.model import checkpoint as checkpoint_module
from allspark_cli.model.checkpoint import read_checkpoint, save_torch_file

runner = CliRunner()
SETTINGS_EXIT, DATA_EXIT, WRITE_EXIT = 2, 3, 6
EPOCHS = 3
STOP_AT_ITERATION = 3  # the last batch of epoch 2: last.pt at iteration 4, best.pt from an evaluation before


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def stopped_run(manifest: Path, tmp_path: Path, monkeypatch) -> Path:
    """A 3-epoch run stopped (SIGTERM, as a scheduler) in epoch 2: last.pt and best.pt both exist."""
    stop_training_at(monkeypatch, STOP_AT_ITERATION)
    layer = tiny_layer(manifest, tmp_path / "runs", train={"epochs": EPOCHS}, run={"name": "stopped"})
    with pytest.raises(Interrupted):
        train(build_settings(base=layer))
    monkeypatch.undo()
    return tmp_path / "runs" / "tiny" / "stopped"


def _files(run: Path) -> dict[str, bytes]:
    return {name: (run / "weights" / name).read_bytes() for name in ("last.pt", "best.pt")}


class _FillingHandle:
    """A file handle on a disk that fills up (or loses its permission) after `limit` bytes."""

    def __init__(self, handle, limit: int, error_number: int) -> None:
        self.handle, self.limit, self.error_number, self.written = handle, limit, error_number, 0

    def write(self, data: bytes) -> int:
        self.written += len(data)
        if self.written > self.limit:
            raise OSError(self.error_number, os.strerror(self.error_number))
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def _fail_writes_after(monkeypatch, limit: int, error_number: int) -> None:
    """Every checkpoint write fails once `limit` bytes of it are written."""
    real_init = checkpoint_module._ErrorKeepingWriter.__init__

    def init(self, handle) -> None:
        real_init(self, _FillingHandle(handle, limit, error_number))

    monkeypatch.setattr(checkpoint_module._ErrorKeepingWriter, "__init__", init)


def test_a_failed_save_names_the_path_and_the_cause_and_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "last.pt"
    save_torch_file(target, {"weights": torch.arange(10.0)})
    before = target.read_bytes()
    _fail_writes_after(monkeypatch, 1000, errno.ENOSPC)
    with pytest.raises(WriteError, match=rf"could not write {target}: No space left on device"):
        save_torch_file(target, {"weights": torch.zeros(100_000)})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


@pytest.mark.parametrize("error_number", [errno.ENOSPC, errno.EACCES])
def test_a_resumed_run_whose_saves_fail_exits_6_with_last_and_best_intact(stopped_run: Path, monkeypatch,
                                                                           error_number: int) -> None:
    before = _files(stopped_run)
    _fail_writes_after(monkeypatch, 4096, error_number)
    result = runner.invoke(app, ["train", "--resume", str(stopped_run)])
    assert result.exit_code == WRITE_EXIT, result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("Error: could not write ") and "weights" in message
    assert os.strerror(error_number) in message and "Traceback" not in result.output
    assert _files(stopped_run) == before
    assert read_checkpoint(stopped_run / "weights" / "last.pt").train_state["iteration"] == STOP_AT_ITERATION + 1


def test_a_full_disk_outside_checkpoints_is_a_write_error_too(stopped_run: Path, monkeypatch) -> None:
    """A log line or metrics record that hits a full disk: exit 6, not an internal error."""
    from allspark_cli.engine.training.rundir import RunFolder

    def full(self, line: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path / "train.log"))

    monkeypatch.setattr(RunFolder, "log", full)
    result = runner.invoke(app, ["train", "--resume", str(stopped_run)])
    assert result.exit_code == WRITE_EXIT, result.output
    assert "could not write" in result.output and "train.log: No space left on device" in result.output


def test_an_unreadable_last_pt_offers_best_pt_which_resumes(stopped_run: Path) -> None:
    last, best = stopped_run / "weights" / "last.pt", stopped_run / "weights" / "best.pt"
    best_state = read_checkpoint(best).train_state
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated, e.g. by a copy
    result = runner.invoke(app, ["train", "--resume", str(stopped_run)])
    assert result.exit_code == DATA_EXIT and "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert str(last) in message and f"allspark train --resume {best}" in message
    assert f"epoch {best_state['epoch']}, iteration {best_state['iteration']}" in message
    resumed = runner.invoke(app, ["train", "--resume", str(best)])
    assert resumed.exit_code == 0, resumed.output
    assert read_checkpoint(last).train_state["finished"]


def test_an_unreadable_last_pt_without_a_fallback_says_how_to_start_again(stopped_run: Path) -> None:
    (stopped_run / "weights" / "best.pt").unlink()
    (stopped_run / "weights" / "last.pt").write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["train", "--resume", str(stopped_run)])
    assert result.exit_code == DATA_EXIT
    assert "no other save is kept; delete it and run --resume again" in " ".join(result.output.split())


def test_changed_settings_on_resume_are_listed_and_refused_unless_forced(stopped_run: Path) -> None:
    refused = runner.invoke(app, ["train", "--resume", str(stopped_run), "--epochs", "5", "--lr", "0.02"])
    assert refused.exit_code == SETTINGS_EXIT
    message = " ".join(refused.output.split())
    assert "optim.lr: 0.01 -> 0.02" in message and "train.epochs: 3 -> 5" in message and "--force" in message
    assert read_checkpoint(stopped_run / "weights" / "last.pt").train_state["iteration"] == STOP_AT_ITERATION + 1
    # Settings that only change reporting apply without --force; the forced change is logged.
    forced = runner.invoke(app, ["train", "--resume", str(stopped_run), "--workers", "0",
                                 "--set", "train.log_every=5", "--lr", "0.02", "--force"])
    assert forced.exit_code == 0, forced.output
    log = (stopped_run / "train.log").read_text()
    assert "resumed with a changed setting (--force): optim.lr: 0.01 -> 0.02" in log
    assert "train.log_every" not in log.split("resumed from")[-1].split("\n")[1]


def test_predict_outputs_on_a_full_disk_exit_6_and_keep_the_finished_ones(stopped_run: Path, tmp_path: Path,
                                                                           monkeypatch) -> None:
    import cv2
    import numpy as np

    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(4):
        cv2.imwrite(str(photos / f"{index}.png"), np.full((64, 64, 3), 40 * index, np.uint8))
    real_write_bytes, writes = Path.write_bytes, []

    def write_bytes(self: Path, data: bytes) -> int:
        writes.append(self)
        if len(writes) > 2:  # the disk fills up at the third output
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(stopped_run / "weights" / "best.pt"), str(photos), "--out", str(out),
                                 "--save", "mask"])
    assert result.exit_code == WRITE_EXIT, result.output
    assert "could not write" in result.output and "No space left on device" in result.output
    kept = sorted(p.name for p in (out / "masks").iterdir())
    assert kept == ["0.png", "1.png"]  # whole files only, no temporary left
    monkeypatch.undo()
    rerun = runner.invoke(app, ["predict", str(stopped_run / "weights" / "best.pt"), str(photos), "--out", str(out),
                                "--save", "mask"])
    assert rerun.exit_code == 0 and "2 already done" in rerun.output
