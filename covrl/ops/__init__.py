"""Fused numerical kernels over tensor-parallel (vocab-sharded) tensors."""

from covrl.ops.vocab_parallel import vocab_parallel_logprob_entropy

__all__ = ["vocab_parallel_logprob_entropy"]
