"""The CUDA math flags of a training run (settable, and restored by the evaluation's context) and
their settings' defaults."""
from __future__ import annotations

import pytest
import torch

from allspark_cli.engine.precision import configure_cuda_math, cudnn_benchmark_off
from allspark_cli.engine.settings import LoopSettings


@pytest.fixture
def saved_flags():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


@pytest.mark.parametrize("tf32,benchmark", [(True, True), (False, False), (True, False)])
def test_configure_sets_the_matmul_and_benchmark_flags_and_leaves_convolutions_to_torch(saved_flags, tf32,
                                                                                       benchmark):
    conv_default = torch.backends.cudnn.allow_tf32
    configure_cuda_math(tf32=tf32, cudnn_benchmark=benchmark)
    assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is conv_default
    assert torch.backends.cudnn.benchmark is benchmark


def test_evaluation_turns_the_algorithm_search_off_and_restores_it(saved_flags):
    configure_cuda_math(tf32=True, cudnn_benchmark=True)
    with cudnn_benchmark_off():
        assert torch.backends.cudnn.benchmark is False
    assert torch.backends.cudnn.benchmark is True


def test_training_defaults_are_the_reference_arithmetic():
    """The reference ran torch 1.12: matrix products in full float32, cudnn.benchmark on."""
    loop = LoopSettings()
    assert loop.tf32 is False and loop.cudnn_benchmark is True
