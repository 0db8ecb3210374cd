"""Per-step metrics: covariance summary (paper, Table 1) and policy-loss statistics.

Covariance summary: the mean covariance and the mean of the top ``f`` fraction of
tokens, over the whole scope (all micro-batches, all ranks of the group). The top-``K``
mean only needs the exact global ``K``-th largest value ``v*``:
``(sum_{v > v*} v + (K - #{v > v*}) v*) / K``. ``v*`` is found by a radix select on
order-preserving int64 images of the float64 values: eight rounds, each one all-reduce
of a ``[num_fractions, 256]`` histogram, whatever ``K`` is (50% of the tokens costs the
same as 0.02%), and the work per round shrinks with the candidates.

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
    return torch.where(bits < 0, bits ^ _LOW63, bits)


def ordered_int_to_float(k: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`float_to_ordered_int`."""
    return torch.where(k < 0, k ^ _LOW63, k).contiguous().view(torch.float64)


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
    m = len(ranks)
    device = keys[0].device
    remaining = torch.tensor(list(ranks), dtype=torch.int64, device=device)
    prefix = torch.zeros(m, dtype=torch.int64, device=device)
    flat = [k.flatten() for k in keys]
    cands: list[torch.Tensor] = []
    for level in range(7, -1, -1):
        shift = 8 * level
        hist = torch.zeros(m, 256, dtype=torch.int64, device=device)
        if level == 7:
            # Every query starts from all keys: one histogram serves them all. The top
            # byte's arithmetic shift is signed; +128 orders it as 0..255.
            for k in flat:
                hist += torch.bincount((k >> shift) + 128, minlength=256)
        else:
            for j, c in enumerate(cands):
                hist[j] = torch.bincount((c >> shift) & 0xFF, minlength=256)
        all_reduce_sum(hist, group)
        at_least = hist.flip(1).cumsum(1)  # at_least[:, i] = #{digit >= 255 - i}
        i = torch.searchsorted(at_least, remaining.unsqueeze(1)).squeeze(1).clamp(max=255)
        above = torch.where(
            i > 0, at_least.gather(1, (i - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0
        )
        remaining = remaining - above
        digit = 255 - i
        if level == 7:
            prefix = digit - 128
            # Keep, per query, only the keys that share the chosen top byte.
            cands = [torch.cat([k[(k >> shift) == prefix[j]] for k in flat]) for j in range(m)]
        else:
            prefix = prefix * 256 + digit
            cands = [c[(c >> shift) == prefix[j]] for j, c in enumerate(cands)]
    return prefix


def _pct_label(f: float) -> str:
    return f"{f * 100:g}%"


def covariance_summary(
    cov: Sequence[torch.Tensor],
    num_tokens: int,
    fractions: Sequence[float],
    group: ProcessGroup | None,
) -> dict[str, float]:
    """``cov/mean`` and ``cov/top_<pct>`` over the scope.

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
    m = len(ks)
    # -inf padding maps to the lowest key; ranks stay <= N so it is never reached.
    keys = [float_to_ordered_int(c) for c in cov]
    kth = kth_largest(keys, ks, group)
    sums = torch.zeros(1 + 2 * m, dtype=torch.float64, device=kth.device)
    for c, k in zip(cov, keys, strict=True):
        c, k = c.flatten(), k.flatten()
        sums[0] += torch.where(c > float("-inf"), c, 0.0).sum()
        for j in range(m):
            above = k > kth[j]
            sums[1 + j] += torch.where(above, c, 0.0).sum()
            sums[1 + m + j] += above.sum()
    all_reduce_sum(sums, group)
    k_t = torch.tensor(ks, dtype=torch.float64, device=kth.device)
    top = (sums[1 : 1 + m] + (k_t - sums[1 + m :]) * ordered_int_to_float(kth)) / k_t
    values = [sums[0].item() / num_tokens] + top.tolist()
    return dict(zip(names, values, strict=True))


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
