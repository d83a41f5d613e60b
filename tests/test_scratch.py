"""The scratch pool hands buffers from one call to the next, never to two owners at once."""
from __future__ import annotations

import pytest
import torch

from allspark_cli.model import scratch
from allspark_cli.model.scratch import ScratchPool


def test_a_buffer_given_back_is_reused_and_is_no_longer_in_the_pool_while_taken():
    pool = ScratchPool()
    first = pool.take(100, torch.float32, "cpu")
    pool.give(first.view(10, 10))  # a view returns the whole flat buffer
    assert pool.nbytes == 400
    again = pool.take(60, torch.float32, "cpu")
    assert again.data_ptr() == first.data_ptr() and again.numel() == 60
    assert pool.nbytes == 0  # taken: a second take cannot get it
    other = pool.take(60, torch.float32, "cpu")
    assert other.data_ptr() != again.data_ptr()


def test_take_picks_the_smallest_fitting_buffer_of_the_same_dtype():
    pool = ScratchPool()
    small, large, doubles = (pool.take(n, dtype, "cpu") for n, dtype in ((50, torch.float32), (500, torch.float32),
                                                                          (80, torch.float64)))
    pool.give(large, small, doubles)
    assert pool.take(40, torch.float32, "cpu").data_ptr() == small.data_ptr()
    assert pool.take(60, torch.float32, "cpu").data_ptr() == large.data_ptr()
    assert pool.take(60, torch.float64, "cpu").data_ptr() == doubles.data_ptr()


def test_the_pool_keeps_at_most_its_limit_dropping_the_smallest(monkeypatch):
    monkeypatch.setattr(scratch, "MAX_POOLED_BUFFERS", 2)
    pool = ScratchPool()
    buffers = [pool.take(n, torch.float32, "cpu") for n in (30, 10, 20)]
    pool.give(*buffers)
    assert sorted(b.numel() for b in pool._free) == [20, 30]
    pool.give(buffers[2])  # already pooled: not added twice
    assert len(pool._free) == 2
    pool.clear()
    assert pool.nbytes == 0


def test_only_flat_pool_buffers_can_be_given_back():
    with pytest.raises(ValueError, match="ScratchPool.take"):
        ScratchPool().give(torch.empty(3, 4))


def test_the_pool_survives_the_training_steps_eval_switch_and_its_buffers_are_reused():
    """The training step runs its pseudo-label pass in eval mode every iteration: the cross-attention
    keeps its pool across eval()/train(), and the next step takes its buffers instead of new ones."""
    from allspark_cli.model.allspark import ChannelCrossAttention

    layer = ChannelCrossAttention(8, 2).train()
    tokens, sources = torch.randn(2, 6, 8, requires_grad=True), torch.randn(3, 6, 8)
    layer(tokens, sources).sum().backward()
    pooled = {buffer.data_ptr() for buffer in layer.scratch._free}
    held = layer.scratch.nbytes
    assert pooled and held > 0
    layer.eval()
    with torch.no_grad():
        layer.forward_self(tokens)  # the pseudo-label pass
    layer.train()
    assert layer.scratch.nbytes == held
    taken = []
    original_take = layer.scratch.take

    def spy(*args):
        buffer = original_take(*args)
        taken.append(buffer.data_ptr())
        return buffer

    layer.scratch.take = spy
    layer(tokens, sources).sum().backward()
    assert taken and set(taken) <= pooled  # every buffer of the second step came from the first
    assert "scratch" not in "".join(layer.state_dict())  # never saved
    layer.scratch.clear()
    assert layer.scratch.nbytes == 0
