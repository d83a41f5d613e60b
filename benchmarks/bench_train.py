"""Speed and memory of one training iteration: pseudo pass + forward + backward + SGD step.

MiT-B0 at the demo crop (128) on CPU, and MiT-B5 at 513 with E = 768 on CUDA when a GPU is
present (the paper's per-GPU batch: 2 labeled + 2 unlabeled). Synthetic inputs, random weights;
median over the timed iterations after warm-up. Peak memory: CUDA allocator peak, or the process's
peak resident set size on CPU. Prints a table.

    python benchmarks/bench_train.py [--iterations 10] [--threads 2] [--method allspark]
        [--groups 2] [--pseudo-label-pass group|image]

`--groups` splits each batch into the reference's per-GPU groups (demo presets: 4 + 4 in groups of
2; CUDA row: 2 + 2 in one group), `--pseudo-label-pass` is `train.pseudo_label_pass`.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from allspark_cli.engine.training.losses import build_criterion
from allspark_cli.engine.precision import autocast_factory
from allspark_cli.engine.training.step import StepRecipe, TrainForward, train_step
from allspark_cli.model.config import ModelConfig, build_model, tokens_for_crop

DEMO_CLASSES = 7  # the demo dataset's K (CPU row)
PASCAL_CLASSES = 21  # the paper's K (CUDA row)
WARMUP_ITERATIONS = 2
KIB = 1024


def bench(backbone: str, crop: int, batch: int, head_dim: int, device: torch.device, method: str, iterations: int,
          amp: str, num_classes: int, recipe: StepRecipe = StepRecipe()) -> dict:
    config = ModelConfig(backbone=backbone, method=method, num_classes=num_classes, head_dim=head_dim,
                         memory_tokens=tokens_for_crop(crop))
    model = build_model(config).to(device).train()
    runner = TrainForward(model)
    groups = [{"params": model.backbone_parameters()}, {"params": model.head_parameters()}]
    optimizer = torch.optim.SGD(groups, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    criterion = build_criterion("ce", ohem_thresh=0.7, ohem_min_kept=1)
    images_l = torch.randn(batch, 3, crop, crop, device=device)
    masks_l = torch.randint(0, num_classes, (batch, crop, crop), device=device)
    images_u = torch.randn(batch, 3, crop, crop, device=device)
    pad = torch.zeros(batch, crop, crop, dtype=torch.int64, device=device)
    ids = torch.arange(batch, device=device)
    autocast = autocast_factory(amp, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for index in range(WARMUP_ITERATIONS + iterations):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        losses = train_step(runner, model, (images_l, masks_l), (images_u, pad, ids), criterion_l=criterion,
                            use_memory=True, iteration=index, gather=None, autocast=autocast, recipe=recipe)
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= WARMUP_ITERATIONS:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / KIB**3
        where = "GPU"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB**2  # Linux reports KiB
        where = "RSS"
    seconds = statistics.median(times)
    return {"model": f"MiT-{backbone.upper()} E={head_dim} K={num_classes}", "device": str(device), "crop": crop,
            "batch": f"{batch}+{batch} /{batch // recipe.groups}", "pass": recipe.pseudo_label_pass, "amp": amp, "s/it": seconds, "img/s": 2 * batch / seconds,
            "peak": f"{peak:.2f} GiB ({where})"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", default="allspark")
    parser.add_argument("--cpu-head-dim", type=int, default=128, help="E of the demo presets")
    parser.add_argument("--cpu-batch", type=int, default=4, help="images of each kind (demo presets: 4+4)")
    parser.add_argument("--groups", type=int, default=2, help="groups of the CPU batch (demo presets: 2)")
    parser.add_argument("--pseudo-label-pass", choices=("group", "image"), default="group")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [bench("b0", 128, args.cpu_batch, args.cpu_head_dim, torch.device("cpu"), args.method, args.iterations, "off",
                  DEMO_CLASSES, StepRecipe(args.groups, args.pseudo_label_pass))]
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        for amp in ("off", "bf16"):  # one reference GPU: 2 + 2, one group
            rows.append(bench("b5", 513, 2, 768, cuda, args.method, args.iterations, amp, PASCAL_CLASSES,
                              StepRecipe(1, args.pseudo_label_pass)))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"one training iteration ({args.method}; pseudo pass + forward + backward + step)")
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()])
    Console().print(table)


if __name__ == "__main__":
    main()
