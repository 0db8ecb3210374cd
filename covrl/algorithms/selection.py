"""Exact, scope-global token selection for Clip-Cov and KL-Cov.

Both methods pick the ``K`` greatest tokens of a scope under a strict total order:

* KL-Cov: by covariance, largest first;
* Clip-Cov: among the band candidates, by a pseudo-random key
  ``hash(seed, step, token id)``, smallest first, which is a uniform draw without
  replacement that every rank reproduces from (seed, step) alone.

Ties in the primary value are broken by the canonical token id (smaller id wins), so
the order is strict and the selected set is a function of the scope's *data*, not of
how it is split into micro-batches or data-parallel ranks.

Distributed algorithm (:func:`top_k_threshold`), with no gather of all tokens:

1. each rank takes its local top-``K`` candidates under the total order;
2. one ``all_gather`` of ``[3, K]`` int64 (value bits, id, valid flag) per rank;
3. every rank computes the global ``K``-th element ``(v*, id*)`` from the gathered
   candidates (the global top-``K`` are among the union of the local top-``K``);
4. a token is selected iff it is ordered at or above ``(v*, id*)``: a local compare.

Cost per mini-batch: two scalar host syncs (the token count and a tie count), the
means all-reduce of 3 float64, the all-gather of ``3 * K * dp`` int64, and
``O(n)`` device work, against the public implementation's device-to-host copy and CPU
top-k on every micro-batch.
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


def _local_top_k(
    values: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` greatest ``(value, id)`` pairs (value descending, then id ascending)."""
    if k >= values.numel():
        return values, ids
    if k == 0:
        return values[:0], ids[:0]
    kth_value = torch.topk(values, k, sorted=False).values.min()
    above = values > kth_value
    need = k - int(above.sum())
    tied_ids = ids[values == kth_value]
    chosen = torch.topk(tied_ids, need, largest=False, sorted=False).values
    return (
        torch.cat([values[above], kth_value.expand(need)]),
        torch.cat([ids[above], chosen]),
    )


