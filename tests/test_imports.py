"""Dependencies run one way (STYLE.md habit 1): cli -> engine -> model / data / viz -> the core
modules (errors, fileio, labels, signals, constants, suggestions, text); `data_tools` (the dataset builders) sits
beside the engine and is reached from the CLI only. Checked twice: statically on every import
statement, and by importing everything below the CLI (typer and the CLI must stay unloaded)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package folder -> the packages its modules must never import
FORBIDDEN = {
    "allspark_cli/engine": ("allspark_cli.cli", "data_tools", "typer"),
    "allspark_cli/model": ("allspark_cli.cli", "allspark_cli.engine", "allspark_cli.viz", "allspark_cli.data", "data_tools"),
    "allspark_cli/data": ("allspark_cli.cli", "allspark_cli.engine", "allspark_cli.viz", "data_tools"),
    "allspark_cli/viz": ("allspark_cli.cli", "allspark_cli.engine", "data_tools"),
    "data_tools": ("allspark_cli.cli", "allspark_cli.engine", "allspark_cli.viz", "typer"),
}
CORE_MODULES = ("errors", "fileio", "labels", "signals", "constants", "suggestions", "text")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("folder", list(FORBIDDEN))
def test_no_import_runs_upwards(folder: str) -> None:
    bad = [f"{path.relative_to(ROOT)} imports {name}" for path in sorted((ROOT / folder).rglob("*.py"))
           for name in _imports(path) if name.startswith(FORBIDDEN[folder])]
    assert bad == []


def test_core_modules_import_only_each_other() -> None:
    bad = [f"{module} imports {name}" for module in CORE_MODULES for name in _imports(ROOT / f"allspark_cli/{module}.py")
           if name.startswith("allspark_cli.") and name.removeprefix("allspark_cli.") not in CORE_MODULES]
    assert bad == []


def test_core_packages_do_not_import_typer_or_the_cli():
    code = (
        "import sys\n"
        "import allspark_cli.model.checkpoint, allspark_cli.model.config, allspark_cli.data, allspark_cli.engine, allspark_cli.viz\n"
        "import pkgutil, importlib, allspark_cli\n"
        "for pkg in ('allspark_cli.model', 'allspark_cli.data', 'allspark_cli.engine', 'allspark_cli.viz', 'data_tools'):\n"
        "    module = importlib.import_module(pkg)\n"
        "    for info in pkgutil.walk_packages(module.__path__, pkg + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "from allspark_cli import load_model\n"
        "bad = [m for m in sys.modules if m == 'typer' or m.startswith('allspark_cli.cli')]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_version_does_not_need_torch():
    code = "import sys, allspark_cli; print(allspark_cli.__version__); assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_no_command_imports_another_command() -> None:
    """What two commands share lives in its own module of the CLI (options, training_display,
    demo_data, ...), so a command can change without touching another."""
    commands = {"train", "ablate", "eval", "predict", "prepare", "export", "inspect_memory"}
    cli = Path(__file__).resolve().parents[1] / "allspark_cli" / "cli"
    for name in commands:
        tree = ast.parse((cli / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {f"allspark_cli.cli.{alias.name}" for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module == "allspark_cli.cli" for alias in node.names}
        others = {f"allspark_cli.cli.{other}" for other in commands - {name}}
        assert not imported & others, (name, imported & others)


def test_inference_does_not_import_training() -> None:
    """eval, predict and export run without the training engine (what they share with it lives in
    engine/ itself: output_folders, precision, distributed)."""
    package = Path(__file__).resolve().parents[1] / "allspark_cli" / "engine" / "inference"
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not any(module.startswith("allspark_cli.engine.training") for module in modules), path.name


def test_only_the_backbone_registry_names_a_backbone_family() -> None:
    """A backbone family is its own file plus its entry in model/backbones.py: nothing else in the
    package imports a family's module, so adding or changing one touches no other reader."""
    families = {path.stem for path in (ROOT / "allspark_cli" / "model").glob("*.py")
                if "(BackboneFamily):" in path.read_text(encoding="utf-8")}
    assert {"mit", "dinov2"} <= families
    family_modules = {f"allspark_cli.model.{name}" for name in families}
    bad = [f"{path.relative_to(ROOT)} imports {name}" for path in sorted((ROOT / "allspark_cli").rglob("*.py"))
           if path.stem != "backbones" and path.stem not in families
           for name in _imports(path) if name in family_modules]
    assert bad == []
