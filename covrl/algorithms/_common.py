"""Helpers shared by the selection and the metrics: padding zeroing, selection counts."""

from __future__ import annotations

from fractions import Fraction

import torch

from covrl.ops.masking import masked

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


def selection_count(ratio: float, num_tokens: int) -> int:
    """``max(1, floor(ratio * N))`` for ``N > 0``, else 0.

    The product is taken on the decimal value of ``ratio`` so that e.g.
    ``0.29 * 100`` gives 29, not 28.
    """
    if num_tokens <= 0:
        return 0
    return max(1, int(Fraction(repr(float(ratio))) * num_tokens))
