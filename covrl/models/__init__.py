"""Policy models: megatron-core ``GPTModel`` built from Hugging Face Llama / Qwen2
checkpoints, with streamed weight loading and export."""

from covrl.models.hf_config import (
    PolicyModelConfig,
    build_model,
    layer_spec,
    validate_parallel_layout,
    vocab_size_with_padding,
)
from covrl.models.hf_weights import (
    HFCheckpointReader,
    LoadStats,
    WeightEntry,
    export_hf_weights,
    load_hf_weights,
    save_hf_checkpoint,
    unwrap_model,
    verify_hf_checkpoint,
    weight_entries,
)

__all__ = [
    "HFCheckpointReader",
    "LoadStats",
    "PolicyModelConfig",
    "WeightEntry",
    "build_model",
    "export_hf_weights",
    "layer_spec",
    "load_hf_weights",
    "save_hf_checkpoint",
    "unwrap_model",
    "validate_parallel_layout",
    "verify_hf_checkpoint",
    "vocab_size_with_padding",
    "weight_entries",
]
