"""Seeded, resumable epoch sampling of prompt batches.

Epoch ``e`` visits the dataset in the order ``permutation(seed, e)`` (the identity when
not shuffling); batches are consecutive slices of it and a batch never straddles two
epochs (the tail shorter than a batch is skipped, as ``drop_last`` does). The state is
``(epoch, position)``: a checkpoint stores it and a resumed run continues with exactly the
batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

import numpy as np

__all__ = ["EpochSampler"]


class EpochSampler:
    def __init__(self, num_items: int, batch_size: int, *, seed: int, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if num_items < batch_size:
            raise ValueError(
                f"{num_items} prompts are fewer than one batch of {batch_size} "
                "(data.train_batch_size)"
            )
        self.num_items, self.batch_size = num_items, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // self.batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_items)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def next_batch(self) -> list[int]:
        """Indices of the next batch (moving to the next epoch when this one is used up)."""
        if self.position + self.batch_size > self.num_items:
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        start = self.position
        self.position += self.batch_size
        return self._order[start : self.position].tolist()

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_items": self.num_items,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (
            state.get("num_items", self.num_items) != self.num_items
            or state.get("seed", self.seed) != self.seed
        ):
            raise ValueError(
                f"data cursor was saved for {state.get('num_items')} prompts with seed "
                f"{state.get('seed')}; this run has {self.num_items} prompts and seed "
                f"{self.seed} (different data or data.seed)"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
