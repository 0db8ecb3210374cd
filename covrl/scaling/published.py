"""The model a plan is printed for: its ``config.json``, or the published config of one of
the paper's base models when the weights are not downloaded yet."""

from __future__ import annotations

from pathlib import Path

from covrl.models.hf_config import PolicyModelConfig

__all__ = ["PUBLISHED_CONFIGS", "model_config"]

_QWEN25 = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "attention_dropout": 0.0, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 152064,
    "max_position_embeddings": 131072,
}  # fmt: skip
# The published config.json values of the paper's base models (the fields that matter).
PUBLISHED_CONFIGS: dict[str, dict] = {
    "qwen2.5-7b": {
        **_QWEN25, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    },
    "qwen2.5-32b": {
        **_QWEN25, "hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
        "num_attention_heads": 40, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    },
}  # fmt: skip


def model_config(model_path: str) -> PolicyModelConfig:
    """The model at ``<model_path>/config.json``; else a published config matched by the
    directory name (so a plan can be printed before the weights are downloaded)."""
    if (Path(model_path) / "config.json").is_file():
        return PolicyModelConfig.from_hf(model_path)
    name = Path(model_path.rstrip("/")).name.lower()
    for key, config in PUBLISHED_CONFIGS.items():
        if name.startswith(key):
            return PolicyModelConfig.from_hf(config)
    raise ValueError(
        f"policy.model_path={model_path}: no config.json there and no published config for "
        f"{name!r} (built in: {', '.join(PUBLISHED_CONFIGS)})"
    )
