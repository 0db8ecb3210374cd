"""Reproducible uniform keys of int64 ids: a pure function of (seed, step, id).

The ``n`` ids of a set with the smallest keys are a uniform random ``n``-subset drawn
without replacement, and every rank and device computes the same keys from (seed,
step) alone, in exact integer arithmetic on int64 tensors (no random generator state,
no communication). A key is 62 bits, ``high << 31 | low``, two 31-bit lanes hashed
separately, so keys compare as their high lanes first: a caller drawing the ``k``
smallest keys of many ids can hash the low lane only for the ids whose high lane can
reach the draw (see :class:`UniformKeys`).

Mixing: SplitMix64 on the Python-int (seed, step) state, MurmurHash3's 32-bit
finaliser (a bijection) on the ids' two 32-bit halves.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
# Per-lane salts of the state (digits of pi).
_LANE_SALTS = (0x243F6A88, 0x85A308D3)
_LANE_BITS = 31


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32``, without int64 overflow."""
    lo, hi = c & 0xFFFF, (c >> 16) & 0xFFFF
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser (a bijection) on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class UniformKeys:
    """The keys of one (seed, step), by lane.

    ``keys(ids) == keys.combine(keys.high(ids), keys.low(ids))``; all take and return
    int64 tensors of the shape of ``ids`` (any shape, any device).
    """

    def __init__(self, seed: int, step: int):
        state = _splitmix64((seed & _MASK64) ^ _splitmix64(step & _MASK64))
        self._lane_states = tuple(_splitmix64(state ^ salt) for salt in _LANE_SALTS)

    def _lane(self, ids: torch.Tensor, lane: int) -> torch.Tensor:
        s = self._lane_states[lane]
        lo = ids & _MASK32
        hi = (ids >> 32) & _MASK32
        h = _fmix32(lo ^ _fmix32(hi ^ (s & _MASK32)))
        return _fmix32(h ^ (s >> 32)) & 0x7FFFFFFF

    def high(self, ids: torch.Tensor) -> torch.Tensor:
        """The high 31 bits of the keys (they order the keys unless two are equal)."""
        return self._lane(ids, 0)

    def low(self, ids: torch.Tensor) -> torch.Tensor:
        """The low 31 bits of the keys."""
        return self._lane(ids, 1)

    @staticmethod
    def combine(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """Keys from their lanes."""
        return (high << _LANE_BITS) | low

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.combine(self.high(ids), self.low(ids))


def uniform_keys(token_ids: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """Pseudo-random non-negative int64 keys (62 bits) of ``token_ids`` for (seed, step).

    The same on every rank and device; the ``n`` smallest keys of a set are a uniform
    random ``n``-subset. See :class:`UniformKeys` for the lanes.
    """
    return UniformKeys(seed, step)(token_ids)
