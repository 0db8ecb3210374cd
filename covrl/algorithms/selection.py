"""Exact, scope-global token selection for Clip-Cov and KL-Cov.

Both methods pick the ``K`` greatest tokens of a scope under a strict total order:

* KL-Cov: by covariance, largest first;
* Clip-Cov: among the band candidates, by a pseudo-random key
  ``hash(seed, step, token id)``, smallest first, which is a uniform draw without
  replacement that every rank reproduces from (seed, step) alone.

Ties in the primary value are broken by the canonical token id (smaller id wins), so
the order is strict and the selected set is a function of the scope's *data*, not of
how it is split into micro-batches or data-parallel ranks.

Distributed algorithm (:func:`top_k_threshold`), without gathering the tokens:

1. each rank takes the ``K`` largest values of its segments (the multiset of the top
   ``K`` values does not depend on how ties are broken);
2. ``all_gather`` of ``[K]`` values per rank; the global ``K``-th value ``v*`` and the
   number ``a`` of values above it follow (every value above ``v*`` is in its rank's
   local top ``K``, or that rank alone would hold ``K`` values above ``v*``);
3. the ``K - a`` tokens at ``v*`` with the smallest ids win: each rank offers its
   ``K - a`` smallest tied ids, ``all_gather``, and the ``(K - a)``-th smallest is
   ``id*`` (usually ``K - a = 1``);
4. a token is selected iff ``v > v*`` or ``v == v*`` and ``id <= id*``: a local
   compare on each micro-batch, in its own layout.

Numerics: covariances are float64, from float64 sums all-reduced over the group. A
sum's last bits depend on the order of summation, so two layouts agree exactly unless
a covariance lies within about 1e-15 (relative) of the selection boundary or of a
Clip-Cov band edge without being equal to it. Exact ties (equal log-probs and
advantages) stay exact ties under any layout and break by id.

Cost per mini-batch: one all-reduce of a few float64 sums (means, count, input check),
two all-gathers of at most ``K`` values / ids per rank, a handful of scalar host syncs,
and ``O(n)`` device work; no per-token data leaves the device. The public
implementation copies the covariance to the host and runs a CPU top-k or random
choice on every micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from covrl.algorithms._common import (
    ProcessGroup,
    all_reduce_sum,
    as_bool_mask,
    group_size,
    selection_count,
)
from covrl.algorithms.config import PolicyLossConfig
from covrl.algorithms.covariance import (
    SelectionBatch,
    covariance_means,
    token_covariance,
)
from covrl.algorithms.metrics import covariance_summary
from covrl.algorithms.policy_loss import ppo_surrogate

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


def uniform_keys(token_ids: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """Pseudo-random non-negative int64 keys (62 bits) of ``token_ids`` for (seed, step).

    A pure function of (seed, step, id) in exact integer arithmetic, so the same on
    every rank and device. The ``n`` smallest keys of a set are a uniform random
    ``n``-subset.
    """
    state = _splitmix64((seed & _MASK64) ^ _splitmix64(step & _MASK64))
    lanes = []
    for salt in (0x243F6A88, 0x85A308D3):
        s = _splitmix64(state ^ salt)
        lo = token_ids & _MASK32
        hi = (token_ids >> 32) & _MASK32
        h = _fmix32(lo ^ _fmix32(hi ^ (s & _MASK32)))
        lanes.append(_fmix32(h ^ (s >> 32)) & 0x7FFFFFFF)
    return (lanes[0] << 31) | lanes[1]


# --- Exact distributed top-K under (value desc, id asc) -------------------------------

_ID_MAX = torch.iinfo(torch.int64).max


def lowest(dtype: torch.dtype) -> float | int:
    """The fill value that sorts below every eligible entry (``-inf`` / int64 min)."""
    return float("-inf") if dtype.is_floating_point else torch.iinfo(dtype).min


def _top_values(segments: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """The ``k`` largest values over all segments (fewer if they hold fewer)."""
    parts = [torch.topk(s.flatten(), min(k, s.numel()), sorted=False).values for s in segments]
    merged = torch.cat(parts) if len(parts) > 1 else parts[0]
    return torch.topk(merged, min(k, merged.numel()), sorted=False).values


def _all_gather_padded(t: torch.Tensor, size: int, fill, group: ProcessGroup | None):
    """Concatenation over ``group`` of ``t`` padded with ``fill`` to ``size``."""
    if group_size(group) == 1:
        return t
    padded = torch.full((size,), fill, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    out = [torch.empty_like(padded) for _ in range(group_size(group))]
    dist.all_gather(out, padded, group=group)
    return torch.cat(out)


def top_k_threshold(
    values: Sequence[torch.Tensor],
    ids: Sequence[torch.Tensor],
    k: int,
    group: ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``k``-th greatest ``(value, id)`` of a scope, under (value desc, id asc).

    Args:
        values: this rank's segments (e.g. one per micro-batch, any shape) of float64 or
            int64 keys, larger is better; entries that take no part hold
            :func:`lowest` of the dtype, every other entry is above it.
        ids: int64 ids shaped like ``values``, unique over the scope.
        k: how many to select over the scope (the same on every rank).
        group: the ranks holding the rest of the scope (None: this process only).

    Returns:
        ``(v*, id*)`` scalar tensors, identical on every rank; the selection is
        :func:`at_or_above` them. With fewer than ``k`` eligible entries in the
        scope, the smallest of them. None if there are none or ``k == 0``.
    """
    if k <= 0 or not values:
        return None
    floor = lowest(values[0].dtype)
    top = _all_gather_padded(_top_values(values, k), k, floor, group)
    top = top[top > floor]
    k_eff = min(k, top.numel())
    if k_eff == 0:
        return None
    top = torch.topk(top, k_eff, sorted=False).values
    v = top.min()
    need = k_eff - int((top > v).sum())  # >= 1: v itself is in the top k_eff
    tied = [torch.where(s == v, i, _ID_MAX).flatten() for s, i in zip(values, ids, strict=True)]
    tied = _top_values([-t for t in tied], need)  # the need smallest, negated
    tied = -_all_gather_padded(tied, need, -_ID_MAX, group)
    return v, torch.topk(tied, need, largest=False, sorted=False).values.max()


