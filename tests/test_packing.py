"""Micro-batch planning, packed sequences and the balanced split over ranks, against
plain reimplementations (single process; the engine's packed passes are checked against
padded ones and transformers in tests/test_engine.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from covrl.engine.packing import (
    PackedSequences,
    balanced_partition,
    plan_micro_batches,
)
from covrl.models.attention import packed_causal_mask


def test_token_budget_plan_covers_every_row_once_within_budget():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (37,), generator=g).tolist()
    for budget in (39, 60, 200, sum(lengths)):
        plan = plan_micro_batches(lengths, micro_batch_size=1, max_tokens=budget)
        rows = sorted(r for mb in plan for r in mb.rows)
        assert rows == list(range(len(lengths)))
        assert all(mb.num_tokens <= budget for mb in plan)
        assert all(mb.lengths == tuple(lengths[r] for r in mb.rows) for mb in plan)
        # First-fit decreasing never needs more than twice the lower bound.
        assert len(plan) <= 2 * -(-sum(lengths) // budget)
        assert plan == plan_micro_batches(lengths, micro_batch_size=1, max_tokens=budget)
    assert len(plan_micro_batches(lengths, micro_batch_size=1, max_tokens=sum(lengths))) == 1


def test_fixed_size_plan_groups_rows_of_similar_length():
    plan = plan_micro_batches([3, 9, 1, 7, 5, 2], micro_batch_size=2)
    assert [mb.rows for mb in plan] == [(1, 3), (4, 0), (5, 2)]
    assert [mb.seq_len for mb in plan] == [9, 5, 2]
    with pytest.raises(ValueError, match="micro_batch_size=4"):
        plan_micro_batches([3, 9, 1, 7, 5, 2], micro_batch_size=4)


def test_plan_errors_and_pipeline_multiple():
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch=8"):
        plan_micro_batches([3, 9, 1], micro_batch_size=1, max_tokens=8)
    plan = plan_micro_batches([3, 3, 3, 3], micro_batch_size=1, max_tokens=100, multiple_of=2)
    assert len(plan) == 2 and sorted(r for mb in plan for r in mb.rows) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="multiple of 2 micro-batches"):
        plan_micro_batches([3], micro_batch_size=1, max_tokens=100, multiple_of=2)


def test_pack_and_unpack_against_a_row_by_row_reference():
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 0, 0, 0], [1, 2, 3, 4, 5]])
    lengths = [3, 2, 5]
    packed = PackedSequences.pack(ids, lengths, multiple_of=4)
    assert packed.total == 12
    assert packed.input_ids[0, :10].tolist() == [5, 6, 7, 8, 9, 1, 2, 3, 4, 5]
    assert packed.position_ids[0, :10].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 4]
    assert packed.cu_seqlens.tolist() == [0, 3, 5, 10]
    # Each position predicts the next token of its own sequence, nothing across.
    assert packed.next_tokens()[:10].tolist() == [6, 7, 0, 9, 0, 2, 3, 4, 5, 0]
    values = torch.arange(packed.total, dtype=torch.float32) + 100
    rows = packed.unpack(values, 5)
    expected = torch.zeros(3, 5)
    start = 0
    for r, n in enumerate(lengths):
        for j in range(1, n):  # token j is scored where token j - 1 sits
            expected[r, j] = values[start + j - 1]
        start += n
    assert torch.equal(rows, expected)
    params = packed.params()
    assert params.qkv_format == "thd" and params.max_seqlen_q == 5
    assert PackedSequences.pack(ids, lengths, min_total=15).total == 15


def test_packed_causal_mask_is_block_diagonal_causal():
    cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    mask = packed_causal_mask(cu, 11)[0, 0]
    seq = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3]  # 9, 10: padding, a sequence of its own
    for q, k in itertools.product(range(11), repeat=2):
        allowed = seq[q] == seq[k] and k <= q
        assert bool(mask[q, k]) == (not allowed), (q, k)


def _best_spread(lengths, parts, equal_size):
    """The smallest max - min token load over every assignment (brute force)."""
    n, best = len(lengths), None
    for assign in itertools.product(range(parts), repeat=n):
        counts = [assign.count(p) for p in range(parts)]
        if equal_size and len(set(counts)) > 1:
            continue
        loads = [sum(lengths[i] for i in range(n) if assign[i] == p) for p in range(parts)]
        spread = max(loads) - min(loads)
        best = spread if best is None else min(best, spread)
    return best


@pytest.mark.parametrize("equal_size", [True, False])
def test_balanced_partition_is_complete_and_close_to_the_best(equal_size):
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        lengths = torch.randint(1, 50, (8,), generator=g).tolist()
        parts = balanced_partition(lengths, 2, equal_size=equal_size)
        assert sorted(i for p in parts for i in p) == list(range(8))
        if equal_size:
            assert [len(p) for p in parts] == [4, 4]
        loads = [sum(lengths[i] for i in p) for p in parts]
        # Longest-processing-time greedy: within the longest item of the best split.
        best = _best_spread(lengths, 2, equal_size)
        assert max(loads) - min(loads) <= best + max(lengths), (trial, lengths, parts)
    with pytest.raises(ValueError, match="do not split into 3 equal parts"):
        balanced_partition([1, 2, 3, 4], 3, equal_size=True)


def test_minibatch_layout_balances_tokens_over_ranks():
    from covrl.training.batch import MiniBatchLayout

    lengths = (30, 2, 2, 2, 28, 3, 3, 3) * 2
    shares = {}
    for rank in range(2):
        layout = MiniBatchLayout(2, 8, 2, rank, lengths=lengths)
        shares[rank] = [layout.rank_samples(k) for k in range(2)]
        assert layout.minibatch(1) == slice(4, 8)
    for k in range(2):
        a, b = shares[0][k], shares[1][k]
        assert sorted(a + b) == list(range(8 * k, 8 * k + 8))
        loads = [sum(lengths[i] for i in s) for s in (a, b)]
        assert abs(loads[0] - loads[1]) <= 2  # 30 and 28 on different ranks
    # Packed micro-batches need no equal row counts: loads within the smallest item.
    one = lengths[:8]
    a, b = (MiniBatchLayout(1, 8, 2, r, lengths=one, equal_rows=False) for r in range(2))
    assert sorted(a.rank_samples(0) + b.rank_samples(0)) == list(range(8))
    loads = [sum(one[i] for i in x.rank_samples(0)) for x in (a, b)]
    assert abs(loads[0] - loads[1]) <= 3, loads
