"""Numerical kernels over vocab-parallel (tensor-parallel sharded) logits."""

from covrl.ops.entropy_dynamics import (
    EntropyDynamics,
    SampledEntropyChange,
    entropy_dynamics,
    log_prob_covariance,
    sampled_entropy_change,
)
from covrl.ops.vocab_parallel import vocab_parallel_logprob_entropy

__all__ = [
    "EntropyDynamics",
    "SampledEntropyChange",
    "entropy_dynamics",
    "log_prob_covariance",
    "sampled_entropy_change",
    "vocab_parallel_logprob_entropy",
]
