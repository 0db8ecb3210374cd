"""Reduce per-token losses to a micro-batch loss whose gradient is split-invariant.

A mini-batch loss is ``numerator / global_count``; each micro-batch contributes its own
numerator divided by the *global* count (over every micro-batch of the mini-batch on
every data-parallel rank), so the sum of the micro-batch losses over micro-batches and
ranks is the mini-batch loss, and the summed gradients do not depend on the split:

* ``token-mean``: numerator ``sum_t l_t`` over valid tokens, count = valid tokens.
* ``seq-mean-token-mean``: numerator ``sum_s mean_t l_st`` (each sequence's mean over
  its valid tokens), count = sequences with at least one valid token.
* ``seq-mean-token-sum`` (Dr. GRPO): numerator ``sum_s sum_t l_st / C``, count =
  sequences with at least one valid token; ``C = loss_norm_constant`` (e.g. the
  maximum response length), 1 when None.

Composition with Megatron-Core (0.16), with ``calculate_per_token_loss=False`` (its
default, what :class:`covrl.engine.PolicyEngine` runs): the schedule divides
each micro-batch loss by ``num_microbatches`` and DDP averages gradients over the DP
group, so the loss given to Megatron is ``aggregate_loss(...) * megatron_loss_scale(M,
dp)`` (``= M * dp``); the resulting gradient is exactly the mini-batch loss gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from covrl.algorithms.config import LOSS_AGG_MODES
from covrl.ops.masking import as_bool_mask
from covrl.parallel.groups import Group, all_reduce


def _check_mode(mode: str) -> None:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode={mode!r} is not one of {list(LOSS_AGG_MODES)}")


def _local_count(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """This micro-batch's share of the normaliser (int64 scalar); bool ``mask`` ``[b, s]``."""
    _check_mode(mode)
    return mask.sum() if mode == "token-mean" else mask.any(dim=-1).sum()


def global_loss_count(masks: Sequence[torch.Tensor], mode: str, group: Group) -> torch.Tensor:
    """The normaliser of the mini-batch: summed over ``masks`` and all-reduced over ``group``.

    Call once per mini-batch with the masks of all its local micro-batches (one
    collective), before the gradient micro-batches. ``group`` is the data-parallel
    group (``covrl.parallel.SINGLE_PROCESS`` when this process holds the whole
    mini-batch; ``None`` is refused). Returns an int64 scalar.
    """
    device = masks[0].device if len(masks) else torch.device("cpu")
    total = torch.zeros((), dtype=torch.int64, device=device)
    for mask in masks:
        total += _local_count(as_bool_mask(mask), mode)
    return all_reduce(total, group)


def _numerator(
    token_loss: torch.Tensor, mask: torch.Tensor, mode: str, norm_constant: float | None
) -> torch.Tensor:
    """Scalar numerator of one micro-batch; ``token_loss`` ``[b, s]``, bool ``mask``."""
    _check_mode(mode)
    token_loss = torch.where(mask, token_loss, 0.0)
    if mode == "token-mean":
        return token_loss.sum()
    if mode == "seq-mean-token-mean":
        lengths = mask.sum(dim=-1).clamp(min=1)
        return (token_loss.sum(dim=-1) / lengths).sum()
    numerator = token_loss.sum()
    return numerator if norm_constant is None else numerator / norm_constant


def aggregate_loss(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    global_count: torch.Tensor | int,
    norm_constant: float | None = None,
) -> torch.Tensor:
    """This micro-batch's share of the mini-batch loss: ``numerator / global_count``.

    ``global_count`` comes from :func:`global_loss_count`. An empty mini-batch (count
    0) gives a loss of 0 with zero gradient.
    """
    numerator = _numerator(token_loss, as_bool_mask(mask), mode, norm_constant)
    if isinstance(global_count, torch.Tensor):
        denom = global_count.clamp(min=1).to(numerator.dtype)
    else:
        denom = float(max(int(global_count), 1))
    return numerator / denom


def megatron_loss_scale(num_microbatches: int, data_parallel_size: int) -> float:
    """Factor for the loss handed to Megatron with ``calculate_per_token_loss=False``.

    Megatron divides each micro-batch loss by ``num_microbatches`` and averages
    gradients over the DP group; multiplying :func:`aggregate_loss` by this factor
    undoes both, so the applied gradient is that of the global mini-batch loss.
    """
    return float(num_microbatches * data_parallel_size)
