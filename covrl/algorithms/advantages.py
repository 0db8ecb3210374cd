"""Outcome-reward advantages for group-sampled rollouts, and DAPO dynamic sampling.

Inputs are per sequence: ``rewards [n]`` (float) and ``group_index [n]`` (integer
label of the prompt each response was sampled for; any labels, any order). Statistics
are taken in float64; results have the rewards' dtype. A group of one response has no
baseline: its advantage is 0 (it carries no learning signal).

Per-sequence advantages become per-token ``[n, s]`` tensors with
:func:`broadcast_to_tokens` (0 at padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from covrl.algorithms.config import AdvantageConfig
from covrl.ops.masking import as_bool_mask
from covrl.parallel.groups import SINGLE_PROCESS, Group, all_reduce


@dataclass
class _Groups:
    inverse: torch.Tensor  # [n] group slot of each sequence
    count: torch.Tensor  # [G] float64
    mean: torch.Tensor  # [G] float64
    var: torch.Tensor  # [G] float64 unbiased (0 for singletons)


def _check_rewards(rewards: torch.Tensor, group_index: torch.Tensor) -> None:
    if rewards.dim() != 1 or group_index.shape != rewards.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_index {tuple(group_index.shape)} "
            "must both be [n]"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError("non-finite values (NaN/inf) in rewards")


def _group_stats(rewards: torch.Tensor, group_index: torch.Tensor) -> _Groups:
    _check_rewards(rewards, group_index)
    _, inverse = torch.unique(group_index, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    r = rewards.double()
    zeros = torch.zeros(num_groups, dtype=torch.float64, device=r.device)
    count = zeros.scatter_add(0, inverse, torch.ones_like(r))
    mean = zeros.scatter_add(0, inverse, r) / count.clamp(min=1)
    sq = zeros.scatter_add(0, inverse, (r - mean[inverse]).square())
    var = torch.where(count > 1, sq / (count - 1).clamp(min=1), 0.0)
    return _Groups(inverse, count, mean, var)


def grpo_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    *,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO: ``(r - mean_g) / (std_g + eps)`` (unbiased std), or ``r - mean_g``.

    Returns ``[n]``. Singleton groups get 0.
    """
    g = _group_stats(rewards, group_index)
    adv = rewards.double() - g.mean[g.inverse]
    if norm_by_std:
        adv = adv / (g.var.sqrt()[g.inverse] + eps)
    adv = torch.where(g.count[g.inverse] > 1, adv, 0.0)
    return adv.to(rewards.dtype)


def rloo_advantages(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """RLOO: ``r_i - mean_{j != i in group} r_j``. Returns ``[n]``; singletons get 0."""
    g = _group_stats(rewards, group_index)
    r = rewards.double()
    n = g.count[g.inverse]
    loo_mean = (g.mean[g.inverse] * n - r) / (n - 1).clamp(min=1)
    return torch.where(n > 1, r - loo_mean, 0.0).to(rewards.dtype)


def broadcast_to_tokens(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[n]`` per-sequence values -> ``[n, s]`` per-token values, 0 at padding."""
    m = as_bool_mask(mask)
    if values.dim() != 1 or values.shape[0] != m.shape[0]:
        raise ValueError(
            f"values {tuple(values.shape)} must be [n] with n = mask rows ({m.shape[0]})"
        )
    return torch.where(m, values.unsqueeze(-1), torch.zeros((), dtype=values.dtype))


def reinforce_pp_baseline_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps: float = 1e-8,
    process_group: Group = SINGLE_PROCESS,
) -> torch.Tensor:
    """REINFORCE++ with a group baseline: ``r - mean_g`` per token, then batch whitening.

    Whitening is over every valid token of the batch (tokens, not sequences, weigh in):
    ``(x - mean) / sqrt(var + eps)``, unbiased variance. If the batch is spread over
    ranks, pass their ``process_group`` (prompt groups must not straddle ranks).

    Returns ``[n, s]``, 0 at padding.
    """
    g = _group_stats(rewards, group_index)
    scores = torch.where(g.count[g.inverse] > 1, rewards.double() - g.mean[g.inverse], 0.0)
    m = as_bool_mask(mask)
    x = broadcast_to_tokens(scores, m)
    stats = torch.stack([x.sum(), m.sum().double()])
    all_reduce(stats, process_group)
    mean = stats[0] / stats[1].clamp(min=1)
    sq = torch.where(m, (x - mean).square(), 0.0).sum().view(1)
    all_reduce(sq, process_group)
    var = sq[0] / (stats[1] - 1).clamp(min=1)
    return torch.where(m, (x - mean) / torch.sqrt(var + eps), 0.0).to(rewards.dtype)


def compute_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    mask: torch.Tensor,
    config: AdvantageConfig,
    process_group: Group = SINGLE_PROCESS,
) -> torch.Tensor:
    """Per-token ``[n, s]`` advantages with the estimator of ``config``.

    ``group_index`` ``[n]`` names each response's prompt group; ``process_group``
    holds the rest of the batch (REINFORCE++ whitening only; the default is a batch
    held whole by this process).
    """
    if config.estimator == "grpo":
        adv = grpo_advantages(rewards, group_index, norm_by_std=config.norm_by_std, eps=config.eps)
    elif config.estimator == "rloo":
        adv = rloo_advantages(rewards, group_index)
    else:
        return reinforce_pp_baseline_advantages(
            rewards, group_index, mask, eps=config.eps, process_group=process_group
        )
    return broadcast_to_tokens(adv, mask)


@dataclass
class DynamicSamplingResult:
    """Result of :func:`dynamic_sampling_filter`.

    Attributes:
        kept_indices: ``[num_kept]`` int64 indices of kept sequences, ascending.
        num_groups: groups in the input.
        num_kept_groups: groups whose rewards are not all equal.
        num_kept: sequences kept.
    """

    kept_indices: torch.Tensor
    num_groups: int
    num_kept_groups: int
    num_kept: int


def dynamic_sampling_filter(
    rewards: torch.Tensor, group_index: torch.Tensor
) -> DynamicSamplingResult:
    """DAPO dynamic sampling: drop every group whose rewards are all equal.

    Such a group has zero advantage everywhere under GRPO, so it only dilutes the
    batch. Singleton groups are dropped. Equality is exact (rewards are compared as
    given).
    """
    g = _group_stats(rewards, group_index)
    r = rewards.double()
    num_groups = g.count.numel()
    lo = torch.full((num_groups,), float("inf"), dtype=torch.float64, device=r.device)
    hi = torch.full((num_groups,), float("-inf"), dtype=torch.float64, device=r.device)
    lo = lo.scatter_reduce(0, g.inverse, r, reduce="amin")
    hi = hi.scatter_reduce(0, g.inverse, r, reduce="amax")
    kept_group = hi > lo
    kept = torch.nonzero(kept_group[g.inverse]).squeeze(1)
    return DynamicSamplingResult(
        kept_indices=kept,
        num_groups=num_groups,
        num_kept_groups=int(kept_group.sum()),
        num_kept=int(kept.numel()),
    )
