"""`allspark train`: settings from a preset (or a run to resume) + overrides, then engine.train."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from allspark_cli.cli.options import ExistOkOption, NameOption, SeedOption
from allspark_cli.cli.demo_data import dataset_builder_for
from allspark_cli.cli.training_display import RichReporter
from allspark_cli.cli.training_options import TrainingOptions, with_training_options
from allspark_cli.engine.training import events
from allspark_cli.engine.training import train as engine
from allspark_cli.engine.distributed import launched_rank
from allspark_cli.engine.training.presets import custom_recipe, find_preset, list_presets
from allspark_cli.engine.training.resume import resume_base
from allspark_cli.engine.training.memory_plan import GIB
from allspark_cli.errors import ResourceError, SettingsError
from allspark_cli.model.backbones import backbone_choices
from allspark_cli.model.methods import METHODS
from allspark_cli.threads import apply_threads
from allspark_cli.text import plural

# Wider than any presets table: the width at which the full table's natural width is measured.
MEASURING_WIDTH = 1000
COMPACT_PRESETS_HINT = "all columns (aliases, lr, mIoU, baselines): allspark train --list-presets --wide"


def presets_table() -> Table:
    table = Table(title="allspark presets (recipes: DESIGN.md section 3; mIoU: the paper's tables)")
    table.add_column("preset (alias)", no_wrap=True)
    for column in ("labeled", "crop", "epochs", "batch", "lr", "head", "recipe", "mIoU", "source"):
        table.add_column(column, justify="right", no_wrap=True)
    scripted = " / ".join(name for name, spec in METHODS.items() if spec.reference_baseline)
    table.add_column(f"baselines (--method {scripted})", no_wrap=True)
    table.caption = ("batch: global labeled+unlabeled per step (/ group: images of each kind per reference GPU); "
                     "head: head/module lr multiplier; recipe: the unlabeled loss's (--recipe), with the "
                     "confidence threshold weak-to-strong would use; mIoU: published, from the paper's table in 'source' "
                     "(†: U2PL splits); baselines: what the reference's baseline scripts change")
    for preset in list_presets():
        s, info = preset.info.settings, preset.info
        name = info.name + (f" ({', '.join(info.aliases)})" if info.aliases else "")
        table.add_row(name, *_size_cells(preset), f"{s.optim.lr:g}",
                      f"x{s.optim.head_lr_multiplier:g}", _recipe_cell(s), "-" if info.paper_miou is None else f"{info.paper_miou:.2f}",
                      info.paper_source or "-", _baselines_text(preset))
    return table


def compact_presets_table() -> Table:
    """The presets in 80 columns: name, data and schedule, and the recipe's name."""
    table = Table(title="allspark presets (recipes: DESIGN.md section 3)")
    table.add_column("preset", no_wrap=True)
    for column in ("labeled", "crop", "epochs", "batch", "recipe"):
        table.add_column(column, justify="right", no_wrap=True)
    for preset in list_presets():
        table.add_row(preset.info.name, *_size_cells(preset), preset.info.settings.train.recipe)
    return table


def _size_cells(preset) -> list[str]:
    """The labeled, crop, epochs and batch cells of a preset's row (both tables)."""
    s, info = preset.info.settings, preset.info
    group = f" /{s.train.group_size}" if s.train.group_size else ""
    return [str(info.labeled_count or "-"), str(s.data.crop), str(s.train.epochs),
            f"{s.train.batch_size}+{s.train.batch_size}{group}"]


def _print_presets(wide: bool) -> None:
    """The full table where it fits (or with --wide, however wide: for a file or `less -S`), else
    the compact one and how to see the rest."""
    stdout = Console()
    full = presets_table()
    natural = stdout.measure(full, options=stdout.options.update_width(MEASURING_WIDTH)).maximum
    if wide or natural <= stdout.width:
        Console(width=max(stdout.width, natural)).print(full)
        return
    stdout.print(compact_presets_table())
    stdout.print(COMPACT_PRESETS_HINT, markup=False, highlight=False)


