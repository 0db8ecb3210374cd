"""Canonical token ids and the micro-batch splits of :mod:`tests.token_fixtures`."""

from __future__ import annotations

import torch

from tests.token_fixtures import collate, flat_tokens, make_samples, split

# --- tests of the canonical ids ---------------------------------------------------------


def test_canonical_ids_ignore_padding_layout():
    samples = make_samples()
    right = collate(samples, left_pad=False, extra=0)
    left = collate(samples, left_pad=True, extra=5)
    a = right["token_ids"][right["mask"]]
    b = left["token_ids"][left["mask"]]
    assert torch.equal(a, b)
    assert torch.equal(a, flat_tokens(samples)["ids"])
    assert (left["token_ids"][~left["mask"]] == -1).all()


def test_canonical_ids_unique_and_sorted_per_row():
    mb = collate(make_samples(), left_pad=True)
    ids = mb["token_ids"][mb["mask"]]
    assert ids.unique().numel() == ids.numel()
    for row in range(mb["mask"].shape[0]):
        r = mb["token_ids"][row][mb["mask"][row]]
        assert torch.equal(r, torch.sort(r).values)
        assert (r >> 32 == mb["sample_index"][row]).all()


def test_split_covers_every_sample_once():
    samples = make_samples()
    seen = []
    for rank in range(2):
        for mb in split(samples, 2, rank, 4, order_seed=3):
            seen += mb["sample_index"].tolist()
    assert sorted(seen) == list(range(len(samples)))
