"""The tokens of a selection scope: canonical ids and the per-micro-batch inputs.

Layout convention (the whole package): per-token tensors are ``[batch, seq]`` with a
response mask of the same shape (bool, or numeric with nonzero = valid). Rows are
sequences of one micro-batch; only masked positions are tokens. The covariance over a
scope is :mod:`covrl.ops.token_covariance`.

Canonical token order: a token is identified by ``(sample index in the mini-batch,
index of the token among its sequence's valid tokens)``, packed into one int64 by
:func:`canonical_token_ids`. Counting valid tokens instead of using the column makes
the id independent of how a micro-batch was padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from covrl.ops.masking import as_bool_mask, check_same_shape

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


@dataclass(kw_only=True)
class SelectionBatch:
    """One micro-batch of a selection scope; every tensor is ``[b, s]`` in one layout.

    Built with keyword arguments only (same-shaped tensors must not be swapped).

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

    def validate(self) -> None:
        """Shape checks (finiteness is checked through the scope sums, see
        :func:`covrl.ops.token_covariance.check_scope_sums`)."""
        check_same_shape(
            "advantages",
            self.advantages,
            old_logp=self.old_logp,
            mask=self.mask,
            token_ids=self.token_ids,
            logp=self.logp,
        )
        if self.token_ids.dtype != torch.int64:
            raise ValueError(f"token_ids must be int64, got {self.token_ids.dtype}")
