"""Numerical kernels: log-probs, entropy and entropy dynamics on vocab-parallel
(tensor-parallel sharded) logits, the log-prob / advantage covariance of tokens, and
the exact distributed selection primitives (reproducible keys, top-k, order
statistics) over tokens split across ranks."""

from covrl.ops.distributed_topk import select_top_k, top_k
from covrl.ops.entropy_dynamics import (
    EntropyDynamics,
    SampledEntropyChange,
    entropy_dynamics,
    log_prob_covariance,
    sampled_entropy_change,
)
from covrl.ops.hashing import UniformKeys, uniform_keys
from covrl.ops.order_statistics import TopMeans, kth_largest
from covrl.ops.token_covariance import (
    CovarianceMeans,
    centered_product,
    covariance_means,
    token_covariance,
)
from covrl.ops.vocab_parallel import vocab_parallel_logprob_entropy

__all__ = [
    "CovarianceMeans",
    "EntropyDynamics",
    "SampledEntropyChange",
    "TopMeans",
    "UniformKeys",
    "centered_product",
    "covariance_means",
    "entropy_dynamics",
    "kth_largest",
    "log_prob_covariance",
    "sampled_entropy_change",
    "select_top_k",
    "token_covariance",
    "top_k",
    "uniform_keys",
    "vocab_parallel_logprob_entropy",
]
