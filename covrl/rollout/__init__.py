"""Rollout: vLLM colocated with megatron-core training (generation, Megatron -> vLLM
weight sync, train / inference mismatch)."""

from covrl.rollout.config import RolloutConfig, SamplingConfig
from covrl.rollout.engine import RolloutEngine, check_model, sample_seed
from covrl.rollout.generations import Generations
from covrl.rollout.mismatch import (
    RolloutCorrectionConfig,
    mismatch_metrics,
    truncated_is_weights,
)
from covrl.rollout.weight_sync import BucketedWeightStream, SyncStats, WeightSyncError

__all__ = [
    "BucketedWeightStream",
    "Generations",
    "RolloutConfig",
    "RolloutCorrectionConfig",
    "RolloutEngine",
    "SamplingConfig",
    "SyncStats",
    "WeightSyncError",
    "check_model",
    "mismatch_metrics",
    "sample_seed",
    "truncated_is_weights",
]
