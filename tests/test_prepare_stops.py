"""Stops and failed writes during `prepare`: a stop signal sent to the main
process or to its whole process group (pool workers included) ends the run with exit 130 and the
resume hint; a failed write ends it with exit 6 naming the file; what was complete stays, nothing
half-written counts as done, and the rerun continues."""
from __future__ import annotations

import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import data_tools.common as common
from allspark_cli.cli.app import app
from allspark_cli.errors import Interrupted
from data_tools.coco import prepare_coco

HEIGHT, WIDTH = 12, 16
NUM_TRAIN = 24
INTERRUPTED_EXIT, WRITE_ERROR_EXIT = 130, 6
STARTUP_LIMIT_S = 120
REPO = Path(__file__).resolve().parents[1]
# The signalled run: images big enough, with enough polygons, that converting them takes a few
# seconds on 2 workers (~30 ms each), so the stop lands while the pool is busy.
SLOW_SIZE, SLOW_IMAGES, SLOW_POLYGONS, SLOW_STEP = (480, 640), 120, 30, 10
MASKS_BEFORE_STOP = 4


def _jpeg_bytes(seed: int, size: tuple[int, int] = (HEIGHT, WIDTH)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def make_coco(tmp_path: Path, *, slow: bool = False) -> Path:
    """A COCO root of small images with one box each (`slow`: large images with many polygons)."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    height, width = SLOW_SIZE if slow else (HEIGHT, WIDTH)
    polygons = [[[float(x), 2.0, x + width / 2, 2.0, x + width / 2, height - 2.0, float(x), height - 2.0]]
                for x in range(0, SLOW_POLYGONS * SLOW_STEP if slow else 1, SLOW_STEP)]
    solid = io.BytesIO()
    Image.new("RGB", (width, height), (90, 20, 30)).save(solid, "JPEG")
    for image_set, count, offset in (("train2017", SLOW_IMAGES if slow else NUM_TRAIN, 0), ("val2017", 2, 1000)):
        (root / image_set).mkdir()
        images, annotations = [], []
        for index in range(count):
            image_id = offset + index + 1
            name = f"{image_id:012d}.jpg"
            (root / image_set / name).write_bytes(solid.getvalue() if slow else _jpeg_bytes(image_id))
            images.append({"id": image_id, "file_name": name, "height": height, "width": width})
            annotations += [{"id": image_id * 1000 + number, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                             "segmentation": polygon} for number, polygon in enumerate(polygons)]
        content = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
        (root / "annotations" / f"instances_{image_set}.json").write_text(json.dumps(content))
    return root


def _masks(out: Path) -> dict[str, bytes]:
    """Complete masks by name (temp files of an interrupted write start with a dot)."""
    if not (out / "masks").is_dir():
        return {}
    return {p.name: p.read_bytes() for p in sorted((out / "masks").glob("*.png")) if not p.name.startswith(".")}


@pytest.mark.parametrize(("stop", "target"), [(signal.SIGTERM, "group"), (signal.SIGHUP, "group"), (signal.SIGINT, "main")])
def test_stop_signal_with_pool_workers_exits_130_and_the_rerun_continues(tmp_path: Path, stop: signal.Signals, target: str) -> None:
    root = make_coco(tmp_path, slow=True)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "allspark_cli", "prepare", "coco", "--root", str(root), "--out", str(out), "-j", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)  # its own process group, as a scheduler's job
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while time.monotonic() < deadline and process.poll() is None and len(_masks(out)) < MASKS_BEFORE_STOP:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    if target == "group":
        os.killpg(process.pid, stop)  # the main process and its pool workers
    else:
        os.kill(process.pid, stop)
    _, stderr = process.communicate(timeout=STARTUP_LIMIT_S)
    assert process.returncode == INTERRUPTED_EXIT, stderr
    assert "Traceback" not in stderr and "internal error" not in stderr
    kept = _masks(out)
    assert f"Error: interrupted; rerun the same command to continue ({len(kept)} masks kept)" in stderr
    total = SLOW_IMAGES + 2
    assert MASKS_BEFORE_STOP <= len(kept) < total and not (out / "dataset.yaml").exists()
    summary = prepare_coco(root, out, workers=2)
    assert (summary.masks_written, summary.masks_skipped) == (total - len(kept), len(kept))
    masks = _masks(out)
    assert len(masks) == total and len(set(masks.values())) == 1  # every image has the same polygons: all complete


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_stop_in_process_ends_after_the_current_mask(tmp_path: Path, stop: signal.Signals, monkeypatch) -> None:
    root = make_coco(tmp_path)
    real = common.atomic_write_bytes
    written = []

    def write_then_stop(path, data):  # a stop arrives while the 3rd mask is written
        real(path, data)
        if Path(path).suffix == ".png":
            written.append(path)
        if len(written) == 3 and Path(path).suffix == ".png":
            os.kill(os.getpid(), stop)

    monkeypatch.setattr(common, "atomic_write_bytes", write_then_stop)
    with pytest.raises(Interrupted, match=r"^interrupted; rerun the same command to continue \(3 masks kept\)$"):
        prepare_coco(root, tmp_path / "out", workers=1)
    assert len(_masks(tmp_path / "out")) == 3


@pytest.mark.parametrize("cause", [errno.ENOSPC, errno.EACCES])
def test_failed_write_exits_6_naming_the_file_and_the_rerun_continues(tmp_path: Path, cause: int, monkeypatch) -> None:
    root = make_coco(tmp_path)
    out = tmp_path / "out"
    real = common.atomic_write_bytes
    calls = []

    def fail_on_the_fifth_mask(path, data):
        calls.append(path)
        if Path(path).suffix == ".png" and len([p for p in calls if Path(p).suffix == ".png"]) == 5:
            with open(Path(path).with_name(f".{Path(path).name}.x.tmp.png"), "wb") as partial:
                partial.write(data[: len(data) // 2])  # the disk filled up halfway through the temp file
            raise OSError(cause, os.strerror(cause))
        real(path, data)

    monkeypatch.setattr(common, "atomic_write_bytes", fail_on_the_fifth_mask)
    result = CliRunner().invoke(app, ["prepare", "coco", "--root", str(root), "--out", str(out), "-j", "1"])
    assert result.exit_code == WRITE_ERROR_EXIT, result.output
    failing = [p for p in calls if Path(p).suffix == ".png"][4]
    line = [text for text in result.output.splitlines() if text.startswith("Error:")]
    assert line == [f"Error: could not write {failing}: {os.strerror(cause)}; rerun the same command to continue once "
                    "the cause is fixed (4 masks kept)"]
    assert len(_masks(out)) == 4 and not Path(failing).exists()  # the partial file is not under its final name
    monkeypatch.setattr(common, "atomic_write_bytes", real)
    summary = prepare_coco(root, out, workers=1)
    assert (summary.masks_written, summary.masks_skipped) == (NUM_TRAIN + 2 - 4, 4)
    assert not list((out / "masks").glob(".*.tmp*"))  # the partial temp file was cleaned up


def test_write_error_in_a_pool_worker_ends_the_run_with_exit_6(tmp_path: Path) -> None:
    root = make_coco(tmp_path)
    out = tmp_path / "out"
    blocker = out / "masks" / "000000000011.png"
    blocker.mkdir(parents=True)  # a folder where a mask must go: its write fails as for a lost permission
    result = CliRunner().invoke(app, ["prepare", "coco", "--root", str(root), "--out", str(out), "-j", "2"])
    assert result.exit_code == WRITE_ERROR_EXIT, result.output
    assert re.search(rf"Error: could not write {re.escape(str(blocker))}: Is a directory; any earlier version of it is unchanged; "
                     rf"rerun the same command to "
                     rf"continue once the cause is fixed \((\d+) masks kept\)", result.output)
    assert "Traceback" not in result.output and not (out / "dataset.yaml").exists()
    blocker.rmdir()
    kept = len(_masks(out))
    assert prepare_coco(root, out, workers=2).masks_written == NUM_TRAIN + 2 - kept
