"""RMSNorm of the local (non-Transformer-Engine) layer spec, sequence-parallel ready.

Megatron-core's local spec falls back to a torch norm that refuses sequence
parallelism (its sequence-parallel norm is Apex's). The computation is the same
``torch.nn.RMSNorm``; what sequence parallelism needs from a norm is only that its
weight is marked ``sequence_parallel``: each TP rank then sees a different slice of the
sequence, and megatron's ``finalize_model_grads`` sums the weight's gradient over the
TP group.
"""

from __future__ import annotations

import torch

__all__ = ["LocalRMSNorm"]


class LocalRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` built from megatron's norm arguments."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused) -> None:
        if config.normalization != "RMSNorm":
            raise ValueError(
                f"LocalRMSNorm built for normalization={config.normalization!r}; covrl's "
                "Llama / Qwen2 policies use RMSNorm"
            )
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel
