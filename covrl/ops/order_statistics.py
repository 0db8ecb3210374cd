"""Exact order statistics of a scope spread over a process group, at a cost independent
of the rank asked for: radix select on order-preserving int64 keys.

float64 values map to int64 keys with the same order (:func:`float_to_ordered_int`).
The ``r``-th largest key is found in four rounds of 16-bit digits, most significant
first; each round is one all-reduce of an int64 histogram of 65536 bins, so the 50 %
quantile costs the same as the top 0.02 %. The first round covers every entry once
for all queries; later rounds only the entries that share a query's chosen prefix
(usually a small fraction).

:class:`TopMeans` uses it for the mean of the top ``k`` values of a scope whose values
arrive block by block: ``(sum_{v > v*} v + (k - #{v > v*}) v*) / k`` with ``v*`` the
exact ``k``-th largest. Its first round runs per block (with a histogram of value sums
per digit, for the sums above each bucket) and reads back only the chosen buckets, so
no whole-scope temporary is built.

Why not :mod:`covrl.ops.distributed_topk` for these: its all-gathers grow with ``k``
(a top half of a million tokens would gather half a million values to every rank),
while the radix select's traffic is fixed. Why not this for the selection: it yields
the ``k``-th value, not the entries with their id tie-break, and for the small ``k``
of a selection its fixed cost (a 64K-bin histogram per round, a second select for the
tied ids) is far above two all-gathers of ``k`` values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from covrl.parallel.groups import Group, all_reduce

_LOW63 = 0x7FFFFFFFFFFFFFFF


def float_to_ordered_int(x: torch.Tensor) -> torch.Tensor:
    """float64 -> int64 with the same order (for finite values; -0.0 sorts below 0.0)."""
    bits = x.contiguous().view(torch.int64)
    return (bits >> 63).bitwise_and_(_LOW63).bitwise_xor_(bits)  # negative: flip all but the sign


def ordered_int_to_float(k: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`float_to_ordered_int`."""
    return (k >> 63).bitwise_and_(_LOW63).bitwise_xor_(k).view(torch.float64)


_DIGIT_BITS = 16
_NUM_BINS = 1 << _DIGIT_BITS
_TOP_SHIFT = 64 - _DIGIT_BITS


