"""A stop sent to the whole process group (how `timeout`, Slurm, `docker stop` and Kubernetes end a
job) with data-loader workers running: the run saves last.pt at the iteration it reached and exits
130 with its one-line message, no traceback."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from train_fixtures import make_dataset, tiny_layer

from allspark_cli.model.checkpoint import read_checkpoint

INTERRUPTED_EXIT = 130
STARTUP_LIMIT_S = 120
LOGGED_BEFORE_STOP = 3


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_group_stop_with_loader_workers_saves_and_exits_130(tmp_path: Path, stop: signal.Signals) -> None:
    manifest = make_dataset(tmp_path / "data", num_train=40)
    layer = tiny_layer(manifest, tmp_path / "runs", data={"workers": 2}, train={"epochs": 100},
                       eval={"every": 100, "mosaic_images": 0}, run={"name": "stopped"})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(layer))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "allspark_cli", "train", "--config", str(config)], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)  # its own process group, as a scheduler's job
    metrics = tmp_path / "runs" / "tiny" / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= LOGGED_BEFORE_STOP:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()
    os.killpg(process.pid, stop)  # the whole group: the main process and its loader workers
    _, stderr = process.communicate(timeout=STARTUP_LIMIT_S)
    assert process.returncode == INTERRUPTED_EXIT, stderr
    assert "Traceback" not in stderr and "DataLoader worker" not in stderr
    reached = int(re.search(r"stopped at iteration (\d+); resume with", stderr)[1])
    saved = read_checkpoint(metrics.parent / "weights" / "last.pt").train_state
    assert saved["iteration"] == reached >= LOGGED_BEFORE_STOP


PREDICT_IMAGES = 12
PREDICT_SIZE = 160  # large enough that the stop arrives while images remain


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from allspark_cli.engine.settings_layers import build_settings
    from allspark_cli.engine.training.train import train

    root = tmp_path_factory.mktemp("stop")
    manifest = make_dataset(root / "data", num_val=6)
    return train(build_settings(base=tiny_layer(manifest, root / "runs"))).run_dir / "weights" / "best.pt"


def test_predict_stopped_by_its_group_exits_130_and_a_rerun_continues(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import cv2
    import numpy as np

    images = tmp_path / "photos"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(PREDICT_IMAGES):
        cv2.imwrite(str(images / f"{index:02d}.png"), rng.integers(0, 255, (PREDICT_SIZE, PREDICT_SIZE, 3), np.uint8))
    command = [sys.executable, "-m", "allspark_cli", "predict", str(tiny_checkpoint), str(images), "--out",
               str(tmp_path / "out"), "--save", "mask", "--workers", "2", "--batch-size", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    masks = tmp_path / "out" / "masks"
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while time.monotonic() < deadline and process.poll() is None and not (masks.is_dir() and any(masks.iterdir())):
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=STARTUP_LIMIT_S)
    assert process.returncode == INTERRUPTED_EXIT, stderr
    assert "Traceback" not in stderr and "DataLoader worker" not in stderr
    assert "stopping after the current image..." in stderr  # said at once, before the last image ends
    stopped = re.search(r"predict stopped after (\d+) of 12 images.*run the same command again to continue", stderr)
    kept = sorted(path.name for path in masks.iterdir())
    assert int(stopped[1]) == len(kept)  # the count it states is the count on disk
    assert all(not name.startswith(".") for name in kept)  # no half-written file under any name
    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(kept)} already done" in rerun.stdout + rerun.stderr
    assert len(list(masks.iterdir())) == PREDICT_IMAGES


def test_predict_stops_after_the_current_image_and_states_the_true_count(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Ctrl-C during the first image of six: acknowledged at once, stopped after that image (not after
    its read-ahead chunk of four, nor after all six), and the message counts the images done."""
    import cv2
    import numpy as np

    from allspark_cli.engine.inference.predict import Predictor
    from allspark_cli.engine.inference.predict_folder import predict_folder
    from allspark_cli.errors import Interrupted

    images = tmp_path / "photos"
    images.mkdir()
    for index in range(6):
        cv2.imwrite(str(images / f"{index}.png"), np.full((PREDICT_SIZE, PREDICT_SIZE, 3), index * 40, np.uint8))
    said: list[str] = []

    def ctrl_c_in_the_first_image(done: int, total: int) -> None:
        if not said:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted, match="predict stopped after 1 of 6 images"):
        predict_folder(Predictor(tiny_checkpoint, device="cpu"), [str(images)], tmp_path / "out", save=["mask"],
                       progress=ctrl_c_in_the_first_image, stopping=lambda: said.append("stopping"))
    assert said == ["stopping"]
    assert len(list((tmp_path / "out" / "masks").iterdir())) == 1


def test_eval_stopped_exits_with_nothing_written(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """SIGTERM while `allspark eval` runs: Interrupted after the current batch, no eval folder."""
    from allspark_cli.engine.inference.evaluate import evaluate_checkpoint
    from allspark_cli.errors import Interrupted

    def stop_after_first(done: int, total: int) -> None:
        if done == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted, match="evaluation stopped after 1 of 6 images; nothing was written"):
        evaluate_checkpoint(tiny_checkpoint, device="cpu", out=tmp_path / "eval", progress=stop_after_first)
    assert not (tmp_path / "eval").exists()


def test_a_process_forked_inside_a_command_ends_quietly_on_sigterm() -> None:
    """Every command runs with SIGTERM turned into KeyboardInterrupt. A forked worker (the demo
    builder's multiprocessing pool, whose terminate() sends SIGTERM) inherits that handler: there
    SIGTERM must end it as by default, not raise KeyboardInterrupt and print a traceback."""
    code = ("import multiprocessing, os, signal, time\n"
            "from allspark_cli.signals import stop_signals_interrupt\n"
            "with stop_signals_interrupt():\n"
            "    worker = multiprocessing.get_context('fork').Process(target=time.sleep, args=(30,))\n"
            "    worker.start()\n"
            "    time.sleep(0.5)\n"
            "    os.kill(worker.pid, signal.SIGTERM)\n"
            "    worker.join()\n"
            "    print(worker.exitcode)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=STARTUP_LIMIT_S)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) == -signal.SIGTERM
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr
