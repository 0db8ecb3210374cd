"""The policy engine: a megatron-core policy's log-prob passes, optimizer steps,
checkpoints and exports (:class:`PolicyEngine`), with its settings."""

from covrl.engine.config import EngineConfig, EnginePassConfig, OptimizerConfig
from covrl.engine.engine import PolicyEngine, StepResult, TokenOutputs

__all__ = [
    "EngineConfig",
    "EnginePassConfig",
    "OptimizerConfig",
    "PolicyEngine",
    "StepResult",
    "TokenOutputs",
]
