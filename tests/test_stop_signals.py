"""A stop sent to the whole process group (how `timeout`, Slurm, `docker stop` and Kubernetes end a
job) with data-loader workers running: the run saves last.pt at the iteration it reached and exits
130 with its one-line message, no traceback (issue #14, point 1, for `train`)."""
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

from allspark_cli.model.checkpoint import read_checkpoint
from train_fixtures import make_dataset, tiny_layer

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
