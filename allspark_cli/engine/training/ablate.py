"""`ablate`: the paper's Table 5 on any prepared dataset — every method x seed trained with one
recipe, each evaluated, and one table of mean ± std.

Layout of the ablation folder (`<run.root>/<group>/<name>`, default name `ablation`; the group
as a training run's, engine/training/rundir.py): `runs/<group>/<method>-seed<k>/` (an ordinary run folder each; its best mIoU and per-class IoU
come from the training's own evaluation history, so nothing is evaluated twice),
`results.csv` (one row per run, per-class IoU included), `summary.json`, `table.md` and
`ablation.png` (bar chart, error bars = sample std over seeds). Resumable: a run with a result is
not trained again, an interrupted one resumes from its `last.pt`, a finished one whose result was
not yet written is only tabulated. Settings of each run are the caller's (`settings_for`), so a
recipe override reaches every method alike.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from allspark_cli.data.manifest import load_manifest
from allspark_cli.engine.training.events import recipe_text
from allspark_cli.engine.training.rundir import RunFolder
from allspark_cli.engine.settings import TrainSettings
from allspark_cli.engine.training.train import train
from allspark_cli.engine.training.train_data import DatasetBuilder, manifest_path, run_group_of
from allspark_cli.errors import DataError
from allspark_cli.fileio import atomic_path, atomic_write_text
from allspark_cli.model.checkpoint import read_checkpoint
from allspark_cli.model.methods import METHODS
from allspark_cli.text import plural

RESULT_FILE = "ablation_result.json"  # in each run folder: written once its evaluation is done
RESULTS_CSV = "results.csv"
SUMMARY_JSON = "summary.json"
TABLE_MD = "table.md"
CHART_PNG = "ablation.png"
RUNS_DIR = "runs"
DEFAULT_NAME = "ablation"
CHART_DPI = 100
CHART_SIZE = (7.0, 4.0)


@dataclass
class RunResult:
    """One trained and evaluated (method, seed)."""

    method: str
    seed: int
    run_dir: str
    best_miou: float
    best_epoch: int
    iou: list[float | None]
    class_names: list[str]
    train_seconds: float
    # Per class, the pseudo labels' share (percent) over the last epoch's logged iterations (empty:
    # no unlabeled loss, or a run cached before it was recorded).
    pseudo_share: list[float | None] = field(default_factory=list)


@dataclass
class MethodSummary:
    method: str
    seeds: list[int]
    mious: list[float]
    mean: float
    std: float  # sample standard deviation over seeds (0 for one seed)
    class_iou: list[float | None]  # per class, mean over seeds (None: undefined in every run)
    class_pseudo_share: list[float | None] = field(default_factory=list)  # per class, mean over seeds


@dataclass
class Ablation:
    folder: Path
    class_names: list[str]
    runs: list[RunResult]
    methods: list[MethodSummary] = field(default_factory=list)
    recipe: str = ""  # the semi-supervised methods' recipe (events.recipe_text)


def _mean_defined(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return statistics.fmean(defined) if defined else None


def run_name(method: str, seed: int) -> str:
    """Folder name of one run: `cca+smem` -> `cca+smem-seed0`."""
    return f"{method}-seed{seed}"


def _json_number(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


def summarise(runs: Sequence[RunResult], methods: Sequence[str]) -> list[MethodSummary]:
    """Mean ± sample std of the best mIoU per method, and the mean per-class IoU."""
    summaries = []
    for method in methods:
        mine = sorted((r for r in runs if r.method == method), key=lambda r: r.seed)
        if not mine:
            continue
        mious = [r.best_miou for r in mine]
        per_class = [_mean_defined([r.iou[k] for r in mine]) for k in range(len(mine[0].iou))]
        shares = [_mean_defined([r.pseudo_share[k] for r in mine if r.pseudo_share])
                  for k in range(len(mine[0].iou))] if any(r.pseudo_share for r in mine) else []
        summaries.append(MethodSummary(method, [r.seed for r in mine], mious, statistics.fmean(mious),
                                       statistics.stdev(mious) if len(mious) > 1 else 0.0, per_class, shares))
    return summaries


def markdown_table(ablation: Ablation) -> str:
    """The table as Markdown: one row per method, mean ± std, the single runs, per-class IoU with
    (in brackets) the pseudo labels' final share of that class in percent."""
    header = ["method", "mIoU (mean ± std)", "runs", *ablation.class_names]
    lines = [f"Recipe of the semi-supervised methods: {ablation.recipe}. Per class: IoU (final pseudo-label share, %).\n"
             if ablation.recipe else "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in ablation.methods:
        runs = ", ".join(f"{m:.2f}" for m in s.mious)
        classes = []
        for k, value in enumerate(s.class_iou):
            cell = "n/a" if value is None else f"{value:.1f}"
            share = s.class_pseudo_share[k] if s.class_pseudo_share else None
            classes.append(cell if share is None else f"{cell} ({share:.1f})")
        lines.append(f"| {s.method} | {s.mean:.2f} ± {s.std:.2f} | {runs} | " + " | ".join(classes) + " |")
    return "\n".join(line for line in lines if line) + "\n"


def _write_chart(ablation: Ablation, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=CHART_SIZE, dpi=CHART_DPI)
    names = [s.method for s in ablation.methods]
    axes.bar(names, [s.mean for s in ablation.methods], yerr=[s.std for s in ablation.methods], capsize=6,
             color="#4c72b0")
    for index, s in enumerate(ablation.methods):
        axes.scatter([index] * len(s.mious), s.mious, color="black", s=10, zorder=3)
    axes.set_ylabel("best val mIoU (%)")
    seeds = max((len(s.seeds) for s in ablation.methods), default=0)
    axes.set_title(f"ablation: mean ± std over {plural(seeds, 'seed')}; dots: single runs")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)