def at_or_above(
    values: torch.Tensor,
    ids: torch.Tensor,
    threshold: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Bool, shaped like ``values``: ordered at or above ``threshold`` (None: nothing)."""
    if threshold is None:
        return torch.zeros_like(values, dtype=torch.bool)
    v, i = threshold
    return (values > v) | ((values == v) & (ids <= i))


def select_top_k(
    values: torch.Tensor,
    ids: torch.Tensor,
    eligible: torch.Tensor,
    k: int,
    group: ProcessGroup | None = None,
) -> torch.Tensor:
    """Bool, shaped like ``values``: the eligible entries among the scope's top ``k``."""
    values = torch.where(eligible, values, lowest(values.dtype))
    return eligible & at_or_above(values, ids, top_k_threshold([values], [ids], k, group))


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
            ``compute_cov_stats`` ``cov/mean`` and ``cov/top_<pct>`` (mean covariance
            of the top fraction of tokens, over the mini-batch scope).
    """

    masks: list[torch.Tensor] | None
    metrics: dict[str, float] = field(default_factory=dict)


def _clip_cov_candidates(
    cov: torch.Tensor,
    batch: SelectionBatch,
    cur_logp: torch.Tensor | None,
    config: PolicyLossConfig,
) -> torch.Tensor:
    """``[b, s]`` bool: inside the band (so valid) and not PPO-clipped (given current logp)."""
    cc = config.entropy_control.clip_cov
    band = (cov > cc.omega_low) & (cov < cc.omega_high)  # padding holds -inf
    if cur_logp is not None:
        # Tokens the PPO clip already silences would waste the budget. Same dtype and
        # formula as the loss, so the flags agree with what the loss will do.
        log_ratio = (cur_logp - batch.old_logp).clamp(
            -config.log_ratio_clamp, config.log_ratio_clamp
        )
        _, clipped, dual = ppo_surrogate(
            torch.exp(log_ratio),
            batch.advantages,
            config.clip_ratio_low,
            config.clip_ratio_high,
            config.clip_ratio_c,
        )
        band = band & ~clipped & ~dual
    return band


def _select_in_scope(
    batches: Sequence[SelectionBatch],
    covs: Sequence[torch.Tensor],
    cur_logps: Sequence[torch.Tensor | None],
    num_tokens: int,
    config: PolicyLossConfig,
    step: int,
    group: ProcessGroup | None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-micro-batch ``[b, s]`` selections of one scope, and its local candidate count.

    ``covs`` hold ``-inf`` at padding. KL-Cov ranks every valid token in the
    micro-batches' own layouts; Clip-Cov compacts its few band candidates first and
    hashes only those.
    """
    ec = config.entropy_control
    k = selection_count(ec.selection_ratio, num_tokens)
    ids = [b.token_ids for b in batches]
    if ec.method == "kl_cov":
        threshold = top_k_threshold(covs, ids, k, group)
        selected = [at_or_above(c, i, threshold) for c, i in zip(covs, ids, strict=True)]
        return selected, torch.zeros((), dtype=torch.int64, device=covs[0].device)

    cand = [
        _clip_cov_candidates(c, b, lp, config)
        for c, b, lp in zip(covs, batches, cur_logps, strict=True)
    ]
    flat_cand = torch.cat([c.flatten() for c in cand])
    pos = torch.nonzero(flat_cand).squeeze(1)
    cand_ids = torch.cat([i.flatten() for i in ids])[pos]
    keys = -uniform_keys(cand_ids, ec.seed, step)  # smallest key first
    chosen = at_or_above(keys, cand_ids, top_k_threshold([keys], [cand_ids], k, group))
    flat_sel = torch.zeros_like(flat_cand)
    flat_sel[pos] = chosen
    parts = flat_sel.split([c.numel() for c in cand])
    return [p.view_as(c) for p, c in zip(parts, cand, strict=True)], flat_cand.sum()


def prepare_selection(
    batches: Sequence[SelectionBatch],
    config: PolicyLossConfig,
    *,
    step: int,
    group: ProcessGroup | None = None,
) -> SelectionResult:
    """Select the Clip-Cov / KL-Cov tokens of one optimizer mini-batch.

    Call once per mini-batch, before its gradient micro-batches, with every local
    micro-batch of the mini-batch (same tensors/layout the loss will see) on every rank
    of ``group``. ``group`` is the group across which the mini-batch's tokens are
    partitioned: the data-parallel group (with context parallelism, DP x CP); run on
    the ranks that hold log-probs (the last pipeline stage). None: single process.

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
    masks = [as_bool_mask(b.mask) for b in batches]
    cov_logps = [b.logp if use_current else b.old_logp for b in batches]
    cur = [b.logp if use_current else None for b in batches]
    advs = [b.advantages for b in batches]

    means = covariance_means(
        cov_logps,
        advs,
        masks,
        group,
        names=("logp" if use_current else "old_logp", "advantages"),
        also_check={"old_logp": [b.old_logp for b in batches]} if use_current else None,
        check=config.check_finite,
    )
    covs = [
        token_covariance(lp, a, m, means, fill=float("-inf"))
        for lp, a, m in zip(cov_logps, advs, masks, strict=True)
    ]
    num_tokens = means.count

    metrics: dict[str, float] = {"entropy_control/num_tokens": float(num_tokens)}
    out_masks: list[torch.Tensor] | None = None
    if ec.method != "none":
        if ec.scope == "minibatch":
            out_masks, n_cand = _select_in_scope(
                batches, covs, cur, num_tokens, config, step, group
            )
        else:
            out_masks, cands = [], []
            for b, m, lp, c in zip(batches, masks, cov_logps, cur, strict=True):
                local = covariance_means([lp], [b.advantages], [m], None, check=False)
                cov = token_covariance(lp, b.advantages, m, local, fill=float("-inf"))
                sel, nc = _select_in_scope([b], [cov], [c], local.count, config, step, None)
                out_masks += sel
                cands.append(nc)
            n_cand = torch.stack(cands).sum()
        n_sel = torch.stack([s.sum() for s in out_masks]).sum()
        counts = torch.stack([n_sel, n_cand])
        all_reduce_sum(counts, group)
        n_sel, n_cand = counts.tolist()
        metrics["entropy_control/selected_tokens"] = float(n_sel)
        metrics["entropy_control/selected_fraction"] = n_sel / max(num_tokens, 1)
        if ec.method == "clip_cov":
            metrics["entropy_control/candidates"] = float(n_cand)

    if ec.compute_cov_stats:
        metrics.update(covariance_summary(covs, num_tokens, ec.cov_top_fractions, group))
    return SelectionResult(out_masks, metrics)
