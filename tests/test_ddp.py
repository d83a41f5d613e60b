"""Two-process DDP on CPU (gloo): the Semantic Memory is identical on both ranks after training,
every rank saw different images, and only rank 0 wrote the run folder."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp
from train_fixtures import free_port, make_dataset, tiny_layer

from allspark_cli.engine.settings_layers import build_settings
from allspark_cli.engine.training.train import train

WORLD_SIZE = 2


def _worker(rank: int, port: int, manifest: str, out: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(WORLD_SIZE), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    # 4 unlabeled images, global batch 2 (1 per rank): 2 steps per epoch; memory read from epoch 2.
    layer = tiny_layer(Path(manifest), Path(out) / "runs", train={"epochs": 2, "warmup_epochs": 1},
                       eval={"every": 2})
    result = train(build_settings(base=layer))
    memory = result.model.memory
    torch.save({"bank": memory.bank, "pointer": memory.pointer, "source_sample": memory.source_sample,
                "miou": result.best_miou}, Path(out) / f"rank{rank}.pt")


def test_memory_is_identical_on_both_ranks(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path / "data")
    mp.spawn(_worker, args=(free_port(), str(manifest), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE))
    assert torch.equal(rank0["bank"], rank1["bank"]) and torch.equal(rank0["pointer"], rank1["pointer"])
    written = rank0["source_sample"][rank0["source_sample"] >= 0]
    assert set(written.tolist()) == {0, 1, 2, 3}  # both ranks' unlabeled images reached the memory
    assert rank0["miou"] == rank1["miou"]  # the confusion matrix is reduced over both ranks
    runs = list((tmp_path / "runs" / "tiny").iterdir())
    assert [r.name for r in runs] == ["exp"] and (runs[0] / "weights" / "last.pt").is_file()
