"""Peak memory and time of one training step with gradient accumulation over groups, on CPU.

The demo model (MiT-B0, E = 128, allspark reading its memory) with 8 + 8 images at crop 256 in
groups of 2 (4 groups), as 1, 2 and 4 micro-steps. Each measurement runs in its own process (the
peak resident set never goes down): the model and batch are built, one step runs as warm-up, then
`--steps` steps run. Time and memory come from different processes, because what makes the
resident set follow the live tensors also slows the step down:
- memory: "step memory" is the peak resident set minus the resident set before the first step
  (model, batch and runtime); "peak" is the process's whole peak. This child runs with a fixed
  malloc mmap threshold (MALLOC_MMAP_THRESHOLD_, glibc): every tensor buffer above it is its own
  mapping, given back to the system when freed, so the resident set follows the live tensors (as
  CUDA's max_memory_allocated does) instead of the heap glibc keeps after a free;
- time: the median step of a child with glibc's default allocator, as training runs. Under the
  fixed threshold every large buffer is mapped and page-faulted anew in every step, which costs
  N micro-steps more than one shot (they allocate more buffers in all) and is no cost of training.
The counts are measured in `--rounds` interleaved rounds (1, 2, 4, 1, 2, 4, ...), so that a shared
machine's load falls on all of them alike; each figure is the median over the rounds.

    python benchmarks/bench_accumulation.py [--steps 3] [--rounds 3] [--crop 256] [--batch 8] [--threads 2]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

KIB = 1024
MIB = 1024**2
DEMO_CLASSES = 7
GROUP_SIZE = 2
MICRO_STEPS = (1, 2, 4)
MMAP_THRESHOLD_BYTES = 64 * 1024  # buffers above it are separate mappings (see the module docstring)
MEMORY_STEPS = 1  # after the warm-up step, which creates the momentum buffers: the peak is reached by then


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:  # resident pages now (Linux)
        return int(handle.read().split()[1]) * resource.getpagesize()


def _child(micro_steps: int, steps: int, crop: int, batch: int, threads: int) -> None:
    import torch

    from allspark_cli.engine.training.accumulation import accumulated_step
    from allspark_cli.engine.training.losses import build_criterion
    from allspark_cli.engine.training.step import StepRecipe, TrainForward
    from allspark_cli.model.config import ModelConfig, build_model, tokens_for_crop

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="b0", method="allspark", num_classes=DEMO_CLASSES, head_dim=128,
                                    memory_tokens=tokens_for_crop(crop))).train()
    runner, criterion = TrainForward(model), build_criterion("ce", ohem_thresh=0.7, ohem_min_kept=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(2 * batch, 3, crop, crop)
    batch_l = (images[:batch], torch.randint(0, DEMO_CLASSES, (batch, crop, crop)))
    batch_u = (images[batch:], torch.zeros(batch, crop, crop, dtype=torch.long), torch.arange(batch))
    recipe = StepRecipe(groups=batch // GROUP_SIZE)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        accumulated_step(runner, model, batch_l, batch_u, micro_steps=micro_steps, backward=lambda loss: loss.backward(),
                         criterion_l=criterion, use_memory=True, iteration=0, gather=None,
                         autocast=contextlib.nullcontext, recipe=recipe)
        optimizer.step()

    before = _rss_bytes()
    step()  # warm-up: also creates the optimizer's momentum buffers
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB
    print(json.dumps({"seconds": statistics.median(times), "peak": peak, "step_memory": peak - before}))


def _run_child(args: argparse.Namespace, micro_steps: int, *, memory: bool) -> dict:
    steps = MEMORY_STEPS if memory else args.steps
    command = [sys.executable, __file__, "--child", str(micro_steps), "--steps", str(steps), "--crop",
               str(args.crop), "--batch", str(args.batch), "--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)} if memory else None
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args.child, args.steps, args.crop, args.batch, args.threads)
        return
    seconds = {micro_steps: [] for micro_steps in MICRO_STEPS}
    memory = {micro_steps: _run_child(args, micro_steps, memory=True) for micro_steps in MICRO_STEPS}
    for _ in range(args.rounds):
        for micro_steps in MICRO_STEPS:
            seconds[micro_steps].append(_run_child(args, micro_steps, memory=False)["seconds"])
    median = {micro_steps: statistics.median(times) for micro_steps, times in seconds.items()}
    base, base_memory = median[1], memory[1]["step_memory"]
    print(f"one step, MiT-B0 allspark, {args.batch} + {args.batch} at crop {args.crop} in groups of {GROUP_SIZE}, "
          f"CPU {args.threads} threads (median of {args.steps} steps, median of {args.rounds} rounds)")
    print(f"{'micro-steps':>11} {'s/step':>8} {'vs 1':>6} {'step memory':>12} {'vs 1':>6} {'peak RSS':>10}  rounds (s)")
    for micro_steps in MICRO_STEPS:
        row = memory[micro_steps]
        rounds = " ".join(f"{value:.2f}" for value in seconds[micro_steps])
        print(f"{micro_steps:>11} {median[micro_steps]:>8.2f} {median[micro_steps] / base:>5.2f}x "
              f"{row['step_memory'] / MIB:>9.0f} MiB {row['step_memory'] / base_memory:>5.2f}x "
              f"{row['peak'] / MIB:>6.0f} MiB  {rounds}")


if __name__ == "__main__":
    main()
