"""Numerical kernels: log-probs, entropy and entropy dynamics on vocab-parallel
(tensor-parallel sharded) logits, and the log-prob / advantage covariance of tokens."""

from covrl.ops.entropy_dynamics import (
    EntropyDynamics,
    SampledEntropyChange,
    entropy_dynamics,
    log_prob_covariance,
    sampled_entropy_change,
)
from covrl.ops.token_covariance import CovarianceMeans, covariance_means, token_covariance
from covrl.ops.vocab_parallel import vocab_parallel_logprob_entropy

__all__ = [
    "CovarianceMeans",
    "EntropyDynamics",
    "SampledEntropyChange",
    "covariance_means",
    "entropy_dynamics",
    "log_prob_covariance",
    "sampled_entropy_change",
    "token_covariance",
    "vocab_parallel_logprob_entropy",
]
