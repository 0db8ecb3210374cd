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


_SAME_SIZE_INT = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


class PaddingZeroer:
    """:func:`masked` for many detached float tensors shaped like one mask.

    Zeroing is a bitwise AND of the tensor's bits with all-ones (valid) or all-zeros
    (padding) words: a result of exactly ``+0.0`` at padding (NaN included), like
    :func:`masked`, at a fraction of the cost of ``torch.where`` on CPU. The word mask
    is built once per integer width. Not differentiable: use :func:`masked` on tensors
    that require grad.
    """

    def __init__(self, mask: torch.Tensor):
        self.mask = mask
        self._words: dict[torch.dtype, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        int_dtype = _SAME_SIZE_INT.get(x.dtype)
        if int_dtype is None:
            return masked(x, self.mask)
        words = self._words.get(int_dtype)
        if words is None:
            words = self._words[int_dtype] = self.mask.to(int_dtype).neg_()
        return (x.detach().view(int_dtype) & words).view(x.dtype)
