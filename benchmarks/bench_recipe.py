"""What the weak-to-strong recipe costs: training s/it of a demo run under each recipe, data loading
included, and the unlabeled loader's samples/s with and without the strong view.

Trains `demo-1/16` (method allspark, the preset's batch and crop, `--workers 2`) for a short epoch
under `reference`, `weak-to-strong` and weak-to-strong with `train.distribution_alignment`, taking
turns for `--rounds` rounds so a slow spell of the machine hits all of them; reads `seconds_per_iteration` of each logged window from
metrics.jsonl, drops the first window (start-up, loader warm-up) and reports the median. Then times
`UnlabeledDataset[i]` in this process (one thread) for both views.

    python benchmarks/bench_recipe.py --data data/demo [--iterations 60] [--rounds 2] [--method allspark]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

# Row name -> (train.recipe, extra --set lines): the recipes, and weak-to-strong with its option.
VARIANTS = {
    "reference": ("reference", []),
    "weak-to-strong": ("weak-to-strong", []),
    "w2s + alignment": ("weak-to-strong", ["train.distribution_alignment=true"]),
}
LOG_EVERY = 10
LOADER_SAMPLES = 200


def train_seconds_per_iteration(data: Path, variant: str, method: str, iterations: int, root: Path) -> float:
    from allspark_cli.engine.settings_layers import build_settings
    from allspark_cli.engine.training.presets import find_preset
    from allspark_cli.engine.training.train import train

    recipe, extra = VARIANTS[variant]
    sets = [f"data.manifest={data}", "train.epochs=1", f"train.epoch_iterations={iterations}", "data.workers=2",
            f"train.recipe={recipe}", f"model.method={method}", f"train.log_every={LOG_EVERY}", f"run.root={root}",
            "run.tensorboard='off'", "eval.mosaic_images=0", *extra]
    done = train(build_settings(base=find_preset("demo-1/16").layer, sets=sets))
    records = [json.loads(line) for line in (done.run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(record["seconds_per_iteration"] for record in records[1:])


def loader_rate(data: Path, strong_view: bool) -> float:
    import cv2
    import torch

    from allspark_cli.data.datasets import build_train_datasets
    from allspark_cli.data.manifest import load_manifest

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    manifest = load_manifest(data)
    dataset = build_train_datasets(manifest, "1/16", crop=128, seed=0, strong_view=strong_view).unlabeled
    began = time.perf_counter()
    for index in range(LOADER_SAMPLES):
        dataset[index % len(dataset)]
    return LOADER_SAMPLES / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the demo dataset (allspark prepare demo)")
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--method", default="allspark")
    args = parser.parse_args()
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for index, variant in enumerate(VARIANTS):
                root = Path(tmp) / f"{index}-{round_index}"
                times[variant].append(train_seconds_per_iteration(args.data, variant, args.method, args.iterations, root))
    rates = {recipe: loader_rate(args.data, recipe == "weak-to-strong") for recipe in ("reference", "weak-to-strong")}
    base = statistics.median(times["reference"])
    print(f"demo-1/16, {args.method}, workers 2, {args.iterations} iterations x {args.rounds} rounds per variant")
    print(f"{'variant':<16} {'train s/it':>18} {'vs reference':>13} {'unlabeled samples/s':>20}")
    for variant, (recipe, _) in VARIANTS.items():
        median = statistics.median(times[variant])
        spread = ", ".join(f"{t:.3f}" for t in times[variant])
        print(f"{variant:<16} {median:>7.3f} ({spread}) {median / base:>12.2f}x {rates[recipe]:>20.1f}")

if __name__ == "__main__":
    main()
