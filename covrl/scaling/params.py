"""Parameter and byte counts of a :class:`PolicyModelConfig` per GPU of a TP x PP layout.

Qwen2/Llama blocks: SwiGLU MLP, grouped-query attention, RMSNorm; the vocabulary padded
as megatron pads it. :mod:`covrl.scaling.memory` turns them into the per-GPU estimate.
"""

from __future__ import annotations

import math

from covrl.models.hf_config import PolicyModelConfig

__all__ = [
    "activation_bytes_per_token_layer",
    "kv_bytes_per_token",
    "layer_params",
    "stage_params",
    "total_params",
]


def layer_params(model: PolicyModelConfig) -> int:
    h, d, f = model.hidden_size, model.head_dim, model.ffn_hidden_size
    q, kv = model.num_attention_heads * d, model.num_query_groups * d
    attn = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if model.add_qkv_bias else 0)
    return attn + 3 * h * f + 2 * h  # SwiGLU (gate, up, down) and two RMSNorms


def total_params(model: PolicyModelConfig, tp: int | None = None) -> int:
    """All parameters; with ``tp``, the vocabulary padded for that TP size."""
    vocab = model.vocab_size if tp is None else model.padded_vocab_size(tp)
    n_emb = 1 if model.tie_word_embeddings else 2
    return (
        model.num_layers * layer_params(model)
        + n_emb * vocab * model.hidden_size
        + model.hidden_size
    )


def stage_params(model: PolicyModelConfig, tp: int, pp: int) -> int:
    """Parameters on one GPU of the largest pipeline stage (first or last)."""
    h = model.hidden_size
    emb = model.padded_vocab_size(tp) * h // tp
    if pp == 1:
        embeddings = emb * (1 if model.tie_word_embeddings else 2) + h
    else:
        # First stage: input embedding; last stage: output layer (a copy when tied) and
        # the final norm.
        embeddings = emb + h
    norms = 2 * h  # replicated over TP
    layers = math.ceil(model.num_layers / pp)
    return layers * ((layer_params(model) - norms) // tp + norms) + embeddings


def activation_bytes_per_token_layer(
    model: PolicyModelConfig, tp: int, sequence_parallel: bool = False
) -> int:
    h, f = model.hidden_size, model.ffn_hidden_size
    gd = model.num_query_groups * model.head_dim
    replicated = 8 * h // tp if sequence_parallel else 8 * h
    return replicated + (4 * h + 4 * gd + 6 * f) // tp


def kv_bytes_per_token(model: PolicyModelConfig, vllm_tp: int) -> int:
    """bf16 K and V of every layer for one token, on one GPU of a vLLM TP group."""
    heads = max(1, model.num_query_groups // vllm_tp)  # replicated when g < r
    return 2 * model.num_layers * heads * model.head_dim * 2
