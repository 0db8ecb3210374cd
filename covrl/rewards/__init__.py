"""Rewards: scorers chosen by ``data_source``, run under a per-sample time limit.

registry = RewardRegistry(config.sources, config.default)
with RewardExecutor(config.timeout_s) as executor:
    results = executor.score([ScoreRequest(registry.spec_for(src), src, text, gt, extra)])
"""

from covrl.rewards.executor import RewardExecutor, ScoreRequest, ScoreResult
from covrl.rewards.registry import (
    BUILTIN_SCORERS,
    DEFAULT_SOURCES,
    RewardError,
    RewardRegistry,
    ScoreValue,
    call_scorer,
    resolve_scorer,
)

__all__ = [
    "BUILTIN_SCORERS",
    "DEFAULT_SOURCES",
    "RewardError",
    "RewardExecutor",
    "RewardRegistry",
    "ScoreRequest",
    "ScoreResult",
    "ScoreValue",
    "call_scorer",
    "resolve_scorer",
]
