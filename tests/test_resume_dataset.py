"""A resume (and an eval of a run's checkpoint) never trains or scores on other data than the
run's: a moved, swapped or re-split dataset is refused in one line (exit 3), the demo builder never
writes into a path a user gave, and a dataset that merely moved resumes from its new place."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from train_fixtures import make_dataset, stop_training_at, tiny_layer
from typer.testing import CliRunner

from allspark_cli.cli.app import app
from allspark_cli.data.fingerprint import FINGERPRINT_FILE, read_fingerprint
from allspark_cli.engine.settings_layers import build_settings
from allspark_cli.engine.training.train import train
from allspark_cli.errors import Interrupted
from allspark_cli.model.checkpoint import read_checkpoint

runner = CliRunner()
DATA_ERROR_EXIT = 3
STOPPED_AT = 3  # the stop arrives during the step of iteration 2 (0-based): last.pt holds 3 steps


def _stopped_run(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """(run folder, dataset folder) of a run stopped after its first of two epochs."""
    data = tmp_path / "mine"
    make_dataset(data)
    layer = tiny_layer(data / "dataset.yaml", tmp_path / "runs", train={"epochs": 2}, eval={"every": 2})
    stop_training_at(monkeypatch, 2)
    with pytest.raises(Interrupted):
        train(build_settings(base=layer))
    monkeypatch.undo()
    return tmp_path / "runs" / "tiny" / "exp", data


def _resume(*args: str):
    return runner.invoke(app, ["train", "--resume", *args])


def test_a_run_records_its_dataset(tmp_path: Path, monkeypatch) -> None:
    run, data = _stopped_run(tmp_path, monkeypatch)
    recorded = read_fingerprint(run)
    assert recorded.classes == ["background", "square", "disc"] and recorded.name == "tiny"
    assert recorded.lists["train:half:labeled"].entries == 4 and recorded.lists["eval:val"].entries == 3
    assert recorded.manifest == str((data / "dataset.yaml").resolve())


def test_resume_onto_a_moved_dataset_is_refused_and_builds_nothing(tmp_path: Path, monkeypatch) -> None:
    run, data = _stopped_run(tmp_path, monkeypatch)
    moved = tmp_path / "elsewhere"
    shutil.move(data, moved)
    result = _resume(str(run))
    assert result.exit_code == DATA_ERROR_EXIT, result.output
    assert "dataset of run" in result.output and str(data / "dataset.yaml") in result.output
    assert "Traceback" not in result.output
    assert not data.exists()  # no demo (or anything else) written at the recorded path
    assert read_checkpoint(run / "weights" / "last.pt").train_state["iteration"] == STOPPED_AT
    # Pointed at its new place, the same dataset resumes.
    result = _resume(str(run), "--data", str(moved))
    assert result.exit_code == 0, result.output
    assert read_checkpoint(run / "weights" / "last.pt").train_state["finished"]
    assert read_fingerprint(run).manifest == str((moved / "dataset.yaml").resolve())


@pytest.mark.parametrize("swap", ["other classes", "other split list"])
def test_resume_onto_a_swapped_dataset_is_refused_unless_forced(tmp_path: Path, monkeypatch, swap: str) -> None:
    run, data = _stopped_run(tmp_path, monkeypatch)
    if swap == "other classes":
        text = (data / "dataset.yaml").read_text().replace("disc]", "circle]")
        (data / "dataset.yaml").write_text(text)
    else:
        unlabeled = data / "splits" / "half" / "unlabeled.txt"
        unlabeled.write_text("".join(unlabeled.read_text().splitlines(keepends=True)[:2]) * 2)
    result = _resume(str(run))
    assert result.exit_code == DATA_ERROR_EXIT, result.output
    assert "is not the dataset run" in result.output and "--force" in result.output
    assert read_checkpoint(run / "weights" / "last.pt").train_state["iteration"] == STOPPED_AT
    if swap == "other split list":  # a deliberate change goes on with --force, and the log says so
        result = _resume(str(run), "--force")
        assert result.exit_code == 0, result.output
        assert "resumed on another dataset (--force)" in (run / "train.log").read_text()


def test_the_demo_builder_never_writes_into_a_user_path(tmp_path: Path, monkeypatch) -> None:
    built = []
    monkeypatch.setattr("data_tools.demo.build_demo", lambda out, **kwargs: built.append(out))
    result = runner.invoke(app, ["train", "--preset", "demo-1/16", "--data", str(tmp_path / "mine"),
                                 "--epochs", "1"])
    assert result.exit_code == DATA_ERROR_EXIT, result.output
    assert "dataset manifest not found" in result.output
    assert built == [] and not (tmp_path / "mine").exists()


def test_eval_of_a_run_refuses_a_swapped_dataset(tmp_path: Path) -> None:
    data = tmp_path / "mine"
    make_dataset(data)
    done = train(build_settings(base=tiny_layer(data / "dataset.yaml", tmp_path / "runs")))
    assert (done.run_dir / FINGERPRINT_FILE).is_file()
    (data / "splits" / "val.txt").write_text((data / "splits" / "val.txt").read_text().splitlines()[0] + "\n")
    result = runner.invoke(app, ["eval", str(done.run_dir / "weights" / "best.pt")])
    assert result.exit_code == DATA_ERROR_EXIT, result.output
    assert "is not the dataset" in result.output and "--data" in result.output
    assert not (done.run_dir / "eval").exists()
    # Named on purpose with --data, the same dataset is evaluated.
    result = runner.invoke(app, ["eval", str(done.run_dir / "weights" / "best.pt"), "--data", str(data)])
    assert result.exit_code == 0, result.output