def _recipe_cell(settings) -> str:
    """'reference (0.95)': the preset's recipe and the threshold weak-to-strong would use."""
    train = settings.train
    return f"{train.recipe} ({train.confidence_threshold:g})"


def _baselines_text(preset) -> str:
    """'sup: batch 16 /4, epoch = labeled list; semi: lr 0.001' (what differs from the preset), or '-'."""
    parts = []
    own = preset.info.settings
    for method in sorted(preset.info.baselines):
        recipe = preset.baseline_settings(method)
        changes = []
        if recipe.train.batch_size != own.train.batch_size or recipe.train.group_size != own.train.group_size:
            changes.append(f"batch {recipe.train.batch_size}" + (f" /{recipe.train.group_size}" if recipe.train.group_size else ""))
        if recipe.train.epoch_length != own.train.epoch_length:
            changes.append(f"epochs over the {recipe.train.epoch_length} list")
        if recipe.optim.lr != own.optim.lr:
            changes.append(f"lr {recipe.optim.lr:g}")
        parts.append(f"{method}: {', '.join(changes) or 'as the preset'}")
    return "; ".join(parts) or "-"


@with_training_options
def train_command(
    preset: Annotated[str | None, typer.Option("--preset", "-p", rich_help_panel="Run", help="Preset name, e.g. pascal-1/8 or demo-1/16 (see --list-presets).", show_default=False)] = None,
    training: TrainingOptions = TrainingOptions(),
    list_presets_flag: Annotated[bool, typer.Option("--list-presets", rich_help_panel="Run", help="Print the presets table and exit.")] = False,
    wide: Annotated[bool, typer.Option("--wide", rich_help_panel="Run", help="With --list-presets: every column, however wide.")] = False,
    resume: Annotated[Path | None, typer.Option("--resume", rich_help_panel="Run", help="Continue a run: RUN_DIR or RUN_DIR/weights/last.pt.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", rich_help_panel="Run", help="Resume even if the world size or batch changed.")] = False,
    backbone: Annotated[str | None, typer.Option("--backbone", metavar="<variant>", rich_help_panel="Recipe", help=f"Encoder variant ({backbone_choices()}).", show_default=False)] = None,
    pretrained: Annotated[Path | None, typer.Option("--pretrained", rich_help_panel="Recipe", help="Pretrained encoder weights in their publisher's layout (e.g. mit_b5.pth of the SegFormer release).", show_default=False)] = None,
    no_pretrained: Annotated[bool, typer.Option("--no-pretrained", rich_help_panel="Recipe", help="Train from scratch (prints a warning).")] = False,
    # A name the settings check against the method table (model/methods.py), so the choices are the table's.
    method: Annotated[str | None, typer.Option("--method", metavar=f"<{'|'.join(METHODS)}>", rich_help_panel="Recipe", help="Ablation variant (paper Table 5).", show_default=False)] = None,
    seed: SeedOption = None,
    name: NameOption = None,
    exist_ok: ExistOkOption = False,
    save_every: Annotated[int | None, typer.Option("--save-every", min=0, rich_help_panel="Run", help="Save last.pt every N iterations.", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", rich_help_panel="Run", help="Measure one step per micro-step count on the device (peak memory, time), print the plan and exit; writes nothing.")] = False,
) -> None:
    """Train a segmentor (AllSpark or an ablation) from a preset, or on your own data with --data
    alone (the demo's CPU-sized recipe); writes runs/<preset or dataset-split>/<name>/.

    Settings precedence: preset < --config < ALLSPARK_<SECTION>__<FIELD> < options < --set.
    """
    console = Console(stderr=True)
    if list_presets_flag:
        _print_presets(wide)
        return
    if no_pretrained and pretrained is not None:
        raise SettingsError("--pretrained and --no-pretrained exclude each other")
    options: dict[str, Any] = {  # train's own, over the shared TrainingOptions
        "model.backbone": backbone, "model.pretrained": str(pretrained) if pretrained else None,
        "model.method": method, "train.seed": seed, "run.name": name,
        "run.exist_ok": exist_ok or None, "train.save_every": save_every,
    }
    base, method_recipes, checkpoint = _base_layer(preset, resume, training.config, training.data)
    if no_pretrained:
        base = {**base, "model": {**base.get("model", {}), "pretrained": None}}
    settings = training.settings(base, options=options, method_recipes=method_recipes)
    apply_threads(training.threads)
    build_missing = None if resume else dataset_builder_for(settings.preset, settings.data.manifest)
    if dry_run:
        _print_plan(engine.plan_run(settings, build_missing))
        return
    reporter = RichReporter(console) if console.is_terminal else events.PlainReporter(sys.stderr)
    result = engine.train(settings, resume=checkpoint, force=force, reporter=reporter, build_missing=build_missing)
    if launched_rank() != 0:  # under torchrun the summary is rank 0's to print
        return
    Console().print(f"[green]done[/]: best mIoU {result.best_miou:.2f} (epoch {result.best_epoch + 1}), "
                    f"last {result.last_miou:.2f}; run folder {result.run_dir}")


def _print_plan(plan: engine.RunPlan) -> None:
    """The dry run's table: one row per micro-step count measured, the pick and the projection."""
    table = Table(title=f"one training step on {plan.device} ({plural(plan.groups, 'group')} per process)")
    for column in ("micro-steps", "peak memory", "step time"):
        table.add_column(column, justify="right")
    for row in plan.measures:
        peak = "out of memory" if math.isinf(row.peak_bytes) else f"{row.peak_bytes / GIB:.2f} GiB"
        seconds = "-" if math.isnan(row.seconds) else f"{row.seconds:.2f} s"
        table.add_row(str(row.micro_steps), peak, seconds)
    out = Console()
    out.print(table)
    if plan.device.startswith("cpu"):
        out.print("peak memory on CPU: the process's peak resident set so far (the first row is the step's own)")
    if plan.chosen is None:
        raise ResourceError(plan.problem or "no micro-step count fits this device")
    capacity = "" if math.isinf(plan.capacity_bytes) else f" of {plan.capacity_bytes / GIB:.1f} GiB"
    out.print(f"--accumulate auto would pick {plural(plan.chosen, 'micro-step')}{capacity}; projected training time "
              f"{plan.projected_seconds / 60:.1f} min for {plan.total_iterations} iterations (evaluations not included)")


def _base_layer(preset: str | None, resume: Path | None, config: Path | None,
                data: Path | None) -> tuple[dict[str, Any], dict[str, Any], Path | None]:
    """The lowest settings layer (the preset's, the resumed run's saved settings, or for --data alone
    the recipe for your own data), the preset's baseline recipes (none for a resumed run: its saved
    settings already hold them) and the last.pt to resume (None: a fresh run, or one started again
    in its folder). The checkpoint is read once here; the engine reads it again for the weights."""
    if preset and resume:
        raise SettingsError("--resume continues a run with its saved settings; do not combine it with --preset")
    if resume:
        checkpoint, saved = resume_base(resume)
        return saved, {}, checkpoint
    if preset:
        found = find_preset(preset)
        return found.layer, dict(found.info.baselines), None
    if config is not None:
        return {}, {}, None
    if data is None:
        raise SettingsError("nothing to train: give --data DATASET (your prepared dataset, with the default recipe), "
                            "--preset NAME (see --list-presets), --config FILE or --resume RUN_DIR")
    return custom_recipe(), {}, None


def register(app: typer.Typer) -> None:
    """Adds `allspark train` to the app."""
    app.command("train")(train_command)
