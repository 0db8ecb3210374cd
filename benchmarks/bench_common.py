"""Shared set-up of the benchmarks: a random Hugging Face policy checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch


def random_qwen2(root: Path, *, hidden: int, layers: int, vocab: int, max_len: int) -> Path:
    """A random float32 Qwen2 at ``root/qwen2``: heads of 64 (vLLM's CPU attention needs
    that size), FFN ``11/4`` of hidden, untied embeddings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, min(hidden // 64, max(2, hidden // 256))),
        num_hidden_layers=layers,
        vocab_size=vocab,
        max_position_embeddings=max_len,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(0)
    path = root / "qwen2"
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path
