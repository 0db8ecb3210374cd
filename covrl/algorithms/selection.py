"""Exact, scope-global token selection for Clip-Cov and KL-Cov.

Both methods pick the ``K`` greatest tokens of a scope under a strict total order:

* KL-Cov: by covariance, largest first;
* Clip-Cov: among the band candidates, by a pseudo-random key
  ``hash(seed, step, token id)``, smallest first, which is a uniform draw without
  replacement that every rank reproduces from (seed, step) alone.

Ties in the primary value are broken by the canonical token id (smaller id wins), so
the order is strict and the selected set is a function of the scope's *data*, not of
how it is split into micro-batches or data-parallel ranks.

Distributed algorithm (:func:`top_k`), without gathering the tokens:

1. each rank takes the ``K + 1`` largest values of its tokens, with positions and ids
   (the multiset of the top values does not depend on how ties are broken);
2. ``all_gather`` of the ``[K]`` largest per rank; the global ``K``-th value ``v*``
   and the number ``a`` of values above it follow (every value above ``v*`` is in its
   rank's local top ``K``, or that rank alone would hold ``K`` values above ``v*``);
3. the ``K - a`` tokens at ``v*`` with the smallest ids win: each rank offers its
   ``K - a`` smallest tied ids, ``all_gather``, and the ``(K - a)``-th smallest is
   ``id*`` (usually ``K - a = 1``). The local ``K + 1`` hold every local token at or
   above ``v*`` unless their smallest value is ``v*`` itself (then a rescan collects
   the ties);
4. a token is selected iff ``v > v*`` or ``v == v*`` and ``id <= id*``: a compare on
   the ``K + 1`` local candidates, scattered back to each micro-batch's layout.

Per-token work (scope sums, covariance, KL-Cov's running top ``K + 1``, Clip-Cov's band
candidates) runs in blocks of the concatenated micro-batches (:class:`_LocalTokens`).
Clip-Cov hashes only its band candidates, and the key's low lane only for those whose
high lane can reach the draw.

Numerics: covariances are float64, from float64 sums all-reduced over the group. A
sum's last bits depend on the order of summation, so two layouts agree exactly unless
a covariance lies within about 1e-15 (relative) of the selection boundary or of a
Clip-Cov band edge without being equal to it. Exact ties (equal log-probs and
advantages) stay exact ties under any layout and break by id.

Cost per mini-batch: one all-reduce of a few float64 sums (means, count, input check),
two all-gathers of at most ``K`` values / ids per rank, a few scalar host syncs per
block, and ``O(n)`` device work; no per-token data leaves the device. The public
implementation copies the covariance to the host and runs a CPU top-k or random
choice on every micro-batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from covrl.algorithms._common import PaddingZeroer, selection_count
from covrl.algorithms.config import PolicyLossConfig
from covrl.algorithms.covariance import SelectionBatch
from covrl.algorithms.metrics import CovarianceSummary
from covrl.algorithms.policy_loss import ppo_surrogate
from covrl.ops.masking import as_bool_mask
from covrl.ops.token_covariance import CovarianceMeans, check_scope_sums
from covrl.parallel.groups import SINGLE_PROCESS, Group, all_reduce, check_group, rank_and_size

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


# --- Reproducible uniform keys -------------------------------------------------------


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32``, without int64 overflow."""
    lo, hi = c & 0xFFFF, (c >> 16) & 0xFFFF
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser (a bijection) on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _key_state(seed: int, step: int) -> int:
    return _splitmix64((seed & _MASK64) ^ _splitmix64(step & _MASK64))


def _key_lane(token_ids: torch.Tensor, state: int, lane: int) -> torch.Tensor:
    """31-bit lane ``lane`` (0: high bits of the key, 1: low bits) of :func:`uniform_keys`."""
    s = _splitmix64(state ^ (0x243F6A88, 0x85A308D3)[lane])
    lo = token_ids & _MASK32
    hi = (token_ids >> 32) & _MASK32
    h = _fmix32(lo ^ _fmix32(hi ^ (s & _MASK32)))
    return _fmix32(h ^ (s >> 32)) & 0x7FFFFFFF


