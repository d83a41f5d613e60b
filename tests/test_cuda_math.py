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
def test_configure_sets_the_three_flags(saved_flags, tf32, benchmark):
    configure_cuda_math(tf32=tf32, cudnn_benchmark=benchmark)
    assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    assert torch.backends.cudnn.benchmark is benchmark


def test_evaluation_turns_the_algorithm_search_off_and_restores_it(saved_flags):
    configure_cuda_math(tf32=True, cudnn_benchmark=True)
    with cudnn_benchmark_off():
        assert torch.backends.cudnn.benchmark is False
    assert torch.backends.cudnn.benchmark is True


def test_training_defaults_are_tf32_and_benchmark():
    loop = LoopSettings()
    assert loop.tf32 is True and loop.cudnn_benchmark is True
