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
    keys: torch.Tensor, ranks: Sequence[int], group: ProcessGroup | None
) -> torch.Tensor:
    """Exact ``r``-th largest int64 key of the union of ``keys`` over ``group``, per rank ``r``.

    Args:
        keys: ``[n]`` int64 on this rank.
        ranks: 1-based ranks, each ``1 <= r <= total count over the group``.
        group: None for a single process.

    Returns:
        ``[len(ranks)]`` int64 keys, identical on every rank.
    """
    m = len(ranks)
    device = keys.device
    remaining = torch.tensor(list(ranks), dtype=torch.int64, device=device)
    prefix = torch.zeros(m, dtype=torch.int64, device=device)
    cands = [keys] * m
    for level in range(7, -1, -1):
        shift = 8 * level
        digits = []
        hist = torch.zeros(m, 256, dtype=torch.int64, device=device)
        for j, c in enumerate(cands):
            # Top byte: arithmetic shift gives the signed byte; +128 makes it ordered 0..255.
            d = (c >> shift) + 128 if level == 7 else (c >> shift) & 0xFF
            digits.append(d)
            hist[j] = torch.bincount(d, minlength=256)
        all_reduce_sum(hist, group)
        at_least = hist.flip(1).cumsum(1)  # at_least[:, i] = #{digit >= 255 - i}
        i = torch.searchsorted(at_least, remaining.unsqueeze(1)).squeeze(1).clamp(max=255)
        above = torch.where(
            i > 0, at_least.gather(1, (i - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0
        )
        remaining = remaining - above
        digit = 255 - i
        prefix = digit - 128 if level == 7 else prefix * 256 + digit
        cands = [c[d == digit[j]] for j, (c, d) in enumerate(zip(cands, digits, strict=True))]
    return prefix


def _pct_label(f: float) -> str:
    return f"{f * 100:g}%"


def covariance_summary(
    cov: torch.Tensor,
    num_tokens: int,
    fractions: Sequence[float],
    group: ProcessGroup | None,
) -> dict[str, float]:
    """``cov/mean`` and ``cov/top_<pct>`` over the scope.

    Args:
        cov: ``[n]`` float64 covariance of this rank's valid tokens (global means).
        num_tokens: the scope's token count (the same on every rank).
        fractions: top fractions, e.g. ``(2e-4, 2e-3, 2e-2, 0.2, 0.5)``;
            ``K = max(1, floor(f * N))``.
    """
    if num_tokens == 0:
        out = {"cov/mean": 0.0}
        out.update({f"cov/top_{_pct_label(f)}": 0.0 for f in fractions})
        return out
    ks = [selection_count(f, num_tokens) for f in fractions]
    keys = float_to_ordered_int(cov)
    kth = kth_largest(keys, ks, group)
    above = keys.unsqueeze(0) > kth.unsqueeze(1)  # [m, n]
    sums = torch.cat(
        [
            cov.sum().view(1),
            torch.where(above, cov.unsqueeze(0), 0.0).sum(dim=1),
            above.sum(dim=1).double(),
        ]
    )
    all_reduce_sum(sums, group)
    m = len(ks)
    k_t = torch.tensor(ks, dtype=torch.float64, device=cov.device)
    top = (sums[1 : 1 + m] + (k_t - sums[1 + m :]) * ordered_int_to_float(kth)) / k_t
    values = [sums[0].item() / num_tokens] + top.tolist()
    names = ["cov/mean"] + [f"cov/top_{_pct_label(f)}" for f in fractions]
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
