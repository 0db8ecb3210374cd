"""Canonical token ids (:func:`covrl.algorithms.canonical_token_ids`) against ids written
out by hand: ``sample_index << 32 | k`` for the k-th response token of a row, -1 on
padding, whatever the padding layout."""

from __future__ import annotations

import pytest
import torch

from covrl.algorithms import canonical_token_ids


def _expected(sample_index: list[int], mask: list[list[int]]) -> list[list[int]]:
    """The ids by the definition, one token at a time in plain Python integers."""
    out = []
    for sample, row in zip(sample_index, mask, strict=True):
        k, ids = 0, []
        for valid in row:
            ids.append(sample * 2**32 + k if valid else -1)
            k += bool(valid)
        out.append(ids)
    return out


@pytest.mark.parametrize(
    "mask",
    [
        [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]],  # right padding
        [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]],  # left padding
        [[1, 0, 1, 0, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]],  # holes; an empty row
    ],
    ids=["right", "left", "holes"],
)
def test_ids_follow_the_definition(mask):
    sample_index = [7, 0, 2**31 - 1]  # any order; the largest index allowed
    got = canonical_token_ids(torch.tensor(sample_index), torch.tensor(mask, dtype=torch.bool))
    assert got.dtype == torch.int64
    assert got.tolist() == _expected(sample_index, mask)
    # A numeric mask (nonzero = valid) gives the same ids.
    numeric = canonical_token_ids(torch.tensor(sample_index), torch.tensor(mask).float() * 0.5)
    assert torch.equal(numeric, got)


def test_ids_do_not_depend_on_the_padding_layout():
    """The same samples padded left, right and to a wider batch get the same ids."""
    lengths, sample_index = [3, 1, 4], torch.tensor([4, 9, 1])
    ids = {}
    for name, width, left in (("right", 4, False), ("left", 4, True), ("wide", 7, True)):
        mask = torch.zeros(3, width, dtype=torch.bool)
        for row, n in enumerate(lengths):
            mask[row, slice(width - n, width) if left else slice(0, n)] = True
        got = canonical_token_ids(sample_index, mask)
        ids[name] = sorted(got[mask].tolist())
        assert (got[~mask] == -1).all()
    assert ids["right"] == ids["left"] == ids["wide"]
    assert ids["right"] == sorted(
        s * 2**32 + k for s, n in zip([4, 9, 1], lengths, strict=True) for k in range(n)
    )


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"sample_index must have shape \[2\].*got \(3,\)"):
        canonical_token_ids(torch.arange(3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="sample_index must have shape"):
        canonical_token_ids(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 4))
