"""`allspark train` on the command line: option paths into the settings, help, presets table, a
real tiny run, and the bad-input table (exit code, message, nothing written)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from allspark_cli.cli.app import app
from allspark_cli.engine.training import events as events_module
from allspark_cli.engine.training import train as engine_train
from allspark_cli.engine.settings import TrainSettings
from allspark_cli.model.checkpoint import save_checkpoint
from allspark_cli.model.config import ModelConfig, build_model
from train_fixtures import CLASSES, PALETTE, make_dataset, tiny_layer

runner = CliRunner()


def _output(result) -> str:
    return result.output + (getattr(result, "stderr", "") if result.stderr_bytes is not None else "")


@pytest.fixture
def received(monkeypatch) -> dict:
    """Replaces the engine's train: records what the CLI passed instead of training."""
    calls: dict = {}

    def fake_train(settings: TrainSettings, *, resume=None, force=False, reporter=None, build_missing=None):
        calls.update(settings=settings, resume=resume, force=force)
        return engine_train.RunResult(run_dir=Path("runs/x/exp"), best_miou=1.0, best_epoch=0, last_miou=1.0,
                                      epochs_done=1, iterations=1, finished=True)

    monkeypatch.setattr(engine_train, "train", fake_train)
    return calls


def test_help_lists_the_options() -> None:
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--preset", "--resume", "--set", "--no-pretrained", "--list-presets"):
        assert option in result.output


