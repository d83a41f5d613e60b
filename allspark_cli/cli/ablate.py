"""`allspark ablate`: the paper's Table 5 (sup, semi, cca, cca+smem, allspark) x seeds on a preset,
one recipe for all, then a table of mean ± std (engine/training/ablate.py)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from allspark_cli.cli.options import NameOption
from allspark_cli.cli.demo_data import dataset_builder_for
from allspark_cli.cli.training_display import RichReporter
from allspark_cli.cli.training_options import TrainingOptions, with_training_options
from allspark_cli.engine.training import events
from allspark_cli.engine.training.ablate import (
    DEFAULT_NAME,
    RUNS_DIR,
    Ablation,
    ablate,
    run_name,
)
from allspark_cli.engine.training.presets import find_preset
from allspark_cli.engine.training.train_data import run_group_of
from allspark_cli.errors import SettingsError
from allspark_cli.model.methods import METHODS
from allspark_cli.text import plural
from allspark_cli.threads import apply_threads

DEFAULT_SEEDS = 3


def _methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SettingsError(f"--methods: expected a comma-separated list of {', '.join(METHODS)}, got {text!r}")
    if len(set(methods)) != len(methods):
        raise SettingsError(f"--methods: a method is listed twice in {text!r}")
    return methods


def _table(ablation: Ablation) -> Table:
    table = Table(title=f"ablation {ablation.folder}")
    table.add_column("method")
    table.add_column("mIoU mean ± std", justify="right")
    table.add_column("runs (by seed)")
    for s in ablation.methods:
        table.add_row(s.method, f"{s.mean:.2f} ± {s.std:.2f}", ", ".join(f"{m:.2f}" for m in s.mious))
    return table


@with_training_options
def ablate_command(
    preset: Annotated[str, typer.Option("--preset", "-p", help="Preset whose recipe every method trains with.", show_default=False)],
    # The default written out with spaces: one 30-character word would be cut in an 80-column help.
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated methods (paper Table 5); default: "
                                         f"all, {', '.join(METHODS)}.", show_default=False)] = ",".join(METHODS),
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Seeds per method: 0 .. N-1.")] = DEFAULT_SEEDS,
    name: NameOption = None,
    training: TrainingOptions = TrainingOptions(),
) -> None:
    """Train and evaluate every method x seed with one recipe; writes a table, chart, results.csv.

    Re-running the same command resumes: finished runs are not trained again. The output folder is
    runs/<group>/<name> (default name: ablation; the group as train's run folders: docs/training.md).
    """
    console = Console(stderr=True)
    method_list = _methods(methods)
    found = find_preset(preset)
    probe = training.settings(found.layer)
    apply_threads(training.threads)
    folder = Path(probe.run.root).expanduser() / run_group_of(probe) / (name or DEFAULT_NAME)

    def settings_for(method: str, seed: int):
        forced = [f"model.method={method}", f"train.seed={seed}", f"run.root={folder / RUNS_DIR}",
                  f"run.name={run_name(method, seed)}", "run.exist_ok=true"]
        return training.settings(found.layer, forced=forced, method_recipes=found.info.baselines)

    def reporter_for(method: str, seed: int, index: int, total: int):
        console.print(f"[bold]run {index}/{total}[/]: {method}, seed {seed}", highlight=False)
        return RichReporter(console) if console.is_terminal else events.PlainReporter(sys.stderr)

    result = ablate(settings_for, method_list, list(range(seeds)), folder, reporter_for=reporter_for,
                    build_missing=dataset_builder_for(probe.preset, probe.data.manifest))
    Console().print(_table(result))
    Console().print(f"[green]done[/]: {plural(len(result.runs), 'run')}; table, chart and results.csv in {folder}")


def register(app: typer.Typer) -> None:
    """Adds `allspark ablate` to the app."""
    app.command("ablate")(ablate_command)