def uniform_keys(token_ids: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """Pseudo-random non-negative int64 keys (62 bits) of ``token_ids`` for (seed, step).

    A pure function of (seed, step, id) in exact integer arithmetic, so the same on
    every rank and device. The ``n`` smallest keys of a set are a uniform random
    ``n``-subset. ``key = lane0 << 31 | lane1`` (:func:`_key_lane`), so keys compare
    as their high lanes first.
    """
    state = _key_state(seed, step)
    return (_key_lane(token_ids, state, 0) << 31) | _key_lane(token_ids, state, 1)


# --- Exact distributed top-K under (value desc, id asc) -------------------------------

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
        See :class:`TopK`. With fewer than ``k`` eligible entries in the scope, all of
        them. None if there are none or ``k == 0``.
    """
    top = torch.topk(values, min(k + 1, values.numel()), sorted=False)

    def at_least(v: torch.Tensor) -> _Candidates:
        pos = torch.nonzero(values >= v).squeeze(1)
        return _Candidates(values.index_select(0, pos), pos, ids.index_select(0, pos))

    local = _Candidates(top.values, top.indices, ids.index_select(0, top.indices))
    return _top_k_of_local(local, at_least, k, group)


def _cat_fields(parts: Sequence) -> list[torch.Tensor | None]:
    """Field-wise concatenation of instances of one tensor dataclass (None stays None)."""
    return [
        None
        if getattr(parts[0], f.name) is None
        else torch.cat([getattr(p, f.name) for p in parts])
        for f in dataclasses.fields(parts[0])
    ]


@dataclass
class _Candidates:
    """``[c]`` values, positions and ids of some of a rank's entries."""

    values: torch.Tensor
    positions: torch.Tensor
    ids: torch.Tensor

    @staticmethod
    def cat(parts: Sequence[_Candidates]) -> _Candidates:
        return _Candidates(*_cat_fields(parts))

    def take(self, index: torch.Tensor) -> _Candidates:
        return _Candidates(
            *(t.index_select(0, index) for t in (self.values, self.positions, self.ids))
        )


def _top_k_of_local(
    local: _Candidates,
    at_least: Callable[[torch.Tensor], _Candidates],
    k: int,
    group: Group,
) -> TopK | None:
    """:func:`top_k` from this rank's ``k + 1`` largest entries (all if it has fewer).

    ``at_least(v)`` gives every local entry with value ``>= v``; it is only called
    when the local ``k + 1`` may cut through the ties at ``v*``.

    Every entry of the scope's top ``k`` is in its rank's local top ``k`` by value, and
    every local entry at or above ``v*`` is in the local top ``k + 1`` unless that
    set's smallest value is ``v*`` itself, so the ties at ``v*`` and the final
    selection only look at about ``k`` entries.
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
    return _positions_mask(top_k(values.reshape(-1), ids.reshape(-1), k, group), values)


def _positions_mask(result: TopK | None, like: torch.Tensor) -> torch.Tensor:
    """Bool shaped like ``like``, True at ``result.positions`` (of its flat view)."""
    mask = torch.zeros(like.numel(), dtype=torch.bool, device=like.device)
    if result is not None:
        mask[result.positions] = True
    return mask.view(like.shape)


# --- The selection pass ---------------------------------------------------------------


@dataclass
class SelectionResult:
    """Output of :func:`prepare_selection`.

    Attributes:
        masks: one ``[b, s]`` bool mask per input micro-batch (same order), or None
            when the method is ``none``. Pass ``masks[i]`` as ``selected`` to
            :func:`covrl.algorithms.policy_loss.compute_policy_loss`.
        metrics: scalars, identical on every rank of the group:
            ``entropy_control/num_tokens``, ``.../selected_tokens``,
            ``.../selected_fraction``, ``.../candidates`` (Clip-Cov), and with
            ``covariance_summary`` ``cov/mean`` and ``cov/top_<pct>`` (mean covariance
            of the top fraction of tokens, over the mini-batch scope).
    """

    masks: list[torch.Tensor] | None
    metrics: dict[str, float] = field(default_factory=dict)


# Token slots per block of the selection passes. On CPU a cache-sized block (512 KiB of
# float64) is fastest and keeps every temporary small; on accelerators one large block
# keeps the launch count and host syncs per mini-batch independent of its size.
_BLOCK_SLOTS = {"cpu": 1 << 16}
_BLOCK_SLOTS_ACCELERATOR = 1 << 24


@dataclass
class _Block:
    """Slots ``[start, start + size)`` of a scope's local token sequence.

    ``block[name]`` is that field (``mask``, ``advantages``, ``old_logp``,
    ``cov_logp``, ``cur_logp``, ``ids``) as a ``[size]`` tensor: a view when the
    block lies in one micro-batch, else a concatenation of the pieces (made once).
    """

    start: int
    size: int
    pieces: list[tuple[dict[str, torch.Tensor], int, int]]
    _cache: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            parts = [fields[name][lo:hi] for fields, lo, hi in self.pieces]
            self._cache[name] = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self._cache[name]

    def take(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """``block[name]`` at the ``[c]`` block positions ``index``."""
        return self[name].index_select(0, index)

    def candidates(self, values: torch.Tensor, index: torch.Tensor) -> _Candidates:
        """The entries ``index`` of the block's ``values``, with scope positions and ids."""
        return _Candidates(
            values.index_select(0, index), index + self.start, self.take("ids", index)
        )


class _LocalTokens:
    """This rank's micro-batches of one scope as one flat sequence of ``n`` token slots
    (``n = sum_i b_i s_i``, padding included), read in blocks of ``block_slots``
    slots (by device type, ``_BLOCK_SLOTS``).

    On CPU, per-token work runs block by block, so every temporary is small (a float64
    block is 512 KiB) and the op count does not grow with the number of micro-batches:
    whole-sequence temporaries would allocate tens of MiB of fresh memory per call,
    whose page faults cost more than the arithmetic. :meth:`split` gives
    per-micro-batch views of an ``[n]`` tensor.
    """

    def __init__(self, batches: Sequence[SelectionBatch], use_current: bool):
        self.shapes = [b.mask.shape for b in batches]
        self.numel = sum(s.numel() for s in self.shapes)
        self.device = batches[0].mask.device
        self.block_slots = _BLOCK_SLOTS.get(self.device.type, _BLOCK_SLOTS_ACCELERATOR)
        self.use_current = use_current
        self._fields = []
        for b in batches:
            cur = b.logp.detach().reshape(-1) if use_current else None
            old = b.old_logp.detach().reshape(-1)
            self._fields.append(
                dict(
                    mask=as_bool_mask(b.mask).reshape(-1),
                    advantages=b.advantages.detach().reshape(-1),
                    old_logp=old,
                    cov_logp=old if cur is None else cur,
                    cur_logp=cur,
                    ids=b.token_ids.reshape(-1),
                )
            )

    def blocks(self) -> Iterator[_Block]:
        """The blocks in order (one empty block if ``n == 0``)."""
        pieces: list[tuple[dict[str, torch.Tensor], int, int]] = []
        start = filled = 0
        for fields, shape in zip(self._fields, self.shapes, strict=True):
            lo, size = 0, shape.numel()
            while lo < size:
                hi = min(size, lo + self.block_slots - filled)
                pieces.append((fields, lo, hi))
                filled += hi - lo
                lo = hi
                if filled == self.block_slots:
                    yield _Block(start, filled, pieces)
                    start, filled, pieces = start + filled, 0, []
        if filled or start == 0:
            yield _Block(start, filled, pieces or [(self._fields[0], 0, 0)])

    def selected_sums(self, selected: torch.Tensor, mean_adv: torch.Tensor) -> torch.Tensor:
        """Local float64 ``[#selected with A > mean A, sum of their p, sum of p over
        every valid token]`` (``p = exp(logp)``, the covariance's log-prob)."""
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for fields, sel in zip(self._fields, self._flat_parts(selected), strict=True):
            prob = fields["cov_logp"].double().exp()
            sums[0] += (fields["advantages"][sel].double() > mean_adv).sum()
            sums[1] += prob[sel].sum()
            sums[2] += prob[fields["mask"]].sum()
        return sums

    def _flat_parts(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``[n]`` -> one flat view per micro-batch."""
        return flat.split([s.numel() for s in self.shapes])

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``[n]`` -> one view per micro-batch, in its ``[b, s]`` layout."""
        return [p.view(s) for p, s in zip(self._flat_parts(flat), self.shapes, strict=True)]


def _scope_sums(tokens: _LocalTokens, check_old: bool) -> torch.Tensor:
    """Local float64 ``[sum logp, sum A, (0 * sum old_logp,) count]`` over valid tokens.

    ``logp`` is the covariance's log-prob. ``old_logp`` is only checked: ``0 * x``
    summed is 0 if every ``x`` is finite, else NaN.
    """
    total = None
    for block in tokens.blocks():
        m = block["mask"]
        zero = PaddingZeroer(m)
        parts = [
            zero(block["cov_logp"]).sum(dtype=torch.float64),
            zero(block["advantages"]).sum(dtype=torch.float64),
        ]
        if check_old:
            parts.append(zero(block["old_logp"]).mul_(0).sum().double())
        parts.append(torch.count_nonzero(m).double())
        sums = torch.stack(parts)
        total = sums if total is None else total.add_(sums)
    return total


def _centered_product(logp: torch.Tensor, adv: torch.Tensor, means: CovarianceMeans):
    """float64 ``(logp - mean_logp) * (adv - mean_adv)``, elementwise; the float64 ops of
    :func:`token_covariance`, so the same bits. ``logp`` and ``adv`` are fresh tensors
    (one may be overwritten)."""
    cov = logp.double().sub_(means.mean_logp)
    return cov.mul_(adv.double().sub_(means.mean_adv))


def _block_covariance(block: _Block, means: CovarianceMeans, fill: bool) -> torch.Tensor:
    """``[size]`` float64 covariance of a block; padding is ``-inf`` with ``fill``, else
    a finite value."""
    m = block["mask"]
    zero = PaddingZeroer(m)
    cov = _centered_product(zero(block["cov_logp"]), zero(block["advantages"]), means)
    if fill:
        cov = torch.where(m, cov, cov.new_tensor(float("-inf")), out=cov)
    return cov


def _covariance_at(block: _Block, pos: torch.Tensor, means: CovarianceMeans) -> torch.Tensor:
    """``[p]`` float64 covariance at the valid block positions ``pos``: the values of
    :func:`_block_covariance` there, bit for bit."""
    return _centered_product(block.take("cov_logp", pos), block.take("advantages", pos), means)


def _covariance_summary(
    tokens: _LocalTokens,
    means: CovarianceMeans,
    summary: CovarianceSummary,
    group: Group,
) -> dict[str, float]:
    """:meth:`CovarianceSummary.result` of a scope whose blocks were fed in order."""
    blocks = list(tokens.blocks())
    return summary.result(means.count, lambda i, pos: _covariance_at(blocks[i], pos, means), group)


class _RunningTop:
    """Exact running ``m`` largest of a stream of blocks (ties at the cut broken
    arbitrarily: :func:`_top_k_of_local` only needs the multiset of values).

    Once ``m`` values are held, a block contributes only its entries at or above the
    ``m``-th largest so far (a compare and a compaction), and the pool is cut back to
    ``m`` whenever it reaches ``2 m``.
    """

    def __init__(self, m: int):
        self.m = m
        self.pool: list[_Candidates] = []
        self.size = 0
        self.cut: torch.Tensor | None = None

    def add(self, values: torch.Tensor, block: _Block) -> None:
        if self.cut is None:
            pos = torch.topk(values, min(self.m, values.numel()), sorted=False).indices
        else:
            pos = torch.nonzero(values >= self.cut).squeeze(1)
        self.pool.append(block.candidates(values, pos))
        self.size += pos.numel()
        if self.size >= (self.m if self.cut is None else 2 * self.m):
            self._shrink()

    def _shrink(self) -> None:
        pool = _Candidates.cat(self.pool)
        if pool.values.numel() > self.m:
            pool = pool.take(torch.topk(pool.values, self.m, sorted=False).indices)
        self.pool, self.size = [pool], pool.values.numel()
        self.cut = pool.values.min() if self.size else None

    def result(self) -> _Candidates:
        self._shrink()
        return self.pool[0]


def _band_candidates(
    cov: torch.Tensor, block: _Block, config: PolicyLossConfig, use_current: bool
) -> _Band:
    """The valid tokens of a block inside Clip-Cov's band ``omega_low < cov < omega_high``."""
    cc = config.entropy_control.clip_cov
    band = (cov > cc.omega_low) & (cov < cc.omega_high) & block["mask"]
    pos = torch.nonzero(band).squeeze(1)
    return _Band(
        pos + block.start,
        block.take("ids", pos),
        block.take("old_logp", pos),
        block.take("cur_logp", pos) if use_current else None,
        block.take("advantages", pos),
    )


@dataclass
class _Band:
    """``[c]`` positions (into the scope's local tokens), ids, and loss inputs of band
    tokens."""

    positions: torch.Tensor
    ids: torch.Tensor
    old_logp: torch.Tensor
    cur_logp: torch.Tensor | None
    advantages: torch.Tensor

    def not_clipped(self, config: PolicyLossConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and ids of the tokens the PPO clip does not already silence (they
        would waste the budget; needs the current logp, else all). Same dtype and
        elementwise formula as the loss, so the flags agree with what the loss will do.
        """
        if self.cur_logp is None:
            return self.positions, self.ids
        log_ratio = (self.cur_logp - self.old_logp).clamp(
            -config.log_ratio_clamp, config.log_ratio_clamp
        )
        _, clipped, dual = ppo_surrogate(
            torch.exp(log_ratio),
            self.advantages,
            *config.clip_range,
            config.clip_ratio_c,
        )
        keep = torch.nonzero(~(clipped | dual)).squeeze(1)
        return self.positions.index_select(0, keep), self.ids.index_select(0, keep)


def _random_top_k(ids: torch.Tensor, k: int, seed: int, step: int, group) -> TopK | None:
    """The ``k`` candidates (``ids`` ``[c]``) of the scope with the smallest
    :func:`uniform_keys`; positions into ``ids``.

    Lazy hashing: a key's high lane orders it unless two high lanes tie, so only the
    local candidates whose high lane is among the ``k`` smallest (ties included) can be
    in the scope's draw; only those get the low lane. Exact, at about half the hashing.
    """
    state = _key_state(seed, step)
    high = _key_lane(ids, state, 0)
    short = torch.arange(ids.numel(), device=ids.device)
    if ids.numel() > k:
        cut = torch.topk(high, k, largest=False, sorted=False).values.max()
        short = torch.nonzero(high <= cut).squeeze(1)
    short_ids = ids.index_select(0, short)
    keys = (high.index_select(0, short) << 31) | _key_lane(short_ids, state, 1)
    result = top_k(-keys, short_ids, k, group)  # smallest key first
    if result is not None:
        result.positions = short.index_select(0, result.positions)
    return result


def _select_in_scope(
    tokens: _LocalTokens,
    means: CovarianceMeans,
    config: PolicyLossConfig,
    step: int,
    group: Group,
    summary: CovarianceSummary | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n]`` bool selection of one scope's local tokens, and the local candidate
    count (int64 scalar tensor).

    KL-Cov keeps a running top ``K + 1`` of the covariance; Clip-Cov compacts its few
    band candidates and hashes only those. Each block's covariance is also fed to
    ``summary`` when given.
    """
    ec = config.entropy_control
    k = selection_count(ec.selection_ratio, means.count)
    selected = torch.zeros(tokens.numel, dtype=torch.bool, device=tokens.device)
    if ec.method == "kl_cov":
        running = _RunningTop(k + 1)
        for block in tokens.blocks():
            cov = _block_covariance(block, means, fill=True)
            running.add(cov, block)
            if summary is not None:
                summary.add(cov)

        def at_least(v: torch.Tensor) -> _Candidates:
            parts = []
            for block in tokens.blocks():
                cov = _block_covariance(block, means, fill=True)
                pos = torch.nonzero(cov >= v).squeeze(1)
                parts.append(block.candidates(cov, pos))
            return _Candidates.cat(parts)

        chosen = _top_k_of_local(running.result(), at_least, k, group)
        if chosen is not None:
            selected[chosen.positions] = True
        return selected, torch.zeros((), dtype=torch.int64, device=tokens.device)

    bands = []
    for block in tokens.blocks():
        cov = _block_covariance(block, means, fill=False)
        bands.append(_band_candidates(cov, block, config, tokens.use_current))
        if summary is not None:
            summary.add(cov, block["mask"])
    band = bands[0] if len(bands) == 1 else _Band(*_cat_fields(bands))
    pos, ids = band.not_clipped(config)
    chosen = _random_top_k(ids, k, ec.seed, step, group)
    if chosen is not None:
        selected[pos.index_select(0, chosen.positions)] = True
    return selected, torch.tensor(pos.numel(), dtype=torch.int64, device=tokens.device)


def _select_per_microbatch(
    batches: Sequence[SelectionBatch], config: PolicyLossConfig, step: int, use_current: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scope="microbatch"``: each local micro-batch selects alone, with its own means
    and count (the public implementation's behaviour). Same outputs as
    :func:`_select_in_scope` over the concatenated micro-batches."""
    parts, candidates = [], []
    for b in batches:
        tokens = _LocalTokens([b], use_current)
        sums = _scope_sums(tokens, check_old=False)
        means = CovarianceMeans.from_sums(sums, sums.tolist())
        selected, n_candidates = _select_in_scope(tokens, means, config, step, SINGLE_PROCESS)
        parts.append(selected)
        candidates.append(n_candidates)
    return torch.cat(parts), torch.stack(candidates).sum()


def prepare_selection(
    batches: Sequence[SelectionBatch],
    config: PolicyLossConfig,
    *,
    step: int,
    group: Group,
) -> SelectionResult:
    """Select the Clip-Cov / KL-Cov tokens of one optimizer mini-batch.

    Call once per mini-batch, before its gradient micro-batches, with every local
    micro-batch of the mini-batch (same tensors/layout the loss will see) on every rank
    of ``group``. ``group`` is the group across which the mini-batch's tokens are
    partitioned: the data-parallel group (with context parallelism, DP x CP); run on
    the ranks that hold log-probs (the last pipeline stage); ``SINGLE_PROCESS`` when this
    process holds the whole mini-batch. ``None`` is refused (TypeError): a forgotten
    group must not turn a data-parallel job's selection into a per-rank one.

    With ``entropy_control.logp_source == "current"`` each batch's ``logp`` must be the
    current parameters' log-probs, from a no-grad forward of the mini-batch (one extra
    forward per mini-batch, about a third of the update's compute; with no dropout it
    equals the gradient pass's forward). ``"old"`` uses ``old_logp`` and costs nothing
    extra, at the price of a covariance one or more updates stale.

    Args:
        batches: the mini-batch's local micro-batches (at least one).
        config: the loss config (method, scope, seed, clip ranges).
        step: optimizer step; with ``entropy_control.seed`` it fixes Clip-Cov's draw.
        group: see above.

    Raises:
        ValueError: on every rank of the group if any rank has NaN/inf at a valid
            position of ``advantages``, ``old_logp`` or ``logp`` (with
            ``config.check_finite``), naming the tensor.

    Collectives: every rank of ``group`` must call this with the same config and step.
    Host syncs: a handful of scalars per call; no per-token data leaves the device.
    """
    check_group(group)
    ec = config.entropy_control
    use_current = ec.logp_source == "current"
    if not batches:
        raise ValueError("prepare_selection needs at least one micro-batch")
    for i, b in enumerate(batches):
        b.validate()
        if use_current and b.logp is None:
            raise ValueError(
                f"batches[{i}].logp is None but entropy_control.logp_source='current' "
                "needs the current parameters' log-probs"
            )
    tokens = _LocalTokens(batches, use_current)

    # One float64 all-reduce of the scope sums: means, count, and the input check.
    sums = all_reduce(_scope_sums(tokens, check_old=use_current), group)
    values = sums.tolist()
    if config.check_finite:
        local = {
            ("logp" if use_current else "old_logp"): [
                b.logp if use_current else b.old_logp for b in batches
            ],
            "advantages": [b.advantages for b in batches],
        }
        if use_current:
            local["old_logp"] = [b.old_logp for b in batches]
        check_scope_sums(values[:-1], local, [b.mask for b in batches])
    means = CovarianceMeans.from_sums(sums, values)
    num_tokens = means.count

    metrics: dict[str, float] = {"entropy_control/num_tokens": float(num_tokens)}
    out_masks: list[torch.Tensor] | None = None
    summary = (
        CovarianceSummary(ec.cov_top_fractions, tokens.device) if ec.covariance_summary else None
    )
    # The summary reads each block's covariance from the mini-batch-scope selection
    # pass when there is one, else from a pass of its own (below).
    summary_from_selection = ec.method != "none" and ec.scope == "minibatch"
    if ec.method != "none":
        if ec.scope == "minibatch":
            selected, n_cand = _select_in_scope(tokens, means, config, step, group, summary)
        else:
            selected, n_cand = _select_per_microbatch(batches, config, step, use_current)
        # Where the selected tokens sit: how many carry an above-mean advantage (the
        # confident, rewarded tokens whose updates lower the entropy), and their mean
        # probability next to the scope's.
        stats = torch.cat(
            [
                torch.stack([selected.sum(), n_cand]).double(),
                tokens.selected_sums(selected, means.mean_adv),
            ]
        )
        all_reduce(stats, group)
        n_sel, n_cand, n_pos, p_sel, p_all = stats.tolist()
        n_sel, n_cand = int(n_sel), int(n_cand)
        out_masks = tokens.split(selected)
        metrics["entropy_control/selected_tokens"] = float(n_sel)
        metrics["entropy_control/selected_fraction"] = n_sel / max(num_tokens, 1)
        if n_sel:
            metrics["entropy_control/selected_positive_adv_fraction"] = n_pos / n_sel
            metrics["entropy_control/selected_prob_mean"] = p_sel / n_sel
        metrics["entropy_control/prob_mean"] = p_all / max(num_tokens, 1)
        if ec.method == "clip_cov":
            metrics["entropy_control/candidates"] = float(n_cand)

    if summary is not None:
        if not summary_from_selection:
            for block in tokens.blocks():
                summary.add(_block_covariance(block, means, fill=True))
        metrics.update(_covariance_summary(tokens, means, summary, group))
    return SelectionResult(out_masks, metrics)
