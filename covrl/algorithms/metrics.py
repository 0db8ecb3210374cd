"""Per-step metrics: covariance summary (paper, Table 1) and policy-loss statistics.

Covariance summary: the mean covariance and the mean of the top ``f`` fraction of
tokens (``K = max(1, floor(f N))``), over the whole scope (all micro-batches, all
ranks of the group), from the exact global ``K``-th largest covariance: a radix select
whose cost does not depend on ``K`` (:class:`covrl.ops.order_statistics.TopMeans`).
The selection pass feeds it block by block (:class:`CovarianceSummary`), so no
whole-scope temporary is built.

Loss statistics are accumulated per micro-batch as ``(sum, count)`` pairs (the
Megatron reporting convention) and reduced once per step by
:func:`reduce_metric_sums`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from covrl.algorithms.config import selection_count
from covrl.algorithms.policy_loss import PolicyLossOutput
from covrl.ops.masking import masked
from covrl.ops.order_statistics import TopMeans
from covrl.parallel.groups import Group, all_reduce


def _pct_label(f: float) -> str:
    return f"{f * 100:g}%"


class CovarianceSummary:
    """Table-1 covariance summary of a scope whose covariances arrive block by block.

    Feed every block once with :meth:`add`, then read :meth:`result`.

    Args:
        fractions: top fractions, e.g. ``(2e-4, 2e-3, 2e-2, 0.2, 0.5)``.
        device: the device of the blocks.
    """

    def __init__(self, fractions: Sequence[float], device: torch.device):
        self.fractions = tuple(fractions)
        self._top = TopMeans(device)

    def add(self, cov: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Feed the next block: ``[c]`` float64 covariances, ``-inf`` outside the scope
        unless ``[c]`` bool ``valid`` is given."""
        self._top.add(cov, valid)

    def result(
        self,
        num_tokens: int,
        values_at: Callable[[int, torch.Tensor], torch.Tensor],
        group: Group,
    ) -> dict[str, float]:
        """``cov/mean`` and ``cov/top_<pct>`` over the scope, identical on every rank.

        Args:
            num_tokens: the scope's valid-token count (the same on every rank).
            values_at: ``values_at(i, pos)`` gives block ``i``'s covariances (as fed
                to :meth:`add`) at its ``[p]`` int64 positions ``pos``.
            group: the ranks holding the rest of the scope (``SINGLE_PROCESS``: this process only).
        """
        names = ["cov/mean"] + [f"cov/top_{_pct_label(f)}" for f in self.fractions]
        if num_tokens == 0:
            return dict.fromkeys(names, 0.0)
        ks = [selection_count(f, num_tokens) for f in self.fractions]
        values = self._top.result(num_tokens, ks, values_at, group)
        return dict(zip(names, values.tolist(), strict=True))


def covariance_summary(
    cov: Sequence[torch.Tensor],
    num_tokens: int,
    fractions: Sequence[float],
    group: Group,
) -> dict[str, float]:
    """``cov/mean`` and ``cov/top_<pct>`` over the scope (see :class:`CovarianceSummary`).

    Args:
        cov: this rank's segments (e.g. ``[b, s]`` per micro-batch) of float64
            covariance, computed with the scope's means, ``-inf`` at padding.
        num_tokens: the scope's valid-token count (the same on every rank).
        fractions: top fractions, e.g. ``(2e-4, 2e-3, 2e-2, 0.2, 0.5)``;
            ``K = max(1, floor(f * N))``.
        group: the ranks holding the rest of the scope (``SINGLE_PROCESS``: this process only).
    """
    flat = [c.reshape(-1) for c in cov]
    device = flat[0].device if flat else torch.device("cpu")
    summary = CovarianceSummary(fractions, device)
    for values in flat:
        summary.add(values)
    return summary.result(num_tokens, lambda i, pos: flat[i].index_select(0, pos), group)


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
    per_microbatch: Sequence[dict[str, torch.Tensor]], group: Group
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
    all_reduce(total, group)
    return {k: (s / c if c > 0 else 0.0) for k, (s, c) in zip(names, total.tolist(), strict=True)}
