"""CPU threads of a command: how many intra-op threads torch uses, and how idle ones wait.

torch's CPU kernels run on OpenMP threads. By default an OpenMP thread that runs out of work
spins for a while before it sleeps, which is free on an idle machine but, when another process
holds a core, turns every parallel region into a wait for a thread that is not running: two
trainings side by side then took 8.6x their idle time on 2 cores instead of the fair 2x
(benchmarks/bench_threads.py). A passive wait policy lets idle threads sleep at once; on an
idle machine it measured no slower. It has to be in the environment before the OpenMP runtime
loads (the first `import torch`), so the CLI sets it at import, and only when the user has not.

The thread count itself is `--threads` (default: `OMP_NUM_THREADS` when set, else torch's own
choice, one thread per core). It also changes results in the last bits of every reduction, so the
same seed with another thread count trains a different model (README "Reproducibility").
"""
from __future__ import annotations

import os

WAIT_POLICY_VARIABLE = "OMP_WAIT_POLICY"
PASSIVE_WAIT = "PASSIVE"
THREADS_VARIABLE = "OMP_NUM_THREADS"


def use_passive_wait() -> None:
    """Idle OpenMP threads sleep instead of spinning, unless the environment already says otherwise.
    Effective only before torch is first imported."""
    os.environ.setdefault(WAIT_POLICY_VARIABLE, PASSIVE_WAIT)


def threads_from_environment() -> int | None:
    """`OMP_NUM_THREADS` as a positive count, or None when unset or not a number."""
    text = os.environ.get(THREADS_VARIABLE, "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def apply_threads(threads: int | None) -> int:
    """Sets torch's intra-op thread count (None: `OMP_NUM_THREADS`, else torch's default) and
    returns the count in force."""
    import torch

    wanted = threads if threads is not None else threads_from_environment()
    if wanted is not None:
        torch.set_num_threads(wanted)
    return torch.get_num_threads()
