"""Process-group helpers for single- and multi-process training (torchrun), with no side effects.

`init_distributed()` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK); without it the
run is one process and every helper here is the identity. Backends: NCCL on CUDA, gloo on CPU.
Nothing here patches `print`, touches settings, or writes files: callers decide what rank 0 does
(`DistInfo.rank == 0`).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

from allspark_cli.errors import EnvError

DEVICE_AUTO = "auto"


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank among `world_size` processes and its torch device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(request: str, local_rank: int = 0) -> torch.device:
    """`auto` -> CUDA when present (this process's local GPU) else CPU; `cpu`; `cuda`; `cuda:N`.

    Raises EnvError when CUDA is asked for but absent, or the index does not exist.
    """
    request = request.strip().lower()
    if request == DEVICE_AUTO:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if request == "cpu":
        return torch.device("cpu")
    if request.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EnvError(f"device {request!r} asked for, but no CUDA GPU is available here; use --device cpu")
        index_text = request.partition(":")[2]
        if index_text and not index_text.isdigit():
            raise EnvError(f"device {request!r} is not cpu, cuda, cuda:N or auto")
        index = int(index_text) if index_text else local_rank
        if index >= torch.cuda.device_count():
            raise EnvError(f"device {request!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    raise EnvError(f"device {request!r} is not cpu, cuda, cuda:N or auto")


def torchrun_environment() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's variables, or None when not launched by it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return rank, world_size, local_rank


def check_device_for_world(request: str, world_size: int) -> None:
    """EnvError for `cuda:N` in a multi-process run: it would put every rank on GPU N."""
    text = request.strip().lower()
    if world_size > 1 and text.startswith("cuda:"):
        raise EnvError(
            f"--device {text} under torchrun (WORLD_SIZE={world_size}) would put every rank on the same GPU; "
            "use --device cuda or auto (each rank takes GPU LOCAL_RANK), and CUDA_VISIBLE_DEVICES to pick GPUs"
        )


def launched_rank() -> int:
    """This process's rank as torchrun launched it (0 without torchrun); readable without a group."""
    env = torchrun_environment()
    return 0 if env is None else env[0]


def init_distributed(device: str = DEVICE_AUTO) -> DistInfo:
    """Joins the torchrun process group if there is one; returns this process's DistInfo.

    The device is resolved first (EnvError before any group is created); the backend follows it.
    Calling it again in a process that already joined reuses the group.
    """
    env = torchrun_environment()
    rank, world_size, local_rank = env if env is not None else (0, 1, 0)
    check_device_for_world(device, world_size)
    resolved = resolve_device(device, local_rank)
    if world_size > 1 and not torch_dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def shutdown_distributed(dist: DistInfo) -> None:
    """Leaves the process group (no-op for one process)."""
    if dist.is_distributed and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def _active() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        torch_dist.barrier()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum (or max) over all ranks; the identity for one process. Returns `tensor`."""
    if _active():
        reduce_op = torch_dist.ReduceOp.MAX if op == "max" else torch_dist.ReduceOp.SUM
        torch_dist.all_reduce(tensor, op=reduce_op)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates `tensor` from every rank along dim 0, in rank order (no gradient).

    Every rank must pass the same shape (DistributedSampler-style equal shards guarantee it).
    One process: returns `tensor` itself.
    """
    if not _active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def broadcast_object(value: object, src: int = 0) -> object:
    """Rank `src`'s Python object on every rank (pickle-able values only)."""
    if not _active():
        return value
    holder = [value]
    torch_dist.broadcast_object_list(holder, src=src)
    return holder[0]


def _with_layout_of(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """`grad` relabelled with the strides of `param` when the two differ only on size-1 dimensions
    (the same memory layout: a view, no copy); otherwise `grad` as it is."""
    if grad.stride() == param.stride() or grad.shape != param.shape:
        return grad
    differ = [size != 1 and a != b for size, a, b in zip(grad.shape, grad.stride(), param.stride())]
    return grad if any(differ) else grad.as_strided(grad.shape, param.stride())


def match_gradient_layout_(module: nn.Module) -> nn.Module:
    """Makes every gradient of `module` carry its parameter's strides, as DDP's buckets do.

    The backward of a depthwise convolution on CPU returns the weight gradient of a (C, 1, 3, 3)
    weight with strides [9, 1, 3, 1] against the weight's [9, 9, 3, 1]: the stride of a size-1
    dimension is never used, so the bytes are laid out alike, but DDP compares the strides, warns
    ("Grad strides do not match bucket view strides") and copies the gradient by the slow path.
    A hook relabels such gradients before they reach DDP. Returns `module`."""
    for param in module.parameters():
        if param.requires_grad and 1 in param.shape:
            param.register_hook(functools.partial(_with_layout_of, param))
    return module
