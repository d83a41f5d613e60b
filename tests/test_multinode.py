"""Several machines by torchrun's c10d rendezvous, as the README's multi-node recipe launches them:
two "nodes" of one process each on localhost (gloo), each started with

    python -m torch.distributed.run --nnodes 2 --nproc_per_node 1 --rdzv-backend c10d \\
        --rdzv-endpoint localhost:PORT -m allspark_cli train --config tiny.yaml

Both ranks must end with the same Semantic Memory, rank 0 alone writes the run folder and prints
the summary, and DDP must not warn about gradient strides. The memory of each rank is read through
a `sitecustomize` on the workers' path that wraps `engine.train` (the launch itself is unchanged)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from allspark_cli.engine.distributed import check_device_for_world
from allspark_cli.errors import EnvError
from train_fixtures import free_port, make_dataset, tiny_layer

ROOT = Path(__file__).resolve().parents[1]
NODES = 2
LAUNCH_TIMEOUT_S = 300

PROBE = '''
import os
if os.environ.get("ALLSPARK_TEST_MEMORY_DIR"):
    import torch
    from allspark_cli.engine.training import train as engine

    def _train_and_dump(settings, _train=engine.train, **kwargs):
        result = _train(settings, **kwargs)
        memory = result.model.memory
        torch.save({"bank": memory.bank, "pointer": memory.pointer, "source_sample": memory.source_sample},
                   os.path.join(os.environ["ALLSPARK_TEST_MEMORY_DIR"], "rank%s.pt" % os.environ["RANK"]))
        return result

    engine.train = _train_and_dump
'''


@pytest.mark.parametrize("epochs", [pytest.param(1, id="one-epoch"), pytest.param(3, id="three-epochs", marks=pytest.mark.slow)])
def test_two_nodes_by_rendezvous_hold_one_memory_and_rank_0_alone_writes(tmp_path: Path, epochs: int) -> None:
    manifest = make_dataset(tmp_path / "data")
    # 4 unlabeled images, global batch 2 (1 per node): 2 steps per epoch, the memory read from the first
    # (one epoch) or after a warm-up epoch, with an evaluation in between (three epochs).
    layer = tiny_layer(manifest, tmp_path / "runs", train={"epochs": epochs, "warmup_epochs": min(1, epochs - 1)},
                       eval={"every": 2})
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(layer))
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(probe), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "ALLSPARK_TEST_MEMORY_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES), "--nproc_per_node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{free_port()}",
               "-m", "allspark_cli", "train", "--config", str(config)]
    nodes = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(NODES)]
    outputs = [node.communicate(timeout=LAUNCH_TIMEOUT_S) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stdout + stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(NODES))
    assert torch.equal(rank0["bank"], rank1["bank"]) and torch.equal(rank0["pointer"], rank1["pointer"])
    written = rank0["source_sample"][rank0["source_sample"] >= 0]
    assert set(written.tolist()) == {0, 1, 2, 3}  # both nodes' unlabeled images reached the memory
    runs = list((tmp_path / "runs" / "tiny").iterdir())
    assert [run.name for run in runs] == ["exp"] and (runs[0] / "weights" / "last.pt").is_file()
    stdout = "".join(out for out, _ in outputs)
    assert stdout.count("done:") == 1
    assert "Grad strides do not match" not in "".join(err for _, err in outputs)


def test_cuda_index_is_refused_when_several_processes_run() -> None:
    with pytest.raises(EnvError, match=r"--device cuda:1 under torchrun \(WORLD_SIZE=2\) would put every rank on"):
        check_device_for_world("cuda:1", world_size=2)
    for request, world_size in (("cuda:1", 1), ("cuda", 2), ("auto", 4), ("cpu", 2)):
        check_device_for_world(request, world_size)


def test_gradients_take_their_parameters_strides_without_a_copy() -> None:
    """A (C, 1, 3, 3) depthwise weight whose gradient comes with strides [9, 1, 3, 1]: relabelled as
    [9, 9, 3, 1] (the same bytes), so DDP's bucket views match; real layout differences are kept."""
    from allspark_cli.engine.distributed import match_gradient_layout_

    conv = torch.nn.Conv2d(4, 4, 3, groups=4, bias=False)
    match_gradient_layout_(conv)
    odd = torch.randn(4, 3, 3).unsqueeze(1).as_strided((4, 1, 3, 3), (9, 1, 3, 1))
    conv.weight.backward(odd)
    assert conv.weight.grad.stride() == conv.weight.stride() and torch.equal(conv.weight.grad, odd)
    assert conv.weight.grad.data_ptr() == odd.data_ptr()
    conv.weight.grad = None
    transposed = torch.randn(4, 1, 3, 3).transpose(2, 3)  # a different layout: left to autograd's own rule
    conv.weight.backward(transposed)
    assert torch.equal(conv.weight.grad, transposed)
