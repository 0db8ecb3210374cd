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
    CovarianceMeans,
    SelectionBatch,
    check_scope_sums,
    covariance_means,
    masked_scope_sums,
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
    # The tied entries are few (usually one): compact them rather than rank every id.
    tied = torch.cat([i[s == v] for s, i in zip(values, ids, strict=True)])
    tied = torch.topk(tied, min(need, tied.numel()), largest=False, sorted=False).values
    tied = _all_gather_padded(tied, need, _ID_MAX, group)
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


@dataclass
class _LocalTokens:
    """This rank's micro-batches of one scope, flattened and concatenated.

    Every ``[b_i, s_i]`` tensor becomes one ``[n]`` tensor (``n = sum_i b_i s_i``,
    padding included), so the selection costs a fixed number of ops whatever the
    number of micro-batches; :meth:`split` gives per-micro-batch views back. One
    micro-batch costs no copy.
    """

    mask: torch.Tensor
    advantages: torch.Tensor
    old_logp: torch.Tensor
    cov_logp: torch.Tensor
    cur_logp: torch.Tensor | None
    ids: torch.Tensor
    shapes: list[torch.Size]

    @classmethod
    def concat(cls, batches: Sequence[SelectionBatch], use_current: bool) -> _LocalTokens:
        def flat(tensors) -> torch.Tensor:
            parts = [t.detach().reshape(-1) for t in tensors]
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        old_logp = flat(b.old_logp for b in batches)
        cur_logp = flat(b.logp for b in batches) if use_current else None
        return cls(
            mask=flat(as_bool_mask(b.mask) for b in batches),
            advantages=flat(b.advantages for b in batches),
            old_logp=old_logp,
            cov_logp=old_logp if cur_logp is None else cur_logp,
            cur_logp=cur_logp,
            ids=flat(b.token_ids for b in batches),
            shapes=[b.mask.shape for b in batches],
        )

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``[n]`` -> one view per micro-batch, in its ``[b, s]`` layout."""
        parts = flat.split([s.numel() for s in self.shapes])
        return [p.view(s) for p, s in zip(parts, self.shapes, strict=True)]


def _clip_cov_candidates(
    cov: torch.Tensor, tokens: _LocalTokens, config: PolicyLossConfig
) -> torch.Tensor:
    """``[c]`` positions (into the ``[n]`` tokens) inside the band (so valid) and not
    PPO-clipped (given current logp), increasing."""
    cc = config.entropy_control.clip_cov
    pos = torch.nonzero((cov > cc.omega_low) & (cov < cc.omega_high)).squeeze(1)  # pad: -inf
    if tokens.cur_logp is not None:
        # Tokens the PPO clip already silences would waste the budget. Same dtype and
        # elementwise formula as the loss, so the flags agree with what the loss will
        # do; only the few band tokens are evaluated.
        old_logp = tokens.old_logp[pos]
        log_ratio = (tokens.cur_logp[pos] - old_logp).clamp(
            -config.log_ratio_clamp, config.log_ratio_clamp
        )
        _, clipped, dual = ppo_surrogate(
            torch.exp(log_ratio),
            tokens.advantages[pos],
            config.clip_ratio_low,
            config.clip_ratio_high,
            config.clip_ratio_c,
        )
        pos = pos[~(clipped | dual)]
    return pos


def _select_in_scope(
    tokens: _LocalTokens,
    cov: torch.Tensor,
    num_tokens: int,
    config: PolicyLossConfig,
    step: int,
    group: ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n]`` bool selection of one scope's local tokens, and the local candidate count.

    ``cov`` is ``[n]`` float64 with ``-inf`` at padding. KL-Cov ranks every valid
    token; Clip-Cov compacts its few band candidates first and hashes only those.
    """
    ec = config.entropy_control
    k = selection_count(ec.selection_ratio, num_tokens)
    if ec.method == "kl_cov":
        threshold = top_k_threshold([cov], [tokens.ids], k, group)
        return at_or_above(cov, tokens.ids, threshold), torch.zeros(
            (), dtype=torch.int64, device=cov.device
        )

    pos = _clip_cov_candidates(cov, tokens, config)
    cand_ids = tokens.ids[pos]
    keys = -uniform_keys(cand_ids, ec.seed, step)  # smallest key first
    chosen = at_or_above(keys, cand_ids, top_k_threshold([keys], [cand_ids], k, group))
    selected = torch.zeros_like(tokens.mask)
    selected[pos] = chosen
    return selected, torch.tensor(pos.numel(), dtype=torch.int64, device=cov.device)


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
    tokens = _LocalTokens.concat(batches, use_current)

    # One float64 all-reduce of the scope sums: means, count, and the input check.
    columns = [[tokens.cov_logp], [tokens.advantages]]
    local = {
        ("logp" if use_current else "old_logp"): [
            b.logp if use_current else b.old_logp for b in batches
        ],
        "advantages": [b.advantages for b in batches],
    }
    if use_current:
        columns.append([tokens.old_logp])
        local["old_logp"] = [b.old_logp for b in batches]
    sums = masked_scope_sums(columns, [tokens.mask], group)
    values = sums.tolist()
    if config.check_finite:
        check_scope_sums(values[:-1], local, [b.mask for b in batches])
    means = CovarianceMeans.from_sums(sums, values)
    num_tokens = means.count
    cov = token_covariance(
        tokens.cov_logp, tokens.advantages, tokens.mask, means, fill=float("-inf")
    )

    metrics: dict[str, float] = {"entropy_control/num_tokens": float(num_tokens)}
    out_masks: list[torch.Tensor] | None = None
    if ec.method != "none":
        if ec.scope == "minibatch":
            selected, n_cand = _select_in_scope(tokens, cov, num_tokens, config, step, group)
        else:
            parts, cands = [], []
            for b in batches:
                mb = _LocalTokens.concat([b], use_current)
                m_means = covariance_means(
                    [mb.cov_logp], [mb.advantages], [mb.mask], None, check=False
                )
                m_cov = token_covariance(
                    mb.cov_logp, mb.advantages, mb.mask, m_means, fill=float("-inf")
                )
                sel, nc = _select_in_scope(mb, m_cov, m_means.count, config, step, None)
                parts.append(sel)
                cands.append(nc)
            selected, n_cand = torch.cat(parts), torch.stack(cands).sum()
        counts = torch.stack([selected.sum(), n_cand])
        all_reduce_sum(counts, group)
        n_sel, n_cand = counts.tolist()
        out_masks = tokens.split(selected)
        metrics["entropy_control/selected_tokens"] = float(n_sel)
        metrics["entropy_control/selected_fraction"] = n_sel / max(num_tokens, 1)
        if ec.method == "clip_cov":
            metrics["entropy_control/candidates"] = float(n_cand)

    if ec.compute_cov_stats:
        metrics.update(covariance_summary([cov], num_tokens, ec.cov_top_fractions, group))
    return SelectionResult(out_masks, metrics)
