"""Resume: an interrupted + resumed run equals an uninterrupted one; what --resume refuses."""
from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from train_fixtures import make_dataset, stop_training_at, tiny_layer

from allspark_cli.engine.training.resume import capture_rng, restore_rng, resume_base
from allspark_cli.engine.settings_layers import build_settings
from allspark_cli.engine.training.train import train
from allspark_cli.errors import Interrupted, SettingsError
from allspark_cli.model.checkpoint import load_model, read_checkpoint, save_checkpoint

# 4 unlabeled images / global batch 2 = 2 iterations per epoch; the memory is read from epoch 2 on.
EPOCHS = 2
STOP_AFTER_CALL = 3  # mid-epoch 2: one batch of the epoch done, one to go


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tiny"))


def _layer(manifest: Path, root: Path) -> dict:
    # Evaluating only at the end keeps the test fast; the comparison covers the whole schedule.
    return tiny_layer(manifest, root, train={"epochs": EPOCHS, "warmup_epochs": 1}, eval={"every": EPOCHS})


def test_interrupted_and_resumed_equals_uninterrupted(manifest: Path, tmp_path: Path, monkeypatch) -> None:
    reference = train(build_settings(base=_layer(manifest, tmp_path / "a")))

    stop_training_at(monkeypatch, STOP_AFTER_CALL - 1, signal.SIGINT)  # Ctrl-C
    with pytest.raises(Interrupted, match="resume with allspark train --resume"):
        train(build_settings(base=_layer(manifest, tmp_path / "b")))
    monkeypatch.undo()
    run = tmp_path / "b" / "tiny" / "exp"
    stopped = read_checkpoint(run / "weights/last.pt").train_state
    assert (stopped["epoch"], stopped["batch"], stopped["iteration"]) == (1, 1, STOP_AFTER_CALL)

    checkpoint, saved = resume_base(run)
    resumed = train(build_settings(base=saved), resume=checkpoint)
    assert resumed.run_dir == run and resumed.iterations == reference.iterations == EPOCHS * 2
    expected = read_checkpoint(reference.run_dir / "weights/last.pt").state_dict
    got = read_checkpoint(run / "weights/last.pt").state_dict
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name].float(), got[name].float(), atol=1e-5), name
    assert torch.equal(expected["allspark.memory.pointer"], got["allspark.memory.pointer"])
    assert [row["miou"] for row in resumed.history] == pytest.approx([row["miou"] for row in reference.history], abs=1e-4)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == EPOCHS * 2  # the redone steps are not logged twice


def test_resume_refusals(manifest: Path, tmp_path: Path) -> None:
    done = train(build_settings(base=tiny_layer(manifest, tmp_path)))
    checkpoint, saved = resume_base(done.run_dir)
    with pytest.raises(SettingsError, match="already finished"):
        train(build_settings(base=saved), resume=checkpoint)
    content = read_checkpoint(checkpoint)
    save_checkpoint(checkpoint, load_model(checkpoint), class_names=content.class_names, palette=content.palette,
                    settings=content.settings, train_state={**content.train_state, "finished": False})
    with pytest.raises(SettingsError, match="global batch 2.*--force"):
        train(build_settings(base=saved, sets=["train.batch_size=4"]), resume=checkpoint)
    with pytest.raises(SettingsError, match="not a training run folder"):
        resume_base(tmp_path)
    with pytest.raises(SettingsError, match="does not exist"):
        resume_base(tmp_path / "nope.pt")


def test_rng_states_round_trip() -> None:
    state = capture_rng()
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def test_a_run_killed_before_its_first_save_starts_again_in_its_folder(manifest: Path, tmp_path: Path) -> None:
    """kill -9 before the first checkpoint leaves config.yaml without last.pt: `--resume RUN` starts
    the run again from the settings in its folder, in that folder."""
    from typer.testing import CliRunner

    from allspark_cli.cli.app import app

    layer = tiny_layer(manifest, tmp_path / "runs", run={"name": "killed"})
    run = tmp_path / "runs" / "tiny" / "killed"
    (run / "weights").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(layer))
    (run / "metrics.jsonl").write_text('{"iteration": 1, "loss": 9.0}\n')  # the killed run's partial log
    result = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert read_checkpoint(run / "weights" / "last.pt").train_state["finished"]
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir()) == ["killed"]  # no exp2
    assert all(json.loads(line)["loss"] != 9.0 for line in (run / "metrics.jsonl").read_text().splitlines())
