"""Covariance of log-prob and advantage over a scope of tokens.

Per-token tensors are ``[batch, seq]`` with a response mask of the same shape. The
scope of a covariance is a set of micro-batches spread over the ranks of a process
group; its means are reduced over all of them, so

    cov_i = (logp_i - mean_j logp_j) * (A_i - mean_j A_j)

is the same number for token i whatever the micro-batch split and data-parallel size.
Used by the Clip-Cov / KL-Cov selection (:mod:`covrl.algorithms.selection`) and the
entropy-change estimate (:func:`covrl.ops.sampled_entropy_change`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from covrl.ops.masking import as_bool_mask, check_finite
from covrl.parallel.groups import Group, all_reduce


@dataclass
class CovarianceMeans:
    """Scope-wide means and valid-token count (float64 scalar tensors), and the count
    as a Python int."""

    mean_logp: torch.Tensor
    mean_adv: torch.Tensor
    num_tokens: torch.Tensor
    count: int

    @classmethod
    def from_sums(cls, sums: torch.Tensor, values: Sequence[float]) -> CovarianceMeans:
        """From :func:`masked_scope_sums` ``[sum logp, sum A, ..., count]`` (tensor and
        host copy). An empty scope gives means of 0."""
        count = int(values[-1])
        return cls(sums[0] / max(count, 1), sums[1] / max(count, 1), sums[-1], count)


def masked_scope_sums(
    columns: Sequence[Sequence[torch.Tensor]],
    masks: Sequence[torch.Tensor],
    group: Group,
) -> torch.Tensor:
    """float64 ``[len(columns) + 1]``: each column's sum over the valid entries of every
    segment, then the valid count; all-reduced over ``group`` in one collective.

    Args:
        columns: per column, one tensor per segment, shaped like that segment's mask.
        masks: one response mask per segment (any shape).
    """
    device = masks[0].device if masks else torch.device("cpu")
    sums = torch.zeros(len(columns) + 1, dtype=torch.float64, device=device)
    for j, mask in enumerate(masks):
        m = as_bool_mask(mask)
        for c, tensors in enumerate(columns):
            sums[c] += torch.where(m, tensors[j].detach(), 0.0).sum(dtype=torch.float64)
        sums[-1] += m.sum()
    return all_reduce(sums, group)


def check_scope_sums(
    values: Sequence[float],
    local: dict[str, Sequence[torch.Tensor]],
    masks: Sequence[torch.Tensor],
) -> None:
    """Raise ValueError if a scope sum is non-finite, naming the tensor.

    ``values[c]`` is the all-reduced sum of column ``c``, whose local micro-batches are
    the ``c``-th entry of ``local`` (name -> one tensor per micro-batch of ``masks``).
    NaN/inf at a valid position makes a global sum non-finite, so every rank of the
    group raises after the collective (a check before it would let one rank raise
    while the others hang); the rank holding the bad values names the micro-batch.
    """
    names = list(local)
    bad = [n for n, v in zip(names, values, strict=False) if not math.isfinite(v)]
    if not bad:
        return
    for j, mask in enumerate(masks):  # name the local micro-batch if it is here
        check_finite(as_bool_mask(mask), **{f"{n} (micro-batch {j})": local[n][j] for n in bad})
    raise ValueError(
        "non-finite values (NaN/inf) at valid positions in "
        + ", ".join(bad)
        + " on another rank of the group"
    )


def covariance_means(
    logps: Sequence[torch.Tensor],
    advantages: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    group: Group,
    *,
    names: tuple[str, str] = ("logp", "advantages"),
    also_check: dict[str, Sequence[torch.Tensor]] | None = None,
    check: bool = True,
) -> CovarianceMeans:
    """Means of logp and A over every valid token of the scope, and the token count.

    Sums are taken in float64 per micro-batch and all-reduced over ``group`` (None:
    this process holds the whole scope) in one collective, with one host sync.

    The sums double as the input check (:func:`check_scope_sums`); ``also_check`` adds
    the sums of more per-micro-batch tensors, only for this check. An empty scope gives
    means of 0.
    """
    local = {names[0]: logps, names[1]: advantages, **(also_check or {})}
    sums = masked_scope_sums(list(local.values()), masks, group)
    values = sums.tolist()
    if check:
        check_scope_sums(values[:-1], local, masks)
    return CovarianceMeans.from_sums(sums, values)


def centered_product(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    means: CovarianceMeans,
    *,
    overwrite_inputs: bool = False,
) -> torch.Tensor:
    """float64 ``(logp - mean_logp) * (A - mean_adv)``, elementwise (any shape): the
    covariance term of each token, the one kernel behind every covariance in covrl.

    ``overwrite_inputs``: the caller's ``logp`` and ``advantages`` are fresh temporaries
    that may be overwritten (a float64 one is then used in place, not copied).
    """
    copy = not overwrite_inputs
    cov = logp.detach().to(torch.float64, copy=copy).sub_(means.mean_logp)
    return cov.mul_(advantages.detach().to(torch.float64, copy=copy).sub_(means.mean_adv))


def token_covariance(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    means: CovarianceMeans,
    fill: float = 0.0,
) -> torch.Tensor:
    """``[b, s]`` float64 covariance terms ``(logp - mean) * (A - mean)``; ``fill`` at padding."""
    return centered_product(logp, advantages, means).masked_fill_(~as_bool_mask(mask), fill)
