"""Exact top ``k`` of a scope spread over a process group, under (value desc, id asc).

The scope's entries are split over the ranks of ``group`` (any split); each has a
float64 or int64 value and an int64 id unique over the scope. Ties in value are broken
by id (smaller id first), so the order is strict and the selected set is a function of
the scope's data, not of how it is split.

Algorithm (:func:`top_k_of_local`), without gathering the entries:

1. each rank takes the ``k + 1`` largest values of its entries, with positions and ids
   (the multiset of the top values does not depend on how ties are broken);
2. ``all_gather`` of the ``[k]`` largest per rank; the global ``k``-th value ``v*``
   and the number ``a`` of values above it follow (every value above ``v*`` is in its
   rank's local top ``k``, or that rank alone would hold ``k`` values above ``v*``);
3. the ``k - a`` entries at ``v*`` with the smallest ids win: each rank offers its
   ``k - a`` smallest tied ids, ``all_gather``, and the ``(k - a)``-th smallest is
   ``id*`` (usually ``k - a = 1``). The local ``k + 1`` hold every local entry at or
   above ``v*`` unless their smallest value is ``v*`` itself (then a rescan collects
   the ties);
4. an entry is selected iff ``v > v*`` or ``v == v*`` and ``id <= id*``: a compare on
   the ``k + 1`` local candidates.

Cost: two all-gathers of at most ``k`` values / ids per rank and a few scalar host
syncs; the local work is a top-``k`` of the rank's entries (:class:`RunningTop` over a
stream of blocks). Communication grows with ``k``, which suits a selection of a small
fraction of the tokens (Clip-Cov / KL-Cov select 0.02-0.2 %). The order statistics of
:mod:`covrl.ops.order_statistics` (a radix select) cost the same for any ``k`` (eight
64K-bin histograms all-reduced for the value and the tied id, whatever ``k``), which
suits top fractions up to a half but is far more traffic and local work for a small
``k``; and this module's output, the selected entries themselves, is what a
selection needs, where the radix select gives the ``k``-th value only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from covrl.parallel.groups import Group, check_group, rank_and_size

_ID_MAX = torch.iinfo(torch.int64).max


def lowest(dtype: torch.dtype) -> float | int:
    """The fill value that sorts below every eligible entry (``-inf`` / int64 min)."""
    return float("-inf") if dtype.is_floating_point else torch.iinfo(dtype).min


def _all_gather_padded(t: torch.Tensor, size: int, fill, group: Group):
    """Concatenation over ``group`` of ``t`` padded with ``fill`` to ``size``."""
    if rank_and_size(group)[1] == 1:
        return t
    padded = torch.full((size,), fill, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    out = [torch.empty_like(padded) for _ in range(rank_and_size(group)[1])]
    dist.all_gather(out, padded, group=group)
    return torch.cat(out)


@dataclass
class TopK:
    """The scope's top ``k`` under (value desc, id asc), as seen by one rank.

    Attributes:
        value, id: the ``k``-th greatest ``(value, id)`` of the scope (scalar tensors,
            identical on every rank): the selection is every entry ordered at or
            above it.
        positions: ``[m]`` int64 positions (into this rank's flat values) of the local
            entries at or above the threshold, i.e. this rank's share of the top ``k``.
    """

    value: torch.Tensor
    id: torch.Tensor
    positions: torch.Tensor


@dataclass
class Candidates:
    """``[c]`` values, positions and ids of some of a rank's entries."""

    values: torch.Tensor
    positions: torch.Tensor
    ids: torch.Tensor

    @classmethod
    def at(
        cls, values: torch.Tensor, ids: torch.Tensor, index: torch.Tensor, offset: int = 0
    ) -> Candidates:
        """The entries ``index`` of ``[n]`` ``values`` / ``ids``, whose positions in the
        rank's flat sequence are ``index + offset``."""
        return cls(values.index_select(0, index), index + offset, ids.index_select(0, index))

    @staticmethod
    def cat(parts: Sequence[Candidates]) -> Candidates:
        return Candidates(
            torch.cat([p.values for p in parts]),
            torch.cat([p.positions for p in parts]),
            torch.cat([p.ids for p in parts]),
        )

    def take(self, index: torch.Tensor) -> Candidates:
        return Candidates(
            *(t.index_select(0, index) for t in (self.values, self.positions, self.ids))
        )


def top_k_of_local(
    local: Candidates,
    at_least: Callable[[torch.Tensor], Candidates],
    k: int,
    group: Group,
) -> TopK | None:
    """The scope's top ``k`` from this rank's ``k + 1`` largest entries (all if it has
    fewer), ``local``.

    ``at_least(v)`` gives every local entry with value ``>= v``; it is only called
    when the local ``k + 1`` may cut through the ties at ``v*``.

    Every entry of the scope's top ``k`` is in its rank's local top ``k`` by value, and
    every local entry at or above ``v*`` is in the local top ``k + 1`` unless that
    set's smallest value is ``v*`` itself, so the ties at ``v*`` and the final
    selection only look at about ``k`` entries.

    Returns:
        See :class:`TopK`. With fewer than ``k`` eligible entries in the scope, all of
        them. None if there are none or ``k == 0``.

    Collectives: every rank of ``group`` calls this with the same ``k``.
    """
    if k <= 0:
        return None
    floor = lowest(local.values.dtype)
    own = local.values
    if own.numel() > k:
        own = torch.topk(own, k, sorted=False).values
    top = _all_gather_padded(own, k, floor, group)
    top = top[top > floor]
    k_eff = min(k, top.numel())
    if k_eff == 0:
        return None
    top = torch.topk(top, k_eff, sorted=False).values
    v = top.min()
    need = k_eff - int((top > v).sum())  # >= 1: v itself is in the top k_eff
    if local.values.numel() == k + 1 and bool(local.values.min() >= v):
        local = at_least(v)  # the local k + 1 may have cut through the ties at v
    tied = local.ids[local.values == v]
    tied = torch.topk(tied, min(need, tied.numel()), largest=False, sorted=False).values
    tied = _all_gather_padded(tied, need, _ID_MAX, group)
    i = torch.topk(tied, need, largest=False, sorted=False).values.max()
    keep = (local.values > v) | ((local.values == v) & (local.ids <= i))
    return TopK(v, i, local.positions[keep])


def top_k(values: torch.Tensor, ids: torch.Tensor, k: int, group: Group) -> TopK | None:
    """The ``k`` greatest entries of a scope under (value desc, id asc).

    Args:
        values: ``[n]`` this rank's float64 or int64 keys, larger is better; entries
            that take no part hold :func:`lowest` of the dtype, every other entry is
            above it.
        ids: ``[n]`` int64 ids, unique over the scope.
        k: how many to select over the scope (the same on every rank).
        group: the ranks holding the rest of the scope (``SINGLE_PROCESS``: this process only).

    Returns:
        See :func:`top_k_of_local`; positions index ``values``.
    """
    top = torch.topk(values, min(k + 1, values.numel()), sorted=False)

    def at_least(v: torch.Tensor) -> Candidates:
        return Candidates.at(values, ids, torch.nonzero(values >= v).squeeze(1))

    local = Candidates(top.values, top.indices, ids.index_select(0, top.indices))
    return top_k_of_local(local, at_least, k, group)


def select_top_k(
    values: torch.Tensor,
    ids: torch.Tensor,
    eligible: torch.Tensor,
    k: int,
    *,
    group: Group,
) -> torch.Tensor:
    """Bool, shaped like ``values``: the eligible entries among the scope's top ``k``
    over ``group`` (:data:`covrl.parallel.SINGLE_PROCESS`: this process's entries)."""
    check_group(group)
    values = torch.where(eligible, values, lowest(values.dtype))
    result = top_k(values.reshape(-1), ids.reshape(-1), k, group)
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if result is not None:
        mask[result.positions] = True
    return mask.view(values.shape)


class RunningTop:
    """Exact running ``m`` largest of a stream of blocks, the ``local`` input of
    :func:`top_k_of_local` (with ``m = k + 1``; ties at the cut are broken
    arbitrarily: it only needs the multiset of values).

    Once ``m`` values are held, a block contributes only its entries at or above the
    ``m``-th largest so far (a compare and a compaction), and the pool is cut back to
    ``m`` whenever it reaches ``2 m``.
    """

    def __init__(self, m: int):
        self.m = m
        self.pool: list[Candidates] = []
        self.size = 0
        self.cut: torch.Tensor | None = None

    def add(self, values: torch.Tensor, ids: torch.Tensor, offset: int) -> None:
        """Feed the next block: ``[c]`` values and ids, at positions ``offset`` to
        ``offset + c`` of the rank's flat sequence."""
        if self.cut is None:
            pos = torch.topk(values, min(self.m, values.numel()), sorted=False).indices
        else:
            pos = torch.nonzero(values >= self.cut).squeeze(1)
        self.pool.append(Candidates.at(values, ids, pos, offset))
        self.size += pos.numel()
        if self.size >= (self.m if self.cut is None else 2 * self.m):
            self._shrink()

    def _shrink(self) -> None:
        pool = Candidates.cat(self.pool)
        if pool.values.numel() > self.m:
            pool = pool.take(torch.topk(pool.values, self.m, sorted=False).indices)
        self.pool, self.size = [pool], pool.values.numel()
        self.cut = pool.values.min() if self.size else None

    def result(self) -> Candidates:
        self._shrink()
        return self.pool[0]
