"""Semantic Memory ring buffers and Channel-wise Semantic Grouping (DESIGN.md section 1)."""
from __future__ import annotations

import torch

from allspark_cli.model.memory import NEVER_WRITTEN, SemanticMemory, group_channels


def _tokens_with_ids(B: int, N: int, C: int) -> torch.Tensor:
    """(B, N, C) tokens whose channel c of image b is the constant b*C + c (so writes are traceable)."""
    ids = torch.arange(B * C, dtype=torch.float32).view(B, 1, C)
    return ids.expand(B, N, C).clone()


def test_write_places_items_by_class_rank_and_advances_pointers():
    memory = SemanticMemory(num_classes=3, multiple=1, tokens=2, channels=4)
    tokens = _tokens_with_ids(B=2, N=2, C=4)
    classes = torch.tensor([[1, 0, 1, 2], [1, 1, 0, 0]])
    memory.write(tokens, classes, sample_ids=torch.tensor([10, 11]), iteration=7)
    # class 0 gets items (image 0, ch 1), (1, 2), (1, 3) -> ids 1, 6, 7 in slots 0, 1, 2
    assert memory.bank[0, :3, 0].tolist() == [1.0, 6.0, 7.0]
    # class 1 gets ids 0, 2, 4, 5 -> slots 0..3
    assert memory.bank[1, :, 0].tolist() == [0.0, 2.0, 4.0, 5.0]
    assert memory.bank[2, 0, 0].item() == 3.0
    assert memory.pointer.tolist() == [3, 0, 1]
    assert memory.source_sample[1].tolist() == [10, 10, 11, 11]
    assert memory.source_channel[1].tolist() == [0, 2, 0, 1]
    assert memory.source_iteration[0].tolist() == [7, 7, 7, NEVER_WRITTEN]
    assert memory.assigned_count.tolist() == [3, 4, 1]


def test_ring_wraps_around():
    memory = SemanticMemory(num_classes=2, multiple=2, tokens=1, channels=2)
    memory.pointer.copy_(torch.tensor([3, 0]))
    tokens = _tokens_with_ids(B=1, N=1, C=2)
    memory.write(tokens, torch.tensor([[0, 0]]))
    assert memory.bank[0, 3, 0].item() == 0.0 and memory.bank[0, 0, 0].item() == 1.0
    assert memory.pointer.tolist() == [1, 0]


def test_more_than_slots_items_in_one_update_later_ones_win():
    memory = SemanticMemory(num_classes=2, multiple=1, tokens=1, channels=2)
    tokens = _tokens_with_ids(B=3, N=1, C=2)  # 6 items, all to class 1
    memory.write(tokens, torch.ones(3, 2, dtype=torch.long))
    # ranks 0..5 -> slots 0,1,0,1,0,1; the last two items (ids 4, 5) survive
    assert memory.bank[1, :, 0].tolist() == [4.0, 5.0]
    assert memory.pointer.tolist() == [0, 0]  # 6 mod 2
    assert memory.source_channel[1].tolist() == [0, 1]


def test_blind_enqueue_fills_one_ring_across_classes():
    memory = SemanticMemory(num_classes=2, multiple=1, tokens=1, channels=2)
    tokens = _tokens_with_ids(B=2, N=1, C=2)
    memory.write(tokens, None)
    assert memory.bank[:, :, 0].flatten().tolist() == [0.0, 1.0, 2.0, 3.0]
    memory.write(tokens[:1] + 100, None)  # wraps to the start of the single K*S ring
    assert memory.bank[0, :, 0].tolist() == [100.0, 101.0]
    assert memory.pointer[0].item() == 2


def test_grouping_picks_the_most_similar_class_map():
    N, C = 4, 3
    class_logits = torch.tensor([[[5.0, 0, 0, 0], [0, 0, 5.0, 5.0]]])  # (1, K=2, N)
    tokens = torch.zeros(1, N, C)
    tokens[0, :, 0] = torch.tensor([1.0, 0, 0, 0])  # like class 0
    tokens[0, :, 1] = torch.tensor([0, 0, 1.0, 1.0])  # like class 1
    tokens[0, :, 2] = torch.tensor([2.0, 0, 0.1, 0])  # mostly class 0, scale does not matter
    assert group_channels(class_logits, tokens).tolist() == [[0, 1, 0]]


def test_as_sources_reads_longer_rings_as_groups_of_c_slots():
    memory = SemanticMemory(num_classes=2, multiple=2, tokens=5, channels=3)
    sources = memory.as_sources()
    assert sources.shape == (4, 5, 3)  # K * S / C groups, N tokens, C "channels"
    torch.testing.assert_close(sources[1], memory.bank[0, 3:6].transpose(0, 1))
