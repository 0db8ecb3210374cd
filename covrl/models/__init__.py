"""Policy models: megatron-core ``GPTModel`` built from Hugging Face Llama / Qwen2
checkpoints (:mod:`~covrl.models.hf_config` the architecture,
:mod:`~covrl.models.model` the model chunks, :mod:`~covrl.models.hf_weights` streamed
weight loading and export); :mod:`covrl.engine` runs them."""

from covrl.models.hf_config import (
    PolicyModelConfig,
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
from covrl.models.model import (
    TRANSFORMER_IMPLS,
    TransformerEngineUnavailable,
    build_model,
    layer_spec,
    resolve_transformer_impl,
    transformer_engine_import_error,
)

__all__ = [
    "TRANSFORMER_IMPLS",
    "HFCheckpointReader",
    "LoadStats",
    "PolicyModelConfig",
    "TransformerEngineUnavailable",
    "WeightEntry",
    "build_model",
    "export_hf_weights",
    "layer_spec",
    "load_hf_weights",
    "save_hf_checkpoint",
    "unwrap_model",
    "resolve_transformer_impl",
    "transformer_engine_import_error",
    "validate_parallel_layout",
    "verify_hf_checkpoint",
    "vocab_size_with_padding",
    "weight_entries",
]