def top_k_threshold(
    values: torch.Tensor, ids: torch.Tensor, k: int, group: ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``k``-th greatest ``(value, id)`` of the union of ``values`` over ``group``.

    Args:
        values: ``[n]`` float64 or int64 primary keys (larger is better) on this rank.
        ids: ``[n]`` int64 ids, unique over the group (the tie-break; smaller is better).
        k: how many to select globally (the same on every rank).
        group: the ranks holding the rest of the scope (None: this process only).

    Returns:
        ``(value, id)`` scalars, identical on every rank; None if the union is empty
        or ``k == 0``. With fewer than ``k`` elements in all, the smallest element.
    """
    cand_v, cand_i = _local_top_k(values, ids, k)
    if group_size(group) > 1:
        is_float = values.dtype.is_floating_point
        packed = torch.zeros(3, k, dtype=torch.int64, device=values.device)
        n = cand_v.numel()
        packed[0, :n] = cand_v.view(torch.int64) if is_float else cand_v
        packed[1, :n] = cand_i
        packed[2, :n] = 1
        gathered = [torch.empty_like(packed) for _ in range(group_size(group))]
        dist.all_gather(gathered, packed, group=group)
        allc = torch.cat(gathered, dim=1)
        valid = allc[2] == 1
        cand_v = allc[0][valid]
        cand_v = cand_v.view(values.dtype) if is_float else cand_v
        cand_v, cand_i = _local_top_k(cand_v, allc[1][valid], k)
    if cand_v.numel() == 0:
        return None
    worst_v = cand_v.min()
    return worst_v, cand_i[cand_v == worst_v].max()


def select_top_k(
    values: torch.Tensor,
    ids: torch.Tensor,
    eligible: torch.Tensor,
    k: int,
    group: ProcessGroup | None,
) -> torch.Tensor:
    """``[n]`` bool: the eligible tokens among the global top-``k`` (see module doc)."""
    threshold = top_k_threshold(values[eligible], ids[eligible], k, group)
    if threshold is None:
        return torch.zeros_like(eligible)
    v, i = threshold
    return eligible & ((values > v) | ((values == v) & (ids <= i)))


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


def _eligible_and_keys(
    method: str,
    cov: torch.Tensor,
    ids: torch.Tensor,
    cur_logp: torch.Tensor | None,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    config: PolicyLossConfig,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat ``[n]`` eligibility and ordering keys of one scope's (or micro-batch's) tokens."""
    ec = config.entropy_control
    if method == "kl_cov":
        return torch.ones_like(cov, dtype=torch.bool), cov
    band = (cov > ec.clip_cov.omega_low) & (cov < ec.clip_cov.omega_high)
    if cur_logp is not None:
        # Tokens the PPO clip already silences would waste the budget.
        log_ratio = (cur_logp.double() - old_logp.double()).clamp(
            -config.log_ratio_clamp, config.log_ratio_clamp
        )
        _, clipped, dual = ppo_surrogate(
            torch.exp(log_ratio),
            adv.double(),
            config.clip_ratio_low,
            config.clip_ratio_high,
            config.clip_ratio_c,
        )
        band = band & ~clipped & ~dual
    return band, -uniform_keys(ids, ec.seed, step)


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
        batches: the mini-batch's local micro-batches.
        config: the loss config (method, scope, seed, clip ranges).
        step: optimizer step; with ``entropy_control.seed`` it fixes Clip-Cov's draw.
        group: see above.

    Collectives: every rank of ``group`` must call this with the same config and step.
    """
    ec = config.entropy_control
    use_current = ec.logp_source == "current"
    for i, b in enumerate(batches):
        b.validate(config.check_finite)
        if use_current and b.logp is None:
            raise ValueError(
                f"batches[{i}].logp is None but entropy_control.logp_source='current' "
                "needs the current parameters' log-probs"
            )
    masks = [as_bool_mask(b.mask) for b in batches]
    cov_logps = [b.logp if use_current else b.old_logp for b in batches]
    advs = [b.advantages for b in batches]
    device = masks[0].device if masks else torch.device("cpu")

    means = covariance_means(cov_logps, advs, masks, group)
    covs = [
        token_covariance(lp, a, m, means) for lp, a, m in zip(cov_logps, advs, masks, strict=True)
    ]
    flat_cov = _flatten(covs, masks)
    num_tokens = int(means.num_tokens.item())

    metrics: dict[str, float] = {"entropy_control/num_tokens": float(num_tokens)}
    out_masks: list[torch.Tensor] | None = None
    if ec.method != "none":
        cur = [b.logp if use_current else None for b in batches]
        counts = torch.zeros(2, dtype=torch.int64, device=device)
        if ec.scope == "minibatch":
            flat_ids = _flatten([b.token_ids for b in batches], masks)
            eligible, keys = _eligible_and_keys(
                ec.method,
                flat_cov,
                flat_ids,
                _flatten(cur, masks) if use_current else None,
                _flatten([b.old_logp for b in batches], masks),
                _flatten(advs, masks),
                config,
                step,
            )
            k = selection_count(ec.selection_ratio, num_tokens)
            selected = select_top_k(keys, flat_ids, eligible, k, group)
            out_masks = _unflatten(selected, masks)
            counts[0] += selected.sum()
            counts[1] += eligible.sum()
        else:
            out_masks = []
            for b, m, lp, c in zip(batches, masks, cov_logps, cur, strict=True):
                local = covariance_means([lp], [b.advantages], [m], None)
                cov = token_covariance(lp, b.advantages, m, local)[m]
                eligible, keys = _eligible_and_keys(
                    ec.method,
                    cov,
                    b.token_ids[m],
                    None if c is None else c[m],
                    b.old_logp[m],
                    b.advantages[m],
                    config,
                    step,
                )
                k = selection_count(ec.selection_ratio, int(m.sum()))
                selected = select_top_k(keys, b.token_ids[m], eligible, k, None)
                out_masks.extend(_unflatten(selected, [m]))
                counts[0] += selected.sum()
                counts[1] += eligible.sum()
        all_reduce_sum(counts, group)
        n_sel, n_cand = counts.tolist()
        metrics["entropy_control/selected_tokens"] = float(n_sel)
        metrics["entropy_control/selected_fraction"] = n_sel / max(num_tokens, 1)
        if ec.method == "clip_cov":
            metrics["entropy_control/candidates"] = float(n_cand)

    if ec.compute_cov_stats:
        metrics.update(covariance_summary(flat_cov, num_tokens, ec.cov_top_fractions, group))
    return SelectionResult(out_masks, metrics)


def _flatten(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """The valid entries of ``[b, s]`` tensors, concatenated in micro-batch order."""
    if not masks:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t[m] for t, m in zip(tensors, masks, strict=True)])


def _unflatten(flat: torch.Tensor, masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Scatter a flat ``[sum n_i]`` bool over valid positions back to ``[b, s]`` masks."""
    sizes = torch.stack([m.sum() for m in masks]).tolist() if masks else []
    out = []
    for m, chunk in zip(masks, torch.split(flat, sizes), strict=True):
        full = torch.zeros_like(m)
        full[m] = chunk
        out.append(full)
    return out
