"""Training speed on an idle and on a busy CPU, for each OpenMP thread setting.

Each measurement is a child process running the demo training step (bench_train.py's CPU row:
MiT-B0, crop 128, 4 + 4 in groups of 2, synthetic data) for a fixed number of iterations; the
median seconds per iteration after warm-up is read back. "idle": the child runs alone; "busy":
two identical children run at once (the fair share of 2 cores is then 2x the idle time). The
settings compared:
- spin: the OpenMP runtime's own wait policy (what torch did before the CLI set one);
- passive: OMP_WAIT_POLICY=PASSIVE (the CLI's default now, allspark_cli/threads.py);
- spin N: GOMP_SPINCOUNT=N (`--spin-counts`, libgomp only: spin N times, then sleep);
- 1 thread: `--threads 1`.

    python benchmarks/bench_threads.py [--iterations 12] [--threads 2] [--repeats 3] [--spin-counts 1000]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _child(iterations: int, threads: int) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_train import DEMO_CLASSES, bench

    from allspark_cli.engine.training.step import StepRecipe

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    row = bench("b0", 128, 4, 128, torch.device("cpu"), "allspark", iterations, "off", DEMO_CLASSES, StepRecipe(2))
    print(json.dumps({"s_per_it": row["s/it"]}))


OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")


def _environment(extra: dict[str, str]) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in OPENMP_VARIABLES}
    return {**env, **extra}


def _measure(copies: int, threads: int, extra: dict[str, str], iterations: int) -> float:
    """Mean over `copies` simultaneous children of their median s/it."""
    command = [sys.executable, __file__, "--child", "--iterations", str(iterations), "--threads", str(threads)]
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=_environment(extra))
                for _ in range(copies)]
    values = []
    for child in children:
        out, _ = child.communicate()
        if child.returncode:
            raise SystemExit(f"a benchmark child failed with exit {child.returncode}")
        values.append(json.loads(out.strip().splitlines()[-1])["s_per_it"])
    return sum(values) / len(values)


def _spread(values: list[float]) -> str:
    return f"{min(values):.3f}" if len(values) == 1 else f"{min(values):.3f} .. {max(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2, help="threads of the multi-threaded settings")
    parser.add_argument("--spin-counts", type=int, nargs="*", default=[],
                        help="also measure these GOMP_SPINCOUNT values (libgomp's spins before a thread sleeps)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all settings (the table: min .. max)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.iterations, args.threads)
        return
    n = args.threads
    settings = ((f"spin (runtime default), {n} threads", n, {}),
                (f"passive, {n} threads", n, {"OMP_WAIT_POLICY": "PASSIVE"}),
                *((f"spin {count}, {n} threads", n, {"GOMP_SPINCOUNT": str(count)}) for count in args.spin_counts),
                ("1 thread", 1, {}))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"demo training step, s/it (median of {args.iterations} per run; min .. max of "
                  f"{args.repeats} rounds); busy = two runs at once; ratio of the minima")
    for column in ("setting", "idle s/it", "busy s/it", "busy / idle"):
        table.add_column(column, justify="right")
    idle: dict[str, list[float]] = {label: [] for label, _, _ in settings}
    busy: dict[str, list[float]] = {label: [] for label, _, _ in settings}
    for _ in range(args.repeats):  # the settings take turns, so a slow spell of the machine hits all
        for label, threads, extra in settings:
            idle[label].append(_measure(1, threads, extra, args.iterations))
            busy[label].append(_measure(2, threads, extra, args.iterations))
    for label, _, _ in settings:
        low_idle, low_busy = min(idle[label]), min(busy[label])
        table.add_row(label, _spread(idle[label]), _spread(busy[label]), f"{low_busy / low_idle:.1f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
