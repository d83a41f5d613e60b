"""Torture run: kill a tiny CPU training again and again, resume after each kill, and check that
nothing is lost. Not a unit test: it takes minutes.

Every trial starts `allspark train` (the first one fresh, then `--resume RUN`) in its own process
group, with two data-loader workers, and stops the whole group the way a machine or a scheduler
does, at one of these moments (drawn in turn, with random delays):

- `random`:  SIGKILL at a random time after the start;
- `save`:    SIGKILL while a checkpoint is being written (its temporary file exists);
- `eval`:    SIGKILL during an in-training evaluation (the epoch's steps are logged, its
             results.csv row is not yet);
- `resumed`: SIGKILL in the first iteration after a resume (`resumed from` is in train.log);
- `sigterm`: SIGTERM at a random time (as `timeout`, Slurm, docker, Kubernetes): the run must exit
             130 with `stopped at iteration N` and its last.pt must hold iteration N.

After every stop each checkpoint in weights/ must be readable, and the next trial must start
(resume, or start again in its folder when no last.pt was saved yet). Then the run is finished
without kills and its final weights, memory and evaluation history are compared with an
uninterrupted run of the same settings and seed.

    python benchmarks/torture.py [--trials 24] [--seed 0] [--work DIR] [--json OUT]

Determinism: CPU, one intra-op thread (OMP_NUM_THREADS=1), loader order a function of (seed,
epoch), augmentation of (seed, epoch, index), RNG states in last.pt: resumed and uninterrupted runs
should agree bit for bit.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

from allspark_cli.data.manifest import DatasetManifest, TrainSplit, write_manifest
from allspark_cli.fileio import write_png
from allspark_cli.model.checkpoint import read_checkpoint

CLASSES = ["background", "square", "disc"]
PALETTE = [(0, 0, 0), (200, 40, 40), (40, 200, 40)]
IMAGE_SIZE = 64
TRAIN_IMAGES, VAL_IMAGES = 24, 4  # 12 labeled + 12 unlabeled: 6 iterations per epoch at batch 2
EPOCHS, SAVE_EVERY, EVAL_EVERY = 30, 4, 3
KINDS = ("random", "save", "eval", "resumed", "sigterm")
RANDOM_DELAY_S = (1.0, 9.0)  # after the start; startup (imports, dataset check) takes a few seconds
START_LIMIT_S = 180  # a trial whose moment never comes (the run finished first) is left to finish
POLL_S = 0.002
INTERRUPTED_EXIT = 130


def make_dataset(root: Path, seed: int) -> Path:
    """Squares and discs on noise, palette-PNG masks, a half-labeled split and a val list."""
    rng = np.random.default_rng(seed)
    lines: dict[str, list[str]] = {"train": [], "val": []}
    for split, count in (("train", TRAIN_IMAGES), ("val", VAL_IMAGES)):
        for index in range(count):
            image = rng.integers(0, 90, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
            mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
            x, y = rng.integers(4, IMAGE_SIZE // 2, 2)
            side = int(rng.integers(10, IMAGE_SIZE // 3))
            image[y:y + side, x:x + side], mask[y:y + side, x:x + side] = (220, 220, 60), 1
            center = (int(rng.integers(IMAGE_SIZE // 2, IMAGE_SIZE - 10)), int(rng.integers(IMAGE_SIZE // 2, IMAGE_SIZE - 10)))
            cv2.circle(image, center, 8, (60, 220, 220), -1)
            cv2.circle(mask, center, 8, 2, -1)
            image_rel, mask_rel = f"images/{split}_{index}.png", f"masks/{split}_{index}.png"
            write_png(root / image_rel, image)
            write_png(root / mask_rel, mask, np.array(PALETTE, dtype=np.uint8))
            lines[split].append(f"{image_rel} {mask_rel}")
    half = TRAIN_IMAGES // 2
    for relpath, content in {"splits/half/labeled.txt": lines["train"][:half],
                             "splits/half/unlabeled.txt": lines["train"][half:], "splits/val.txt": lines["val"]}.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_text("\n".join(content) + "\n")
    manifest = DatasetManifest(
        name="torture", root=root, classes=CLASSES, palette=PALETTE,
        train_splits={"half": TrainSplit(labeled="splits/half/labeled.txt", unlabeled="splits/half/unlabeled.txt")},
        eval_splits={"val": "splits/val.txt"}, eval_mode="whole", train_crop=IMAGE_SIZE,
    )
    write_manifest(manifest, root / "dataset.yaml")
    return root / "dataset.yaml"


def write_config(path: Path, manifest: Path, runs: Path, name: str, seed: int) -> None:
    layer = {
        "preset": "torture",
        "data": {"manifest": str(manifest), "split": "half", "crop": IMAGE_SIZE, "workers": 2},
        "model": {"backbone": "b0", "method": "allspark", "head_dim": 32, "pretrained": None},
        "optim": {"lr": 0.01},
        "train": {"epochs": EPOCHS, "batch_size": 2, "warmup_epochs": 1, "device": "cpu", "log_every": 1,
                  "save_every": SAVE_EVERY, "seed": seed},
        "eval": {"every": EVAL_EVERY, "mosaic_images": 1},
        "run": {"root": str(runs), "name": name, "tensorboard": "off"},
    }
    path.write_text(yaml.safe_dump(layer))


def launch(arguments: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as handle:
        return subprocess.Popen([sys.executable, "-m", "allspark_cli", "train", *arguments], stdout=handle,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path.is_file() else []


def _logged_iterations(run: Path) -> list[int]:
    values = []
    for line in _lines(run / "metrics.jsonl"):
        try:
            values.append(json.loads(line)["iteration"])
        except (json.JSONDecodeError, KeyError):
            pass
    return values


def moment_reached(kind: str, run: Path, started: float, delay: float, log_lines_before: int) -> bool:
    """Whether the moment of a trial of `kind` has come (polled every POLL_S)."""
    if kind in ("random", "sigterm"):
        return time.monotonic() - started >= delay
    if kind == "save":
        return any((run / "weights").glob(".*.tmp*")) if (run / "weights").is_dir() else False
    if kind == "resumed":
        return any("resumed from" in line for line in _lines(run / "train.log")[log_lines_before:])
    # eval: the last step of an evaluated epoch is logged, its results row not yet written.
    per_epoch = TRAIN_IMAGES // 2 // 2
    logged = _logged_iterations(run)
    if not logged or logged[-1] % (per_epoch * EVAL_EVERY):
        return False
    rows = len(_lines(run / "results.csv")) - 1
    return rows < logged[-1] // (per_epoch * EVAL_EVERY)


def check_graceful_stop(code: int, tail: str, run: Path) -> str | None:
    """What is wrong with how a SIGTERM'd run ended (None: exit 130, one message, last.pt at the
    iteration it names)."""
    if code != INTERRUPTED_EXIT or "Traceback" in tail:
        return f"exit {code}, last lines {tail!r}"
    reached = re.search(r"stopped at iteration (\d+)", tail)
    if reached is None:  # stopped during startup or an evaluation: nothing to compare
        return None if re.search(r"Error: (interrupted|stopped after epoch)", tail) else f"no stop message in {tail!r}"
    saved = read_checkpoint(run / "weights" / "last.pt").train_state["iteration"]
    return None if saved == int(reached[1]) else f"stopped at {reached[1]} but last.pt holds iteration {saved}"


def _finished(run: Path) -> bool:
    last = run / "weights" / "last.pt"
    return last.is_file() and bool(read_checkpoint(last).train_state.get("finished"))


def checkpoints_readable(run: Path) -> tuple[int, int]:
    """(readable, unreadable) among weights/last.pt and best.pt."""
    good = bad = 0
    for name in ("last.pt", "best.pt"):
        path = run / "weights" / name
        if path.exists():
            try:
                read_checkpoint(path)
                good += 1
            except Exception:  # noqa: BLE001 - any failure to read is what this script counts
                bad += 1
    return good, bad


def run_trials(args: argparse.Namespace, work: Path, manifest: Path) -> dict:
    config, runs = work / "torture.yaml", work / "runs"
    write_config(config, manifest, runs, "tortured", args.seed)
    run, log = runs / "torture" / "tortured", work / "tortured.log"
    rng = random.Random(args.seed)
    counts: Counter = Counter()
    failures: list[str] = []
    for trial in range(args.trials):
        if _finished(run):
            break
        kind = KINDS[trial % len(KINDS)]
        resuming = (run / "config.yaml").is_file()
        if kind == "resumed" and not (run / "weights" / "last.pt").is_file():
            kind = "random"  # nothing to resume yet
        log_lines_before = len(_lines(run / "train.log"))
        arguments = ["--resume", str(run)] if resuming else ["--config", str(config)]
        delay = rng.uniform(*RANDOM_DELAY_S)
        started = time.monotonic()
        process = launch(arguments, log)
        while process.poll() is None and time.monotonic() - started < START_LIMIT_S:
            if moment_reached(kind, run, started, delay, log_lines_before):
                break
            time.sleep(POLL_S)
        if process.poll() is not None:
            counts["finished before the moment"] += 1
            if process.returncode != 0:
                failures.append(f"trial {trial} ({kind}): exit {process.returncode} before any kill; see {log}")
            break
        stop = signal.SIGTERM if kind == "sigterm" else signal.SIGKILL
        os.killpg(process.pid, stop)
        code = process.wait()
        if "done: best mIoU" in "\n".join(_lines(log)[-3:]):  # the run ended as the signal came
            counts["finished before the moment"] += 1
            break
        counts[f"kills: {kind}"] += 1
        counts["trials"] += 1
        if resuming:
            counts["starts after a kill"] += 1
        if kind == "sigterm":
            failure = check_graceful_stop(code, "\n".join(_lines(log)[-3:]), run)
            if failure:
                failures.append(f"trial {trial} (sigterm): {failure}")
            counts["graceful stops checked"] += not failure
        good, bad = checkpoints_readable(run)
        counts["checkpoints read"] += good
        counts["unreadable checkpoints"] += bad
        if bad:
            failures.append(f"trial {trial} ({kind}): an unreadable checkpoint")
    if not _finished(run):  # finish without kills
        arguments = ["--resume", str(run)] if (run / "config.yaml").is_file() else ["--config", str(config)]
        if launch(arguments, log).wait() != 0:
            failures.append(f"the final resume failed; see {log}")
    counts["stale temporary files"] = len(list((run / "weights").glob(".*.tmp*")))
    return {"counts": dict(counts), "failures": failures, "run": str(run)}


def compare(tortured: Path, reference: Path) -> dict:
    got = read_checkpoint(tortured / "weights" / "last.pt")
    expected = read_checkpoint(reference / "weights" / "last.pt")
    worst, exact = 0.0, True
    for name, tensor in expected.state_dict.items():
        other = got.state_dict[name]
        exact = exact and torch.equal(tensor, other)
        if tensor.is_floating_point():
            worst = max(worst, (tensor.double() - other.double()).abs().max().item())
    history = [round(row["miou"], 6) for row in got.train_state["history"]]
    reference_history = [round(row["miou"], 6) for row in expected.train_state["history"]]
    return {"weights_bitwise_equal": exact, "max_abs_weight_difference": worst,
            "finished": bool(got.train_state.get("finished")), "iterations": got.train_state["iteration"],
            "miou_history": history, "miou_history_equal": history == reference_history}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="allspark-torture-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        manifest = make_dataset(work / "data", args.seed)
        write_config(work / "reference.yaml", manifest, work / "runs", "uninterrupted", args.seed)
        reference = launch(["--config", str(work / "reference.yaml")], work / "uninterrupted.log")
        if reference.wait() != 0:
            print(f"the uninterrupted run failed; see {work / 'uninterrupted.log'}")
            return 1
        results = run_trials(args, work, manifest)
        results.update(compare(Path(results["run"]), work / "runs" / "torture" / "uninterrupted"))
        results["seconds"] = round(time.perf_counter() - start, 1)
        counts = results["counts"]
        print(f"torture: {counts.get('trials', 0)} trials in {results['seconds']} s "
              f"(seed {args.seed}, {EPOCHS} epochs x {TRAIN_IMAGES // 4} iterations, save every {SAVE_EVERY})")
        for key in sorted(counts):
            print(f"  {key:32s} {counts[key]}")
        print(f"  {'final weights bitwise equal':32s} {'yes' if results['weights_bitwise_equal'] else 'no'} "
              f"(max |difference| {results['max_abs_weight_difference']:.3g})")
        print(f"  {'mIoU history equal':32s} {'yes' if results['miou_history_equal'] else 'no'} {results['miou_history']}")
        for failure in results["failures"]:
            print(f"  FAILURE: {failure}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        ok = not results["failures"] and results["weights_bitwise_equal"] and not counts.get("unreadable checkpoints")
        return 0 if ok else 1
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
