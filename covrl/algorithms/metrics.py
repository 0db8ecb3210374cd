"""Per-step metrics: covariance summary (paper, Table 1) and policy-loss statistics.

Covariance summary: the mean covariance and the mean of the top ``f`` fraction of
tokens, over the whole scope (all micro-batches, all ranks of the group). The top-``K``
mean only needs the exact global ``K``-th largest value ``v*``:
``(sum_{v > v*} v + (K - #{v > v*}) v*) / K``. ``v*`` is found by a radix select on
order-preserving int64 images of the float64 values: four rounds of 16-bit digits, each
one all-reduce of an int64 histogram, whatever ``K`` is (50% of the
tokens costs the same as 0.02%); the first round covers every token once for all
fractions, later rounds only the tokens sharing the chosen prefix.

Loss statistics are accumulated per micro-batch as ``(sum, count)`` pairs (the
Megatron reporting convention) and reduced once per step by
:func:`reduce_metric_sums`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from covrl.algorithms._common import ProcessGroup, all_reduce_sum, masked, selection_count
from covrl.algorithms.policy_loss import PolicyLossOutput

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


def _flat_cat(segments: Sequence[torch.Tensor]) -> torch.Tensor:
    """The segments flattened and concatenated (a view for a single segment)."""
    return (
        segments[0].reshape(-1)
        if len(segments) == 1
        else torch.cat([s.reshape(-1) for s in segments])
    )


def _radix_select(
    keys: torch.Tensor, ranks: Sequence[int], group: ProcessGroup | None
) -> torch.Tensor:
    """Exact ``r``-th largest of a scope's int64 keys (``keys`` ``[n]``: this rank's).

    Four rounds of 16-bit digits, most significant first; each round one all-reduce of
    an int64 histogram. The first round's histogram over all keys serves every query;
    later rounds only see the keys that share the query's chosen prefix (usually a
    small fraction), ``[len(ranks), 65536]``.

    Returns ``[len(ranks)]`` int64, identical on every rank.
    """
    m = len(ranks)
    device = keys.device
    remaining = torch.tensor(list(ranks), dtype=torch.int64, device=device)
    prefix = torch.zeros(m, dtype=torch.int64, device=device)
    cands: list[torch.Tensor] = []
    for level in range(64 // _DIGIT_BITS - 1, -1, -1):
        shift = _DIGIT_BITS * level
        if not cands:
            # The top digit's arithmetic shift is signed; the offset orders it 0..65535.
            top = (keys >> shift).add_(_NUM_BINS // 2)
            hist = torch.bincount(top, minlength=_NUM_BINS)
            hist = all_reduce_sum(hist.unsqueeze(0), group).expand(m, _NUM_BINS)
        else:
            hist = torch.stack(
                [torch.bincount((c >> shift) & (_NUM_BINS - 1), minlength=_NUM_BINS) for c in cands]
            )
            all_reduce_sum(hist, group)
        at_least = hist.flip(1).cumsum(1)  # at_least[:, i] = #{digit >= 65535 - i}
        i = torch.searchsorted(at_least, remaining.unsqueeze(1)).squeeze(1)
        i = i.clamp(max=_NUM_BINS - 1)
        above = at_least.gather(1, (i - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        remaining = remaining - torch.where(i > 0, above, 0)
        digit = _NUM_BINS - 1 - i
        if not cands:
            prefix = digit - _NUM_BINS // 2
            # One pass over all keys pools every query's bucket (a lookup table of the
            # chosen digits); split the pool per query.
            chosen = torch.zeros(_NUM_BINS, dtype=torch.bool, device=device)
            chosen[digit] = True
            pool = keys[chosen[top]]
            cands = [pool[(pool >> shift) == prefix[j]] for j in range(m)]
        else:
            prefix = (prefix << _DIGIT_BITS) | digit
            cands = [c[(c >> shift) == prefix[j]] for j, c in enumerate(cands)]
    return prefix


def kth_largest(
    keys: Sequence[torch.Tensor], ranks: Sequence[int], group: ProcessGroup | None
) -> torch.Tensor:
    """Exact ``r``-th largest int64 key of a scope, for each rank ``r``.

    Args:
        keys: this rank's segments of int64 keys (any shapes).
        ranks: 1-based ranks, each ``1 <= r <= total count over the group``.
        group: the ranks holding the rest of the scope (None: this process only).

    Returns:
        ``[len(ranks)]`` int64 keys, identical on every rank.
    """
    return _radix_select(_flat_cat(keys), ranks, group)


def _pct_label(f: float) -> str:
    return f"{f * 100:g}%"


def covariance_summary(
    cov: Sequence[torch.Tensor],
    num_tokens: int,
    fractions: Sequence[float],
    group: ProcessGroup | None,
) -> dict[str, float]:
    """``cov/mean`` and ``cov/top_<pct>`` over the scope.

    Four radix rounds, the sums above each ``v*``, five all-reduces and one host sync
    in all.

    Args:
        cov: this rank's segments (e.g. ``[b, s]`` per micro-batch) of float64
            covariance, computed with the scope's means, ``-inf`` at padding.
        num_tokens: the scope's valid-token count (the same on every rank).
        fractions: top fractions, e.g. ``(2e-4, 2e-3, 2e-2, 0.2, 0.5)``;
            ``K = max(1, floor(f * N))``.
    """
    names = ["cov/mean"] + [f"cov/top_{_pct_label(f)}" for f in fractions]
    if num_tokens == 0:
        return dict.fromkeys(names, 0.0)
    ks = [selection_count(f, num_tokens) for f in fractions]
    values = _flat_cat(cov)
    # -inf padding maps to the lowest key; ranks stay <= N so it is never reached.
    keys = float_to_ordered_int(values)
    kth = _radix_select(keys, ks, group)
    # Sum of the values above each v*, from the largest K down: the tokens above a
    # threshold are a subset of those above the next lower one, so each query only
    # scans what the previous one kept (about 1.7 N entries for the default fractions).
    m = len(ks)
    sums = torch.zeros(1 + 2 * m, dtype=torch.float64, device=kth.device)
    sums[0] = torch.where(values > float("-inf"), values, 0.0).sum()
    for j in sorted(range(m), key=lambda j: -ks[j]):
        keys = keys[keys > kth[j]]
        sums[1 + j] = ordered_int_to_float(keys).sum()
        sums[1 + m + j] = keys.numel()
    all_reduce_sum(sums, group)
    k_t = torch.tensor(ks, dtype=torch.float64, device=kth.device)
    top = (sums[1 : 1 + m] + (k_t - sums[1 + m :]) * ordered_int_to_float(kth)) / k_t
    return dict(zip(names, torch.cat([sums[:1] / num_tokens, top]).tolist(), strict=True))


def policy_metric_sums(
    out: PolicyLossOutput, entropy: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """``{name: [sum, count]}`` float64 of one micro-batch, to be reduced per step.

    ``pg_clipfrac`` (PPO clip active), ``pg_clipfrac_dual``, ``approx_kl_k2``
    (``0.5 (logp - logp_old)^2``), ``approx_kl_k3`` (k3 estimate of
    KL(pi_old || pi) from the rollout samples), ``entropy`` when given.
    """
    m = out.mask
    n = m.sum().double()
    lr = out.log_ratio.double()
    k3 = torch.exp(lr.clamp(-20, 20)) - 1.0 - lr
    items = {
        "pg_clipfrac": out.clipped.sum().double(),
        "pg_clipfrac_dual": out.dual_clipped.sum().double(),
        "approx_kl_k2": masked(0.5 * lr.square(), m).sum(),
        "approx_kl_k3": masked(k3, m).sum(),
    }
    if entropy is not None:
        items["entropy"] = masked(entropy.detach().double(), m).sum()
    return {k: torch.stack([v, n]) for k, v in items.items()}


def reduce_metric_sums(
    per_microbatch: Sequence[dict[str, torch.Tensor]], group: ProcessGroup | None
) -> dict[str, float]:
    """Sum ``[sum, count]`` pairs over micro-batches and ``group``; return the means.

    One all-reduce for all metrics. Every rank must pass the same metric names.
    """
    names = sorted({k for d in per_microbatch for k in d})
    if not names:
        return {}
    device = next(iter(per_microbatch[0].values())).device
    total = torch.zeros(len(names), 2, dtype=torch.float64, device=device)
    for d in per_microbatch:
        for i, k in enumerate(names):
            if k in d:
                total[i] += d[k].to(torch.float64)
    all_reduce_sum(total, group)
    return {k: (s / c if c > 0 else 0.0) for k, (s, c) in zip(names, total.tolist(), strict=True)}
