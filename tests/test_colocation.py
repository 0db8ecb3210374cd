"""The phase switches between training and vLLM: a rollout never runs on stale or
released weights, whatever the step before it did.

The rollout engine here behaves as vLLM does on CUDA with sleep mode (level 2 drops the
weights; generating before the next sync raises), which a CPU run of vLLM cannot show:
sleep is a no-op there.
"""

from __future__ import annotations

from covrl.training.colocation import Colocation


class _Engine:
    """A policy engine's weights as the colocation sees them."""

    def __init__(self) -> None:
        self.weights_version = 0
        self.model, self.model_config = object(), object()

    def optimizer_step(self, successful: bool = True) -> None:
        self.weights_version += successful


class _CudaSleepRollout:
    """vLLM with CUDA sleep mode: ``sleep`` releases the weights, ``generate`` raises
    until a sync restores them."""

    def __init__(self, dummy_weights: bool) -> None:
        self.weights_released = dummy_weights
        self.synced_from: list[int] = []
        self.engine: _Engine | None = None

    def sync_weights(self, model, model_config) -> dict[str, float]:
        self.synced_from.append(self.engine.weights_version)
        self.weights_released = False
        return {"gb_per_s": 1.0}

    def sleep(self) -> None:
        self.weights_released = True

    def generate(self) -> int:
        if self.weights_released:
            raise RuntimeError("vLLM holds no usable weights")
        return self.synced_from[-1]


def _pair(dummy_weights: bool = True):
    engine, rollout = _Engine(), _CudaSleepRollout(dummy_weights)
    rollout.engine = engine
    return engine, rollout, Colocation(engine, rollout, synced=not dummy_weights)


def test_first_rollout_syncs_dummy_weights_and_later_ones_only_when_needed():
    engine, rollout, colocation = _pair()
    assert colocation.stale
    assert colocation.rollout_phase() == {"perf/sync_gb_per_s": 1.0}
    assert rollout.generate() == 0
    assert colocation.rollout_phase() == {}  # validation right after: nothing to sync
    assert rollout.synced_from == [0]


def test_a_skipped_update_still_gets_weights_back_after_sleep():
    """Dynamic sampling left too few groups: the step slept vLLM but ran no update.
    The next rollout must not generate on released weights."""
    engine, rollout, colocation = _pair()
    colocation.rollout_phase()
    rollout.generate()
    colocation.train_phase()  # step 1: sleep, then no update
    colocation.rollout_phase()  # step 2
    assert rollout.generate() == 0
    assert rollout.synced_from == [0, 0]


def test_updates_are_synced_and_a_rejected_step_is_not_a_change():
    engine, rollout, colocation = _pair(dummy_weights=False)
    assert not colocation.stale and colocation.rollout_phase() == {}
    colocation.train_phase()
    engine.optimizer_step()
    engine.optimizer_step(successful=False)
    colocation.rollout_phase()
    assert rollout.generate() == 1 and rollout.synced_from == [1]
    # Without sleep (CPU): a new version alone makes the weights stale.
    rollout.sleep = lambda: None
    colocation.train_phase()
    engine.optimizer_step()
    assert colocation.stale
    colocation.rollout_phase()
    assert rollout.synced_from == [1, 2]
