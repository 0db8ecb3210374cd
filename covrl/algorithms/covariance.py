"""Token covariance between log-prob and advantage over a selection scope.

Layout convention (the whole package): per-token tensors are ``[batch, seq]`` with a
response mask of the same shape (bool, or numeric with nonzero = valid). Rows are
sequences of one micro-batch; only masked positions are tokens. The scope of a
covariance is a set of micro-batches spread over the ranks of a process group; its
means are reduced over all of them, so

    cov_i = (logp_i - mean_j logp_j) * (A_i - mean_j A_j)

is the same number for token i whatever the micro-batch split and data-parallel size.

Canonical token order: a token is identified by ``(sample index in the mini-batch,
index of the token among its sequence's valid tokens)``, packed into one int64 by
:func:`canonical_token_ids`. Counting valid tokens instead of using the column makes
the id independent of how a micro-batch was padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from covrl.algorithms._common import (
    ProcessGroup,
    all_reduce_sum,
    as_bool_mask,
    check_finite,
    check_same_shape,
)

_POSITION_BITS = 32


def canonical_token_ids(sample_index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Global token ids of one micro-batch, in the scope's canonical order.

    Args:
        sample_index: ``[b]`` integer, each row's index in the mini-batch (the same
            sample must get the same index however the mini-batch is split; indices
            must be unique within the scope and < 2**31).
        mask: ``[b, s]`` response mask.

    Returns:
        ``[b, s]`` int64: ``sample_index << 32 | k`` for the k-th valid token of a row,
        ``-1`` at padding. Sorting by id gives the canonical order.
    """
    mask = as_bool_mask(mask)
    if sample_index.dim() != 1 or sample_index.shape[0] != mask.shape[0]:
        raise ValueError(
            f"sample_index must have shape [{mask.shape[0]}] (one per row of mask "
            f"{tuple(mask.shape)}), got {tuple(sample_index.shape)}"
        )
    position = torch.cumsum(mask.long(), dim=-1) - 1
    ids = (sample_index.long().unsqueeze(-1) << _POSITION_BITS) | position
    return torch.where(mask, ids, torch.full_like(ids, -1))


@dataclass
class SelectionBatch:
    """One micro-batch of a selection scope; every tensor is ``[b, s]`` in one layout.

    Attributes:
        advantages: per-token advantages (float).
        old_logp: rollout-time log-probs of the sampled tokens (float).
        mask: response mask.
        token_ids: int64 ids from :func:`canonical_token_ids`.
        logp: the current parameters' log-probs (from a no-grad forward); needed when
            the covariance uses current log-probs, and by Clip-Cov's PPO-clip filter.
    """

    advantages: torch.Tensor
    old_logp: torch.Tensor
    mask: torch.Tensor
    token_ids: torch.Tensor
    logp: torch.Tensor | None = None

    def validate(self, check: bool = True) -> None:
        check_same_shape(
            "advantages",
            self.advantages,
            old_logp=self.old_logp,
            mask=self.mask,
            token_ids=self.token_ids,
            logp=self.logp,
        )
        if check:
            check_finite(
                as_bool_mask(self.mask),
                advantages=self.advantages,
                old_logp=self.old_logp,
                logp=self.logp,
            )


@dataclass
class CovarianceMeans:
    """Scope-wide means (float64 scalars) and the scope's valid-token count."""

    mean_logp: torch.Tensor
    mean_adv: torch.Tensor
    num_tokens: torch.Tensor


def covariance_means(
    logps: list[torch.Tensor],
    advantages: list[torch.Tensor],
    masks: list[torch.Tensor],
    group: ProcessGroup | None,
) -> CovarianceMeans:
    """Means of logp and A over every valid token of the scope.

    Sums are taken in float64 per micro-batch and all-reduced over ``group`` with the
    token count in one ``[3]`` collective (None: this process holds the whole scope).
    An empty scope gives means of 0.
    """
    device = masks[0].device if masks else torch.device("cpu")
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for logp, adv, mask in zip(logps, advantages, masks, strict=True):
        m = as_bool_mask(mask)
        sums[0] += torch.where(m, logp.detach().double(), 0.0).sum()
        sums[1] += torch.where(m, adv.detach().double(), 0.0).sum()
        sums[2] += m.sum()
    all_reduce_sum(sums, group)
    count = sums[2]
    denom = count.clamp(min=1.0)
    return CovarianceMeans(sums[0] / denom, sums[1] / denom, count)


def token_covariance(
    logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, means: CovarianceMeans
) -> torch.Tensor:
    """``[b, s]`` float64 covariance terms ``(logp - mean) * (A - mean)``, 0 at padding."""
    m = as_bool_mask(mask)
    cov = (logp.detach().double() - means.mean_logp) * (
        advantages.detach().double() - means.mean_adv
    )
    return torch.where(m, cov, 0.0)
