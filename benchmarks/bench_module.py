"""Speed and memory of the AllSpark module alone: one training forward + backward after warm-up
(memory read as keys/values, memory update included), at the paper's sizes.

    python benchmarks/bench_module.py                 # CPU (and CUDA if present), default grid
    python benchmarks/bench_module.py --full          # every setting x memory length x precision
    python benchmarks/bench_module.py --only pascal --memory 1 --precision fp32

Settings (C = 512, 2 heads, batch 2 labeled + 2 unlabeled): pascal 17x17 tokens K = 21, coco 17x17
K = 81, cityscapes 26x26 K = 19; memory 1x, 2x, 4x C; fp32 and bf16 autocast.
Each configuration runs in a fresh subprocess. Peak growth is measured on the step after a
warm-up step: on CPU the resident set sampled every millisecond during the step, minus the level
before it, plus the scratch buffers that the module keeps from one step to the next (resident
before the step, and part of what the step needs), in a second child whose glibc mmap threshold is
pinned at 1 MiB so that freed tensors leave the resident set at once (times come from a child with
the default allocator); on CUDA max_memory_allocated minus memory_allocated before the step.
GFLOP are counted by torch's
FlopCounterMode on one step; the achieved rate is set next to the machine's own matrix-multiply
rate, measured here on square matrices (the better of torch.mm and, for float32 on CPU, oneDNN).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

SETTINGS = {  # name: (token grid side, classes)
    "pascal": (17, 21),
    "coco": (17, 81),
    "cityscapes": (26, 19),
}
CHANNELS = 512
HEADS = 2
BATCH = 2
MATMUL_SIZE = 2048
# glibc raises its mmap threshold as large blocks are freed and then keeps freed tensors in the
# heap, so the resident set would track the allocator's history rather than live memory. A fixed
# threshold returns every large block to the OS when it is freed.
# The time comes from a child with the default allocator (the pinned threshold slows every
# allocation down), the peak memory from a second child with the pinned threshold.
MEMORY_CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_rate(device: str, dtype: torch.dtype, repeats: int = 10) -> float:
    """GFLOP/s of square matrix products on this machine: the better of torch.mm and, for float32 on
    CPU, the oneDNN operator the attention uses (faster than torch.mm's MKL on some processors), so
    that the step is compared with the best rate the machine offers."""
    from allspark_cli.model.products import matmul_nt

    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=dtype)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=dtype)
    # matmul_nt is the attention's own product: oneDNN where it applies, torch.mm otherwise.
    products = [lambda: a @ b, lambda: matmul_nt(a, b)]
    rates = []
    for product in products:
        for _ in range(2):
            product()
        _sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            product()
            _sync(device)
            times.append(time.perf_counter() - start)
        rates.append(2 * MATMUL_SIZE**3 / statistics.median(times) / 1e9)
    return max(rates)


def _addmm_flop(total_shape, left_shape, right_shape, *args, **kwargs) -> int:
    return 2 * left_shape[0] * left_shape[1] * right_shape[1]


def _linear_pointwise_flop(input_shape, weight_shape, *args, **kwargs) -> int:
    return 2 * math.prod(input_shape) * weight_shape[0]


# Products torch's FlopCounterMode does not know: in-place addmm_ and oneDNN's linear operator.
_EXTRA_FLOP_FORMULAS = {torch.ops.aten.addmm_: _addmm_flop}
if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    _EXTRA_FLOP_FORMULAS[torch.ops.mkldnn._linear_pointwise] = _linear_pointwise_flop


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Samples the resident set every millisecond while a block runs (torch ops release the GIL)."""

    def __init__(self) -> None:
        self.peak = 0
        self._running = False

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __enter__(self) -> RssPeak:
        self.peak, self._running = _rss_bytes(), True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _release_freed_memory() -> None:
    """Hands memory that the allocator keeps after frees back to the OS (glibc), so the next step's
    growth is measured from what is really in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def run_one(setting: str, memory_multiple: int, precision: str, device: str, repeats: int) -> dict:
    """One configuration, in this process: a warm-up step, one step measured for peak growth, the
    median of `repeats` timed steps (the warm-up step's time when repeats is 0), one counted step."""
    from torch.utils.flop_counter import FlopCounterMode

    from allspark_cli.model.allspark import AllSparkModule, MemoryStep

    side, classes = SETTINGS[setting]
    torch.manual_seed(0)
    module = AllSparkModule(
        CHANNELS, classes, HEADS, memory_multiple=memory_multiple, memory_tokens=side * side
    ).to(device).train()
    features = torch.randn(2 * BATCH, CHANNELS, side, side, device=device, requires_grad=True)
    pseudo_logits = torch.randn(BATCH, classes, side * 4, side * 4, device=device)
    memory_step = MemoryStep(pseudo_logits, use_memory=True)
    upstream = torch.randn(2 * BATCH, CHANNELS, side, side, device=device)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        with autocast:
            out_l, out_u = module.forward_train(features[:BATCH], features[BATCH:], memory_step=memory_step)
        (torch.cat([out_l, out_u]).float() * upstream).sum().backward()
        module.zero_grad(set_to_none=True)
        features.grad = None

    start = time.perf_counter()
    step()  # warm-up: one-off library initialisation and allocator growth are not the module's
    _sync(device)
    first = time.perf_counter() - start
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        _release_freed_memory()
        before = _rss_bytes()
        held = module.labeled_attention.scratch.nbytes  # kept since the warm-up step, so in `before`
        with RssPeak() as sampler:
            step()
        peak = sampler.peak - before + held
    times = [first] if repeats < 1 else []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    with counter:
        step()
    return {
        "setting": setting,
        "memory": f"{memory_multiple}x C",
        "precision": precision,
        "device": device,
        "median_s": statistics.median(times),
        "peak_growth_gb": peak / 2**30,
        "gflop": counter.get_total_flops() / 1e9,
    }


def _run_child(child: str, env: dict[str, str]) -> dict | None:
    result = subprocess.run([sys.executable, __file__, "--child", child], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        print(f"{child}: failed: {result.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(SETTINGS), action="append", help="settings to run (default all)")
    parser.add_argument("--memory", type=int, action="append", help="memory multiples (default 1 2 4 for pascal, 1 else)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], action="append")
    parser.add_argument("--device", action="append", help="cpu, cuda (default: cpu, plus cuda when present)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after the first (median)")
    parser.add_argument("--full", action="store_true", help="every memory length for every setting")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # one configuration in a fresh process
        setting, memory, precision, device, repeats = args.child.split(",")
        print(json.dumps(run_one(setting, int(memory), precision, device, int(repeats))))
        return

    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    for device in devices:
        rates = {p: matmul_rate(device, torch.float32 if p == "fp32" else torch.bfloat16) for p in ("fp32", "bf16")}
        print(f"{device}: matrix multiply {rates['fp32']:.0f} GFLOP/s fp32, {rates['bf16']:.0f} GFLOP/s bf16 "
              f"({torch.get_num_threads()} threads)", flush=True)
        for setting in args.only or list(SETTINGS):
            multiples = args.memory or ([1, 2, 4] if (setting == "pascal" or args.full) else [1])
            for memory in multiples:
                for precision in args.precision or ["fp32", "bf16"]:
                    child = f"{setting},{memory},{precision},{device},{args.repeats}"
                    timed = _run_child(child, dict(os.environ))
                    # The memory child needs no timed repeats: warm-up, measured step, counted step.
                    sized = _run_child(f"{setting},{memory},{precision},{device},0", MEMORY_CHILD_ENV)
                    if timed is None or sized is None:
                        continue
                    row = {**timed, "peak_growth_gb": sized["peak_growth_gb"]}
                    row["gflops_per_s"] = row["gflop"] / row["median_s"]
                    row["matmul_fraction"] = row["gflops_per_s"] / rates[precision]
                    rows.append(row)
                    print(
                        f"| {device} | {setting} | {row['memory']} | {precision} | {row['median_s']:.2f} s | "
                        f"{row['peak_growth_gb']:.2f} GB | {row['gflop']:.0f} | {row['gflops_per_s']:.0f} "
                        f"({100 * row['matmul_fraction']:.0f}% of matmul) |",
                        flush=True,
                    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
