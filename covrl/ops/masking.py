"""Per-token tensors ``[batch, seq]`` with a response mask: mask, shape and finiteness
helpers shared by the kernels and the algorithms.

A response mask is bool, or numeric with nonzero = valid. Padding positions may hold
anything (NaN included): the helpers here never let them reach a value or a gradient.
"""

from __future__ import annotations

import torch


def as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """A response mask as bool (any nonzero entry is a valid token)."""
    return mask if mask.dtype == torch.bool else mask != 0


def check_same_shape(reference_name: str, reference: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.shape != reference.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected {tuple(reference.shape)} "
                f"(the shape of {reference_name})"
            )


def check_finite(mask: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """Raise ValueError naming every tensor with NaN/inf at a valid (mask) position.

    Padding positions may hold anything: they never count. One host sync in all.
    """
    names = [n for n, t in tensors.items() if t is not None]
    if not names:
        return
    bad = torch.stack([(~torch.isfinite(tensors[n].detach()) & mask).sum() for n in names]).tolist()
    offenders = [
        f"{n} ({c} of {int(mask.sum())} valid entries)"
        for n, c in zip(names, bad, strict=True)
        if c
    ]
    if offenders:
        raise ValueError(
            "non-finite values (NaN/inf) at valid positions in " + ", ".join(offenders)
        )


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with padding replaced by 0, so garbage there never reaches values or grads."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