def write_outputs(ablation: Ablation) -> None:
    """results.csv, summary.json, table.md and ablation.png of the ablation folder (atomic)."""
    folder = ablation.folder
    columns = ["method", "seed", "best_miou", "best_epoch", "train_seconds", "run_dir",
               *[f"iou_{name}" for name in ablation.class_names],
               *[f"pseudo_share_{name}" for name in ablation.class_names]]
    rows = [",".join(columns)]
    for r in sorted(ablation.runs, key=lambda r: (r.method, r.seed)):
        iou = ["" if v is None else f"{v:.4f}" for v in r.iou]
        shares = ["" if v is None else f"{v:.4f}" for v in (r.pseudo_share or [None] * len(r.iou))]
        rows.append(",".join([r.method, str(r.seed), f"{r.best_miou:.4f}", str(r.best_epoch), f"{r.train_seconds:.1f}",
                              r.run_dir, *iou, *shares]))
    atomic_write_text(folder / RESULTS_CSV, "\n".join(rows) + "\n")
    summary = {"class_names": ablation.class_names, "recipe": ablation.recipe,
               "methods": [asdict(s) for s in ablation.methods],
               "runs": [asdict(r) for r in ablation.runs]}
    atomic_write_text(folder / SUMMARY_JSON, json.dumps(summary, indent=2) + "\n")
    atomic_write_text(folder / TABLE_MD, markdown_table(ablation))
    if ablation.methods:
        _write_chart(ablation, folder / CHART_PNG)


def _best_row(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The evaluation row of the best mIoU (the first of equal ones, as training keeps best.pt)."""
    rows = [row for row in history if row.get("miou") is not None and not math.isnan(row["miou"])]
    return max(rows, key=lambda row: row["miou"]) if rows else None


def final_pseudo_share(run_dir: Path, num_classes: int) -> list[float | None]:
    """Per class, the mean pseudo-label share (percent) of the last epoch's metrics.jsonl records;
    empty when the run logged none (no unlabeled loss)."""
    records = [r for r in RunFolder(run_dir).read_metrics() if r.get("pseudo_class_share")]
    if not records:
        return []
    last = [r for r in records if r.get("epoch") == records[-1].get("epoch")]
    return [_mean_defined([r["pseudo_class_share"][k] for r in last]) for k in range(num_classes)]


def run_one(settings: TrainSettings, run_dir: Path, reporter=None, build_missing: DatasetBuilder | None = None) -> RunResult:
    """Trains (or resumes, or skips) one run of the ablation; its result (best mIoU and the per-class
    IoU of that evaluation, from the training's own evaluation history) is cached in RESULT_FILE."""
    result_file = run_dir / RESULT_FILE
    if result_file.is_file():
        return RunResult(**json.loads(result_file.read_text(encoding="utf-8")))
    last = RunFolder(run_dir).last
    start = time.perf_counter()
    history = None
    if last.is_file():
        state = read_checkpoint(last).train_state or {}
        history = state.get("history") if state.get("finished") else None
        if history is None:
            history = train(settings, resume=last, reporter=reporter, build_missing=build_missing).history
    else:
        history = train(settings, reporter=reporter, build_missing=build_missing).history
    seconds = time.perf_counter() - start
    best = _best_row(history)
    if best is None:
        raise DataError(f"{run_dir}: the run finished without a valid evaluation; nothing to tabulate")
    if best.get("iou") is None:  # evaluation rows carry per-class IoU since this command exists
        raise DataError(f"{run_dir}: its evaluation history has no per-class IoU (a run of an older allspark); "
                        "move the run folder away to train it again")
    class_names = list(load_manifest(manifest_path(settings)).classes)
    iou = best["iou"]
    result = RunResult(method=settings.model.method, seed=settings.train.seed, run_dir=str(run_dir),
                       best_miou=float(best["miou"]), best_epoch=int(best["epoch"]),
                       iou=[_json_number(v) for v in iou], class_names=class_names, train_seconds=seconds,
                       pseudo_share=final_pseudo_share(run_dir, len(class_names)))
    atomic_write_text(result_file, json.dumps(asdict(result), indent=2) + "\n")
    return result


def ablate(
    settings_for: Callable[[str, int], TrainSettings],
    methods: Sequence[str],
    seeds: Sequence[int],
    folder: Path,
    *,
    reporter_for: Callable[[str, int, int, int], Any] | None = None,
    build_missing: DatasetBuilder | None = None,
) -> Ablation:
    """Every (method, seed) of `methods` x `seeds`, in that order; `settings_for(method, seed)` gives a
    run's settings (its run.root / run.name must place it under `folder/runs`). `reporter_for(method,
    seed, index, total)` gives the training reporter of each run (progress across runs)."""
    total, runs = len(methods) * len(seeds), []
    semi = [method for method in methods if METHODS[method].unlabeled]
    recipe = recipe_text(settings_for(semi[0], seeds[0])) if semi else ""
    for index, (method, seed) in enumerate(((m, s) for m in methods for s in seeds), start=1):
        settings = settings_for(method, seed)
        run_dir = Path(settings.run.root) / run_group_of(settings) / str(settings.run.name)
        reporter = reporter_for(method, seed, index, total) if reporter_for is not None else None
        runs.append(run_one(settings, run_dir, reporter, build_missing))
        write_outputs(Ablation(folder, runs[0].class_names, runs, summarise(runs, methods), recipe))  # grows run by run
    return Ablation(folder, runs[0].class_names, runs, summarise(runs, methods), recipe)
