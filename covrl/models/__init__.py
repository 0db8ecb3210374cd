"""Policy models: megatron-core ``GPTModel`` built from Hugging Face Llama / Qwen2
checkpoints (:mod:`~covrl.models.hf_config` the architecture,
:mod:`~covrl.models.model` the model chunks, :mod:`~covrl.models.hf_weights` streamed
weight loading and export) and the :class:`PolicyEngine` that runs them."""

from covrl.models.config import EngineConfig, EnginePassConfig, OptimizerConfig
from covrl.models.engine import PolicyEngine, StepResult, TokenOutputs
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
from covrl.models.model import build_model, layer_spec, use_transformer_engine

__all__ = [
    "EngineConfig",
    "EnginePassConfig",
    "OptimizerConfig",
    "PolicyEngine",
    "StepResult",
    "TokenOutputs",
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
    "use_transformer_engine",
    "validate_parallel_layout",
    "verify_hf_checkpoint",
    "vocab_size_with_padding",
    "weight_entries",
]
