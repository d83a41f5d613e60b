"""How many micro-steps a run takes: measured, one real step per candidate, before training starts.

`--accumulate auto` (the default) and `train --dry-run` run one whole training step (pseudo-label
pass, forward, backward, optimizer step) of the run's own model and first batch for each candidate
count of micro-steps N (the divisors of the process's groups, fewest first), on the run's device,
and read its peak memory: on CUDA the allocator's `max_memory_allocated`, on CPU the process's peak
resident set (which never goes down, so on CPU only the first measurement is a step's own). `auto`
takes the fewest micro-steps whose peak stays under `train.memory_fraction` of the device's memory;
on CPU it is 1 without measuring (host memory is not the limit a CPU run meets first).
"""
from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from allspark_cli.errors import ResourceError

BYTES_PER_KIB = 1024
GIB = 1024**3


@dataclass(frozen=True)
class StepMeasure:
    """One measured step: its micro-steps, peak memory in bytes (inf: out of memory) and seconds."""

    micro_steps: int
    peak_bytes: float
    seconds: float


def candidate_micro_steps(groups: int) -> list[int]:
    """Micro-step counts that keep whole groups per micro-step: the divisors of `groups`, ascending."""
    return [n for n in range(1, groups + 1) if groups % n == 0]


def measure(device: torch.device, micro_steps: int, one_step: Callable[[int], float]) -> StepMeasure:
    """Runs `one_step(micro_steps)` (which returns the seconds of its steps proper) and reads the
    peak memory; an out-of-memory step is an infinite peak."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        seconds = one_step(micro_steps)
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return StepMeasure(micro_steps, math.inf, math.nan)
    if device.type == "cuda":
        peak = float(torch.cuda.max_memory_allocated(device))
    else:
        peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * BYTES_PER_KIB)  # Linux: KiB
    return StepMeasure(micro_steps, peak, seconds)


def timed(device: torch.device, work: Callable[[], None]) -> float:
    """Seconds of `work()`, the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def device_capacity(device: torch.device) -> float:
    """Bytes of memory the device has (CUDA: the card's total; CPU: infinite, see the module docstring)."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return math.inf


def choose_micro_steps(
    groups: int,
    measure_step: Callable[[int], StepMeasure],
    capacity: float,
    fraction: float,
    *,
    what_fits: str,
) -> tuple[int, list[StepMeasure]]:
    """The fewest micro-steps whose measured peak stays under `fraction` of `capacity`, and the
    measurements made; ResourceError (exit 5) naming `what_fits` when not even one group fits."""
    measured = []
    for micro_steps in candidate_micro_steps(groups):
        result = measure_step(micro_steps)
        measured.append(result)
        if result.peak_bytes <= fraction * capacity:
            return micro_steps, measured
    smallest = measured[-1]
    peak = "out of memory" if math.isinf(smallest.peak_bytes) else f"a peak of {smallest.peak_bytes / GIB:.1f} GiB"
    raise ResourceError(
        f"train.accumulation_steps auto: even {smallest.micro_steps} micro-steps of one group each reach {peak}, over "
        f"{fraction:g} of the device's {capacity / GIB:.1f} GiB (train.memory_fraction); what would fit: {what_fits}"
    )
