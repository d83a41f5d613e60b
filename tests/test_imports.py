"""Dependencies run one way: the core never imports the CLI or typer (STYLE.md habit 1)."""
from __future__ import annotations

import subprocess
import sys


def test_core_packages_do_not_import_typer_or_the_cli():
    code = (
        "import sys\n"
        "import allspark_cli.model.checkpoint, allspark_cli.model.config, allspark_cli.data, allspark_cli.engine, allspark_cli.viz\n"
        "import pkgutil, importlib, allspark_cli\n"
        "for pkg in ('allspark_cli.model', 'allspark_cli.data', 'allspark_cli.engine', 'allspark_cli.viz', 'data_tools'):\n"
        "    module = importlib.import_module(pkg)\n"
        "    for info in pkgutil.iter_modules(module.__path__):\n"
        "        importlib.import_module(f'{pkg}.{info.name}')\n"
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
