"""Training and vLLM on the same devices: who holds the memory, and whether vLLM's
weights are the trainer's.

A colocated step alternates two phases on every rank::

    rollout phase: vLLM holds its weights and KV cache      (generate, validation)
    train phase:   megatron holds activations and gradients (old log-probs, updates)

:class:`Colocation` is the only place that switches between them, so the rollout can
never run on stale or released weights whatever the step did before (an update that
was skipped, a resumed checkpoint, vLLM started without real weights):

* :meth:`Colocation.rollout_phase` (before every generation): empties the training
  side's cached allocator blocks, then syncs the trainer's weights into vLLM whenever
  vLLM's copy is older than the engine's (``PolicyEngine.weights_version``) or was
  released by sleep; vLLM wakes what it needs.
* :meth:`Colocation.train_phase` (before the trainer's passes): vLLM releases its KV
  cache and weights (CUDA sleep mode, level 2: the weights come back with the next
  sync), then the cache is emptied for megatron.

On CPU vLLM has no sleep mode and ``empty_cache`` is a no-op; the state machine is the
same.
"""

from __future__ import annotations

import torch

from covrl.engine import PolicyEngine
from covrl.rollout import RolloutEngine

__all__ = ["Colocation"]


def _empty_cache() -> None:
    # Blocks freed by one side stay in PyTorch's caching allocator unless returned:
    # vLLM's wake-up and megatron's first activations would otherwise not find them.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Colocation:
    """The phase switches of a policy engine and a rollout engine on the same devices.

    Args:
        engine: the trained policy.
        rollout: vLLM, started from the policy's checkpoint or with dummy weights.
        synced: whether vLLM's weights already equal the engine's current ones (True
            when vLLM loaded the checkpoint the engine loaded, and nothing changed
            since). False makes the first rollout phase sync.

    Collective: every rank calls the same methods in the same order (the sync is).
    """

    def __init__(self, engine: PolicyEngine, rollout: RolloutEngine, *, synced: bool) -> None:
        self.engine = engine
        self.rollout = rollout
        self._synced_version: int | None = engine.weights_version if synced else None

    @property
    def stale(self) -> bool:
        """Whether the next generation needs a weight sync first."""
        return self._synced_version != self.engine.weights_version or self.rollout.weights_released

    def rollout_phase(self) -> dict[str, float]:
        """Make vLLM ready to generate with the engine's current weights. Returns the
        sync's throughput (``perf/sync_gb_per_s``; empty when no sync was needed)."""
        _empty_cache()
        if not self.stale:
            return {}
        stats = self.rollout.sync_weights(self.engine.model, self.engine.model_config)
        self._synced_version = self.engine.weights_version
        return {"perf/sync_gb_per_s": stats["gb_per_s"]}

    def train_phase(self) -> None:
        """Hand the devices' memory to the trainer."""
        self.rollout.sleep()
        _empty_cache()
