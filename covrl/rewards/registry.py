"""Reward functions chosen by ``data_source``.

A scorer is named by a *spec*:

* a built-in name: ``math`` (the ``\\boxed{}`` verifier of
  :mod:`covrl.rewards.boxed_math`) or ``two_sum`` (:mod:`covrl.tasks.two_sum`);
  built-ins take ``(solution_str, ground_truth, extra_info)``;
* a user function ``package.module:function`` or ``path/to/file.py:function`` with
  verl's signature ``fn(data_source, solution_str, ground_truth, extra_info)``.

Either returns a float reward, or a dict with a ``score`` entry (verl's convention)
and optionally ``acc`` (the correctness logged as accuracy, when it is not the reward
itself); without ``acc`` a sample counts as correct when its reward is > 0.

:class:`RewardRegistry` maps a data source to a spec: the run's ``reward.sources``
first, then :data:`DEFAULT_SOURCES`, then ``reward.default``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BUILTIN_SCORERS",
    "DEFAULT_SOURCES",
    "RewardError",
    "RewardRegistry",
    "ScoreValue",
    "call_scorer",
    "resolve_scorer",
]

# Built-in scorers: (solution_str, ground_truth, extra_info) -> float. Imported lazily.
BUILTIN_SCORERS: dict[str, str] = {
    "math": "covrl.rewards.boxed_math:compute_score",
    "two_sum": "covrl.tasks.two_sum:compute_score",
}

# Data sources with a known scorer (others fall back to ``reward.default``).
DEFAULT_SOURCES: dict[str, str] = {
    "two_sum": "two_sum",
    "math_dapo": "math",
    "lighteval/MATH": "math",
    "HuggingFaceH4/MATH-500": "math",
}


class RewardError(ValueError):
    """An unknown data source, an unloadable scorer, or a scorer that failed."""


@dataclass(frozen=True)
class ScoreValue:
    """One scored sample: the reward and whether it counts as correct (0/1)."""

    reward: float
    acc: float


def _load_function(spec: str) -> Callable[..., Any]:
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise RewardError(
            f"reward function {spec!r}: expected a built-in name {sorted(BUILTIN_SCORERS)} "
            "or 'module:function' / 'path/to/file.py:function'"
        )
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise RewardError(f"reward function {spec!r}: file {path} does not exist")
            name = f"covrl_user_reward_{abs(hash(path.resolve()))}"
            if name not in sys.modules:
                loader_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(loader_spec)
                loader_spec.loader.exec_module(module)
                sys.modules[name] = module
            module = sys.modules[name]
        else:
            module = importlib.import_module(module_name)
    except RewardError:
        raise
    except Exception as exc:  # noqa: BLE001 - any import-time failure of user code
        raise RewardError(
            f"reward function {spec!r}: cannot import {module_name}: {type(exc).__name__}: {exc}"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward function {spec!r}: {module_name} has no function {attr!r}")
    return fn


_resolved: dict[str, Callable[..., Any]] = {}


def resolve_scorer(spec: str) -> Callable[[str, str, Any, dict | None], Any]:
    """The scorer of ``spec`` with verl's signature
    ``fn(data_source, solution_str, ground_truth, extra_info)`` (cached per process)."""
    if spec not in _resolved:
        if spec in BUILTIN_SCORERS:
            builtin = _load_function(BUILTIN_SCORERS[spec])

            def fn(data_source, solution_str, ground_truth, extra_info, _f=builtin):
                return _f(solution_str, ground_truth, extra_info)

            _resolved[spec] = fn
        else:
            _resolved[spec] = _load_function(spec)
    return _resolved[spec]


def _as_score(spec: str, data_source: str, value: Any) -> ScoreValue:
    acc = None
    if isinstance(value, Mapping):
        if "score" not in value:
            raise RewardError(
                f"reward function {spec!r} (data_source={data_source!r}) returned a dict "
                f"without 'score' (keys {sorted(value)})"
            )
        acc, value = value.get("acc"), value["score"]
    try:
        reward = float(value)
    except (TypeError, ValueError):
        raise RewardError(
            f"reward function {spec!r} (data_source={data_source!r}) returned {value!r:.60}, "
            "expected a number"
        ) from None
    if not math.isfinite(reward):
        raise RewardError(
            f"reward function {spec!r} (data_source={data_source!r}) returned {reward}, "
            "expected a finite number"
        )
    correct = float(acc) if acc is not None else float(reward > 0)
    return ScoreValue(reward, correct)


def call_scorer(
    spec: str, data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None
) -> ScoreValue:
    """Score one sample (no time limit: see :class:`covrl.rewards.RewardExecutor`)."""
    fn = resolve_scorer(spec)
    try:
        value = fn(data_source, solution_str, ground_truth, extra_info)
    except Exception as exc:  # noqa: BLE001 - user code
        raise RewardError(
            f"reward function {spec!r} (data_source={data_source!r}) raised "
            f"{type(exc).__name__}: {exc}"
        ) from None
    return _as_score(spec, data_source, value)


class RewardRegistry:
    """``data_source`` -> scorer spec.

    Args:
        sources: the run's ``reward.sources`` (data source -> spec), taking precedence.
        default: the spec for sources known nowhere (None: such a source is an error).
    """

    def __init__(self, sources: Mapping[str, str] | None = None, default: str | None = "math"):
        self.sources = {**DEFAULT_SOURCES, **dict(sources or {})}
        self.default = default

    def spec_for(self, data_source: str) -> str:
        spec = self.sources.get(data_source, self.default)
        if spec is None:
            raise RewardError(
                f"no reward function for data_source={data_source!r}: add it under "
                f"reward.sources (known: {sorted(self.sources)}) or set reward.default"
            )
        return spec

    def check(self, data_sources: Iterable[str]) -> dict[str, str]:
        """Resolve (import) the scorer of every source now, so a bad spec fails before
        training starts. Returns ``{data_source: spec}``."""
        specs = {s: self.spec_for(s) for s in sorted(set(data_sources))}
        for spec in set(specs.values()):
            resolve_scorer(spec)
        return specs
