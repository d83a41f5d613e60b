"""`allspark ablate` on a tiny dataset: 2 methods x 2 seeds, interrupted and resumed, and the table's
numbers are the runs' own results."""
from __future__ import annotations

import csv
import json
import os
import signal
import statistics
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from allspark_cli.cli.app import app
from allspark_cli.engine.training import ablate as ablate_module
from allspark_cli.engine.training import epoch as epoch_module
from allspark_cli.model.checkpoint import read_checkpoint
from train_fixtures import make_dataset, tiny_layer

STEPS_PER_RUN = 4  # 2 epochs x (4 unlabeled images / batch 2)
INTERRUPTED_EXIT = 130


@pytest.fixture()
def tiny_preset(tmp_path: Path) -> Path:
    manifest = make_dataset(tmp_path / "data")
    layer = tiny_layer(manifest, tmp_path / "runs", train={"epochs": 2, "warmup_epochs": 1}, eval={"every": 1})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "settings": layer}))
    return path


def _interrupt_on_step(monkeypatch, call: int) -> None:
    real_step, calls = epoch_module.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C or a scheduler's stop would
        return real_step(*args, **kwargs)

    monkeypatch.setattr(epoch_module, "train_step", step)


def test_ablate_resumes_and_tabulates_the_runs(tiny_preset: Path, tmp_path: Path, monkeypatch) -> None:
    command = ["ablate", "--preset", str(tiny_preset), "--methods", "semi,allspark", "--seeds", "2"]
    runner = CliRunner()
    _interrupt_on_step(monkeypatch, STEPS_PER_RUN + 2)  # during the second run
    first = runner.invoke(app, command)
    assert first.exit_code == INTERRUPTED_EXIT, first.output
    monkeypatch.undo()
    folder = tmp_path / "runs" / "tiny" / "ablation"
    runs = folder / "runs" / "tiny"
    assert (runs / "semi-seed0" / ablate_module.RESULT_FILE).is_file()
    stopped = read_checkpoint(runs / "semi-seed1" / "weights" / "last.pt").train_state
    assert not stopped["finished"]

    calls = []
    real_train = ablate_module.train

    def spy(settings, **kwargs):
        calls.append((settings.model.method, settings.train.seed, kwargs.get("resume")))
        return real_train(settings, **kwargs)

    monkeypatch.setattr(ablate_module, "train", spy)
    second = runner.invoke(app, command)
    assert second.exit_code == 0, second.output
    # The finished run is not trained again; the interrupted one resumes from its last.pt.
    assert [(m, s) for m, s, _ in calls] == [("semi", 1), ("allspark", 0), ("allspark", 1)]
    assert calls[0][2] == runs / "semi-seed1" / "weights" / "last.pt" and calls[1][2] is None

    with (folder / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["method"], r["seed"]) for r in rows) == [("allspark", "0"), ("allspark", "1"), ("semi", "0"),
                                                             ("semi", "1")]
    summary = json.loads((folder / "summary.json").read_text())
    for row in rows:  # each run's best mIoU is what its own training recorded in its results.csv
        with (Path(row["run_dir"]) / "results.csv").open() as handle:
            recorded = max(float(r["miou"]) for r in csv.DictReader(handle))
        assert float(row["best_miou"]) == pytest.approx(recorded, abs=1e-3)
    for method in summary["methods"]:
        mine = [float(r["best_miou"]) for r in rows if r["method"] == method["method"]]
        assert method["mean"] == pytest.approx(statistics.fmean(mine), abs=1e-3)
        assert method["std"] == pytest.approx(statistics.stdev(mine), abs=1e-3)
        assert len(method["class_iou"]) == 3
    assert (folder / "ablation.png").stat().st_size > 0
    table = (folder / "table.md").read_text()
    assert "| semi |" in table and "± " in table and "square" in table
    # The recipe above the table, and each class's final pseudo-label share beside its IoU: the
    # mean over the last epoch's logged iterations of the run's own metrics.jsonl.
    assert "Recipe of the semi-supervised methods: reference (mean" in table
    for row in rows:
        records = [json.loads(line) for line in (Path(row["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in records if r["epoch"] == records[-1]["epoch"]]
        expected = statistics.fmean(r["pseudo_class_share"][1] for r in last)
        assert float(row["pseudo_share_square"]) == pytest.approx(expected, abs=1e-3)
    semi_square = statistics.fmean(float(r["pseudo_share_square"]) for r in rows if r["method"] == "semi")
    assert f"({semi_square:.1f})" in table.split("| semi |")[1].split("\n")[0]
    assert "semi" in second.output and "allspark" in second.output  # the table on the terminal


def test_ablate_refuses_an_unknown_method(tiny_preset: Path) -> None:
    result = CliRunner().invoke(app, ["ablate", "--preset", str(tiny_preset), "--methods", "semi,fancy"])
    assert result.exit_code == 2
    assert "--methods" in result.output and "fancy" in result.output
