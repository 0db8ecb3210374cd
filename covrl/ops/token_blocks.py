"""A rank's micro-batches of per-token tensors as one flat sequence, read in blocks.

A scope pass (sums, covariance, a running top-k) reads every local token once. Its
micro-batches (segments) are ``[b_i, s_i]`` tensors of several named fields (mask,
advantages, log-probs, ids); :class:`TokenBlocks` lays them end to end as ``n = sum_i
b_i s_i`` slots (padding included) and yields them in blocks of ``block_slots`` slots,
each field of a block a ``[size]`` tensor.

On CPU a cache-sized block (512 KiB of float64) is fastest and keeps every temporary
small: whole-sequence temporaries would allocate tens of MiB of fresh memory per call,
whose page faults cost more than the arithmetic, and the op count does not grow with
the number of micro-batches. On accelerators one large block keeps the launch count
and host syncs per pass independent of the scope's size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

# Token slots per block, by device type (others: _BLOCK_SLOTS_ACCELERATOR).
_BLOCK_SLOTS = {"cpu": 1 << 16}
_BLOCK_SLOTS_ACCELERATOR = 1 << 24


@dataclass
class Block:
    """Slots ``[start, start + size)`` of the flat sequence.

    ``block[name]`` is that field as a ``[size]`` tensor: a view when the block lies in
    one segment, else a concatenation of the pieces (made once).
    """

    start: int
    size: int
    pieces: list[tuple[dict[str, torch.Tensor], int, int]]
    _cache: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            parts = [fields[name][lo:hi] for fields, lo, hi in self.pieces]
            self._cache[name] = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self._cache[name]

    def take(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """``block[name]`` at the ``[c]`` block positions ``index``."""
        return self[name].index_select(0, index)


class TokenBlocks:
    """Segments of flat per-token fields as one sequence of ``n`` slots.

    Args:
        segments: per segment, ``{name: [b_i * s_i] tensor}`` (flattened ``[b_i, s_i]``;
            every segment has the same names, a field may be None if never read).
        shapes: per segment, its ``[b_i, s_i]`` shape.
        device: the device of the tensors.
    """

    def __init__(
        self,
        segments: Sequence[dict[str, torch.Tensor | None]],
        shapes: Sequence[torch.Size],
        device: torch.device,
    ):
        self.segments = list(segments)
        self.shapes = list(shapes)
        self.numel = sum(s.numel() for s in self.shapes)
        self.device = device
        self.block_slots = _BLOCK_SLOTS.get(device.type, _BLOCK_SLOTS_ACCELERATOR)

    def blocks(self) -> Iterator[Block]:
        """The blocks in order (one empty block if ``n == 0``)."""
        pieces: list[tuple[dict[str, torch.Tensor], int, int]] = []
        start = filled = 0
        for fields, shape in zip(self.segments, self.shapes, strict=True):
            lo, size = 0, shape.numel()
            while lo < size:
                hi = min(size, lo + self.block_slots - filled)
                pieces.append((fields, lo, hi))
                filled += hi - lo
                lo = hi
                if filled == self.block_slots:
                    yield Block(start, filled, pieces)
                    start, filled, pieces = start + filled, 0, []
        if filled or start == 0:
            yield Block(start, filled, pieces or [(self.segments[0], 0, 0)])

    def flat_parts(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``[n]`` -> one flat view per segment."""
        return flat.split([s.numel() for s in self.shapes])

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``[n]`` -> one view per segment, in its ``[b_i, s_i]`` layout."""
        return [p.view(s) for p, s in zip(self.flat_parts(flat), self.shapes, strict=True)]
