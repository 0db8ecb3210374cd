"""Core attention of the local (non-Transformer-Engine) layer spec, with packed sequences.

Megatron-core's local ``DotProductAttention`` refuses ``packed_seq_params``; on CUDA,
packed (THD) sequences go through Transformer Engine's fused attention instead. This
subclass gives the local spec the same contract, so the packed path runs (and is
tested) on CPU: for the ``thd`` format it builds the block-diagonal causal mask of the
packed sequences from ``cu_seqlens`` and attends over the ``[t, 1, heads, dim]`` pack
(a token sees the earlier tokens of its own sequence only). The mask is ``[t, t]``:
fine at the sizes the local spec is meant for, which is why CUDA uses TE.
"""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention

__all__ = ["PackedDotProductAttention", "packed_causal_mask"]


def packed_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[1, 1, total, total]`` bool, True where attention is *not* allowed: between
    sequences of the pack and to later tokens. ``cu_seqlens`` ``[n + 1]`` int, the
    sequences' boundaries (``cu_seqlens[-1] <= total``; tokens beyond it, padding, form
    one more sequence)."""
    positions = torch.arange(total, device=cu_seqlens.device)
    # Sequence id of every token: the number of boundaries at or before it.
    seq = torch.bucketize(positions, cu_seqlens[1:].to(positions.dtype), right=True)
    same = seq[:, None] == seq[None, :]
    causal = positions[:, None] >= positions[None, :]
    return ~(same & causal)[None, None]


class PackedDotProductAttention(DotProductAttention):
    """Megatron's local core attention, also for ``thd``-packed sequences."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params: PackedSeqParams | None = None,
    ):
        if packed_seq_params is None:
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias, None
            )
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(
                f"packed sequences in qkv_format={packed_seq_params.qkv_format!r}: the local "
                "attention supports 'thd'"
            )
        # [t, heads, dim] -> [t, 1, heads, dim]: the pack is one long row.
        query, key, value = (x.unsqueeze(1) if x.dim() == 3 else x for x in (query, key, value))
        mask = packed_causal_mask(packed_seq_params.cu_seqlens_q, query.shape[0])
        return super().forward(query, key, value, mask, attn_mask_type, attention_bias, None)