def test_list_presets_prints_the_table() -> None:
    result = runner.invoke(app, ["train", "--list-presets"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for fragment in ("pascal-1/16", "pascal-92", "76.07", "cityscapes-1/30", "coco-1/512", "34.10", "demo-1/16", "8+8", "x10"):
        assert fragment in result.output


@pytest.mark.parametrize(
    ("args", "path", "expected"),
    [
        (["--epochs", "3"], "train.epochs", 3),
        (["--batch-size", "4"], "train.batch_size", 4),
        (["--crop", "321"], "data.crop", 321),
        (["--lr", "0.02"], "optim.lr", 0.02),
        (["--backbone", "b2"], "model.backbone", "b2"),
        (["--pretrained", "w/mit.pth"], "model.pretrained", Path("w/mit.pth")),
        (["--no-pretrained"], "model.pretrained", None),
        (["--method", "cca+smem"], "model.method", "cca+smem"),
        (["--amp", "bf16"], "train.amp", "bf16"),
        (["--seed", "7"], "train.seed", 7),
        (["--device", "cpu"], "train.device", "cpu"),
        (["--workers", "0"], "data.workers", 0),
        (["--name", "mine"], "run.name", "mine"),
        (["--data", "elsewhere/dataset.yaml"], "data.manifest", Path("elsewhere/dataset.yaml")),
        (["--exist-ok"], "run.exist_ok", True),
        (["--save-every", "50"], "train.save_every", 50),
        (["--set", "optim.head_lr_multiplier=5", "--set", "train.epochs=2"], "optim.head_lr_multiplier", 5.0),
        ([], "data.split", "183"),
        ([], "model.pretrained", Path("weights/mit_b5.pth")),
    ],
)
def test_options_reach_the_settings(received: dict, args: list[str], path: str, expected) -> None:
    result = runner.invoke(app, ["train", "--preset", "pascal-1/8", *args])
    assert result.exit_code == 0, _output(result)
    value = received["settings"]
    for part in path.split("."):
        value = getattr(value, part)
    assert value == expected
    assert received["settings"].preset == "pascal-1/8"


def test_precedence_on_the_command_line(received: dict, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("train: {epochs: 10, seed: 3, batch_size: 4}\n")
    env = {"ALLSPARK_TRAIN__EPOCHS": "20", "ALLSPARK_TRAIN__SEED": "5"}
    result = runner.invoke(app, ["train", "-p", "pascal-92", "-c", str(config), "--epochs", "30", "-s", "train.seed=9"],
                           env=env)
    assert result.exit_code == 0, _output(result)
    train = received["settings"].train
    assert (train.epochs, train.seed, train.batch_size) == (30, 9, 4)


def test_resume_takes_the_runs_settings(received: dict, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "tiny" / "exp"
    layer = tiny_layer(tmp_path / "d.yaml", tmp_path / "runs")
    settings = TrainSettings.model_validate(layer)
    (run / "weights").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(settings.to_dict()))
    model = build_model(ModelConfig(backbone="b0", method="semi", num_classes=3, head_dim=8))
    save_checkpoint(run / "weights/last.pt", model, class_names=CLASSES, palette=PALETTE, settings=settings.to_dict(),
                    train_state={"finished": False, "iteration": 1})
    result = runner.invoke(app, ["train", "--resume", str(run), "--epochs", "5", "--force"])
    assert result.exit_code == 0, _output(result)
    assert received["resume"] == run / "weights/last.pt" and received["force"]
    assert received["settings"].train.epochs == 5 and received["settings"].data.split == "half"


def test_a_real_tiny_run_through_the_cli(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path / "data")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_layer(manifest, tmp_path / "runs")))
    result = runner.invoke(app, ["train", "--config", str(config), "--name", "cli", "--seed", "1"])
    assert result.exit_code == 0, _output(result)
    assert "best mIoU" in result.output
    assert (tmp_path / "runs" / "tiny" / "cli" / "weights" / "best.pt").is_file()
    assert "iter 2/2" in (tmp_path / "runs" / "tiny" / "cli" / "train.log").read_text()


def _broken_dataset(tmp_path: Path) -> Path:
    manifest = make_dataset(tmp_path / "broken")
    (tmp_path / "broken" / "images" / "train_0.png").unlink()
    return manifest


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["--preset", "pascal-1/9"], 2, "closest: pascal-1/8"),
        (["--preset", "pascal-1/8", "--set", "trian.epochs=1"], 2, "did you mean 'train.epochs'"),
        (["--preset", "pascal-1/8", "--crop", "16"], 2, "data.crop"),
        (["--preset", "pascal-1/8", "--lr", "0"], 2, "optim.lr"),
        (["--preset", "pascal-1/8", "--lr", "-1"], 2, "optim.lr"),
        (["--preset", "pascal-1/8", "--batch-size", "0"], 2, "--batch-size"),
        (["--preset", "pascal-1/8", "--pretrained", "x.pth", "--no-pretrained"], 2, "exclude each other"),
        ([], 2, "nothing to train"),
        (["--resume", "."], 2, "not a training run folder"),
        (["--preset", "pascal-1/8", "--resume", "."], 2, "do not combine"),
        (["--preset", "pascal-1/8"], 3, "dataset manifest not found"),
        (["broken"], 3, "has 1 problem:"),
        (["cuda"], 4, "no CUDA GPU"),
    ],
)
def test_bad_inputs(tmp_path: Path, args: list[str], code: int, fragment: str) -> None:
    if args == ["broken"]:
        args = ["--preset", "demo-1/16", "--data", str(_broken_dataset(tmp_path)), "--set", "data.split=half",
                "--device", "cpu"]
    if args == ["cuda"]:
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        args = ["--preset", "pascal-1/8", "--device", "cuda"]
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == code, _output(result)
    assert fragment in _output(result)
    assert not Path("runs").exists()  # the working folder is the test's own (conftest)