def _top_digits_(keys: torch.Tensor) -> torch.Tensor:
    """The top 16-bit digit of int64 ``keys``, ordered 0..65535, computed in place.

    The arithmetic shift is signed; the offset orders the digits.
    """
    return keys.bitwise_right_shift_(_TOP_SHIFT).add_(_NUM_BINS // 2)


# The top digit of -inf (and of negative NaNs only): the bin of padding, below every
# finite value's.
_PAD_DIGIT = int(
    _top_digits_(float_to_ordered_int(torch.tensor([float("-inf")], dtype=torch.float64)))[0]
)


def _flat_cat(segments: Sequence[torch.Tensor]) -> torch.Tensor:
    """The segments flattened and concatenated (a view for a single segment)."""
    return (
        segments[0].reshape(-1)
        if len(segments) == 1
        else torch.cat([s.reshape(-1) for s in segments])
    )


def _choose_digits(
    hist: torch.Tensor, remaining: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One radix round: the digit holding each query's ``remaining``-th largest key.

    Args:
        hist: ``[m, 65536]`` int64 counts of the query's keys per digit (global).
        remaining: ``[m]`` 1-based ranks among those keys.

    Returns:
        ``[m]`` chosen digits and ``[m]`` ranks within them.
    """
    at_least = hist.flip(1).cumsum(1)  # at_least[:, i] = #{digit >= 65535 - i}
    i = torch.searchsorted(at_least, remaining.unsqueeze(1)).squeeze(1)
    i = i.clamp(max=_NUM_BINS - 1)
    above = at_least.gather(1, (i - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    return _NUM_BINS - 1 - i, remaining - torch.where(i > 0, above, 0)


def _split_bucket(pool: torch.Tensor, prefix: torch.Tensor) -> list[torch.Tensor]:
    """``[c]`` keys of the chosen top digits -> per query ``j``, those with top digit
    ``prefix[j]`` (signed, as ``keys >> 48``)."""
    top = pool >> _TOP_SHIFT
    return [pool[top == p] for p in prefix.tolist()]


def _radix_refine(
    cands: list[torch.Tensor],
    prefix: torch.Tensor,
    remaining: torch.Tensor,
    group: Group,
) -> torch.Tensor:
    """The three lower radix rounds, after the top digit is chosen.

    Args:
        cands: per query, this rank's keys with the query's top digit.
        prefix: ``[m]`` chosen top digits (signed, as ``keys >> 48``).
        remaining: ``[m]`` 1-based ranks within those keys (global).

    Returns:
        ``[m]`` int64 keys, identical on every rank.
    """
    for level in range(_TOP_SHIFT // _DIGIT_BITS - 1, -1, -1):
        shift = _DIGIT_BITS * level
        hist = torch.stack(
            [torch.bincount((c >> shift) & (_NUM_BINS - 1), minlength=_NUM_BINS) for c in cands]
        )
        all_reduce(hist, group)
        digit, remaining = _choose_digits(hist, remaining)
        prefix = (prefix << _DIGIT_BITS) | digit
        cands = [c[(c >> shift) == prefix[j]] for j, c in enumerate(cands)]
    return prefix


def kth_largest(keys: Sequence[torch.Tensor], ranks: Sequence[int], group: Group) -> torch.Tensor:
    """Exact ``r``-th largest int64 key of a scope, for each rank ``r``.

    Args:
        keys: this rank's segments of int64 keys (any shapes).
        ranks: 1-based ranks, each ``1 <= r <= total count over the group``.
        group: the ranks holding the rest of the scope (``SINGLE_PROCESS``: this process only).

    Returns:
        ``[len(ranks)]`` int64 keys, identical on every rank.

    Collectives: four all-reduces of ``[len(ranks), 65536]`` int64 (the first
    ``[1, 65536]``), every rank of ``group`` with the same ``ranks``.
    """
    keys = _flat_cat(keys)
    m = len(ranks)
    remaining = torch.tensor(list(ranks), dtype=torch.int64, device=keys.device)
    top = _top_digits_(keys.clone())
    hist = all_reduce(torch.bincount(top, minlength=_NUM_BINS).unsqueeze(0), group)
    digit, remaining = _choose_digits(hist.expand(m, _NUM_BINS), remaining)
    # One pass over all keys pools every query's bucket (a lookup table of the chosen
    # digits); split the pool per query.
    chosen = torch.zeros(_NUM_BINS, dtype=torch.bool, device=keys.device)
    chosen[digit] = True
    prefix = digit - _NUM_BINS // 2
    return _radix_refine(_split_bucket(keys[chosen[top]], prefix), prefix, remaining, group)


def _sum_above(hist: torch.Tensor, digit: torch.Tensor) -> torch.Tensor:
    """``[m]``: ``sum(hist[d + 1:])`` for each ``d`` of ``digit`` (``hist`` ``[65536]``)."""
    suffix = hist.flip(0).cumsum(0).flip(0)  # suffix[d] = sum(hist[d:])
    return torch.cat([suffix[1:], suffix.new_zeros(1)]).index_select(0, digit)


class TopMeans:
    """Mean and top-``k`` means of a scope whose float64 values arrive block by block.

    Blocks are fed once with :meth:`add` (the round-1 radix pass); :meth:`result`
    then reads back only the values in each query's chosen top-digit bucket, through
    a callback, so no whole-scope float or int64 temporary is built.

    Per block of ``c`` values, :meth:`add` keeps the ``[c]`` int32 top digits and adds
    to a float64 ``[2, 65536]`` histogram of counts and value sums per top digit. The
    sums of the values above a query's bucket come from the sums histogram; inside
    the bucket, from its candidates. The ``k``-th largest value is exact (a radix
    select); the sums are float64 sums whose last bits depend on the order of
    summation.

    Args:
        device: the device of the blocks.
    """

    def __init__(self, device: torch.device):
        self.hist = torch.zeros(2, _NUM_BINS, dtype=torch.float64, device=device)
        self.digits: list[torch.Tensor] = []
        self._one = torch.ones((), dtype=torch.float64, device=device)

    def add(self, values: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Feed the next block.

        Args:
            values: ``[c]`` float64; ``-inf`` at entries outside the scope, unless
                ``valid`` is given.
            valid: ``[c]`` bool, False at entries outside the scope (any value there).
        """
        top = _top_digits_(float_to_ordered_int(values))
        if valid is not None:
            top = torch.where(valid, top, top.new_tensor(_PAD_DIGIT), out=top)
        self.hist[0].scatter_add_(0, top, self._one.expand(top.numel()))
        self.hist[1].scatter_add_(0, top, values)
        self.digits.append(top.to(torch.int32))

    def result(
        self,
        num_values: int,
        ks: Sequence[int],
        values_at: Callable[[int, torch.Tensor], torch.Tensor],
        group: Group,
    ) -> torch.Tensor:
        """float64 ``[1 + len(ks)]``: the scope's mean, then the mean of its ``k``
        largest values for each ``k`` of ``ks``; identical on every rank.

        Three radix rounds on the bucket candidates, two all-reduces of its own and
        one host sync besides.

        Args:
            num_values: the scope's count of values (> 0, the same on every rank).
            ks: ``1 <= k <= num_values``.
            values_at: ``values_at(i, pos)`` gives block ``i``'s values (as fed to
                :meth:`add`) at its ``[p]`` int64 positions ``pos``, all in the scope.
            group: the ranks holding the rest of the scope (``SINGLE_PROCESS``: this process only).
        """
        m, device = len(ks), self.hist.device
        hist = all_reduce(self.hist, group)
        hist[:, : _PAD_DIGIT + 1] = 0  # padding (ranks stay <= N, so never chosen)
        ranks = torch.tensor(ks, dtype=torch.int64, device=device)
        digit, remaining = _choose_digits(hist[0].long().expand(m, _NUM_BINS), ranks)
        chosen = torch.zeros(_NUM_BINS, dtype=torch.bool, device=device)
        chosen[digit] = True
        pool = [
            float_to_ordered_int(values_at(i, torch.nonzero(chosen[d]).squeeze(1)))
            for i, d in enumerate(self.digits)
        ]
        prefix = digit - _NUM_BINS // 2
        buckets = _split_bucket(_flat_cat(pool), prefix)
        kth = _radix_refine(buckets, prefix, remaining, group)
        # Inside each bucket: the sum and count of the candidates above v*.
        inside = torch.zeros(2 * m, dtype=torch.float64, device=device)
        for j, b in enumerate(buckets):
            b = b[b > kth[j]]
            inside[j] = ordered_int_to_float(b).sum()
            inside[m + j] = b.numel()
        all_reduce(inside, group)
        above = inside[:m] + _sum_above(hist[1], digit)
        count = inside[m:] + _sum_above(hist[0], digit)
        k_t = ranks.double()
        top = (above + (k_t - count) * ordered_int_to_float(kth)) / k_t
        mean = hist[1].sum().reshape(1) / num_values
        return torch.cat([mean, top])
