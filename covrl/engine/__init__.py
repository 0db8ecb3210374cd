"""The policy engine: a megatron-core policy's log-prob passes, optimizer steps,
checkpoints and exports (:class:`PolicyEngine`), with its settings."""

from covrl.engine.engine import (
    EngineConfig,
    OptimizerConfig,
    PolicyEngine,
    StepResult,
    TokenOutputs,
)

__all__ = ["EngineConfig", "OptimizerConfig", "PolicyEngine", "StepResult", "TokenOutputs"]