def _strip_escapes(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", text)


def _start_info(**changes) -> events_module.StartInfo:
    fields = dict(
        run_dir=Path("runs/pascal-1_8/exp"), preset="pascal-1/8", method="allspark", backbone="b5", device="cuda:0",
        world_size=4, global_batch=8, per_process_batch=2, group_size=2, lr=0.001, head_lr=0.01, amp="off", epochs=80,
        iterations_per_epoch=100, labeled_images=183, unlabeled_images=10399, start_iteration=0, paper_batch=8,
        paper_lr=0.001, paper_gpus=4, notes=["hello"])
    return events_module.StartInfo(**{**fields, **changes})


def test_rich_reporter_at_80_columns_keeps_the_count_eta_and_status_whole() -> None:
    """The status (losses, lr, mIoU) has its own line, so the bar keeps done/total, elapsed and ETA;
    an in-training evaluation shows its own bar (not a bar frozen at the epoch's end)."""
    import io

    from rich.console import Console

    from allspark_cli.cli.training_display import RichReporter

    stream = io.StringIO()
    reporter = RichReporter(Console(file=stream, force_terminal=True, width=80))
    reporter.start(_start_info())
    reporter.step(events_module.StepInfo(0, 80, 10, 8000, 0.5, 0.6, 0.4, 0.001, 1.0))
    reporter.progress.refresh()
    shown = _strip_escapes(stream.getvalue())
    assert re.search(r"10/8000 +\d:\d\d:\d\d +(-:--:--|\d+:\d\d:\d\d)", shown), shown
    assert "epoch 1/80  loss_x 0.600  loss_u 0.400  lr 1.00e-03  mIoU -" in shown
    reporter.evaluating(3, 12)
    reporter.progress.refresh()
    assert re.search(r"eval .*3/12", _strip_escapes(stream.getvalue()))
    reporter.evaluated(events_module.EvalInfo(0, 42.5, 90.0, 42.5, 0, 3.0))
    assert reporter.progress.tasks == [reporter.progress.tasks[0]]  # the eval bar is gone
    reporter.close()


def test_plain_reporter_writes_the_evaluation_in_quarters() -> None:
    import io

    stream = io.StringIO()
    reporter = events_module.PlainReporter(stream)
    for done in range(1, 13):
        reporter.evaluating(done, 12)
    reporter.evaluated(events_module.EvalInfo(0, 42.5, 90.0, 42.5, 0, 3.0))
    lines = stream.getvalue().splitlines()
    assert lines[:4] == [f"evaluating: {done}/12 validation images" for done in (3, 6, 9, 12)]
    assert lines[4].startswith("epoch 1 eval: mIoU 42.50")


def test_rich_reporter_shows_the_banner_bar_and_miou() -> None:
    import io

    from rich.console import Console

    from allspark_cli.cli.training_display import RichReporter
    from allspark_cli.engine.training import events

    stream = io.StringIO()
    reporter = RichReporter(Console(file=stream, force_terminal=True, width=160))
    reporter.start(events.StartInfo(
        run_dir=Path("runs/pascal-1_8/exp"), preset="pascal-1/8", method="allspark", backbone="b5", device="cuda:0",
        world_size=4, global_batch=8, per_process_batch=2, group_size=2, lr=0.001, head_lr=0.01, amp="off", epochs=80,
        iterations_per_epoch=100, labeled_images=183, unlabeled_images=10399, start_iteration=0, paper_batch=8,
        paper_lr=0.001, paper_gpus=4, notes=["hello"]))
    reporter.step(events.StepInfo(0, 80, 10, 8000, 0.5, 0.6, 0.4, 0.001, 1.0))
    reporter.evaluated(events.EvalInfo(0, 42.5, 90.0, 42.5, 0, 3.0))
    reporter.close()
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", stream.getvalue())  # drop terminal escapes
    assert "[allspark, MiT-B5]" in text and "global batch 8+8 in groups of 2" in text and "paper: 8+8 on 4 GPUs, lr 0.001" in text and "hello" in text
    assert "mIoU 42.50" in text


def test_counts_agree_with_their_nouns() -> None:
    """'1 epoch x 1 iteration', not '1 epochs x 1 iterations' (a one-epoch smoke run)."""
    from allspark_cli.text import plural

    assert [plural(n, "file") for n in (0, 1, 2)] == ["0 files", "1 file", "2 files"]
    assert plural(1, "class", "classes") == "1 class" and plural(3, "class", "classes") == "3 classes"
    banner = events_module.format_start(_start_info(epochs=1, iterations_per_epoch=1))
    assert "1 epoch x 1 iteration;" in banner
    assert "80 epochs x 100 iterations;" in events_module.format_start(_start_info())


def test_list_presets_fits_80_columns_and_the_full_table_stays_available() -> None:
    from allspark_cli.engine.training.presets import list_presets

    names = [preset.info.name for preset in list_presets()]
    compact = CliRunner().invoke(app, ["train", "--list-presets"], env={"COLUMNS": "80"})
    assert compact.exit_code == 0, compact.output
    assert max(len(line) for line in compact.output.splitlines()) <= 80 and "…" not in compact.output
    assert all(name in compact.output.split() for name in names)
    assert "allspark train --list-presets --wide" in compact.output
    wide = CliRunner().invoke(app, ["train", "--list-presets", "--wide"], env={"COLUMNS": "80"})
    assert wide.exit_code == 0 and "…" not in wide.output and "baselines" in wide.output
    assert "sup: batch 16 /4, epochs over the labeled list" in wide.output
