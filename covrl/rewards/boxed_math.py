"""0/1 math reward: the response's ``\\boxed{}`` answer against the ground truth.

Equivalence is decided by the ``math-verify`` package (symbolic and numeric
comparison through sympy): the ground truth is parsed as LaTeX, the response's boxed
answer with boxed content taking priority. A response without ``\\boxed`` (or
``\\fbox``) scores 0.

math-verify's own time limit is a ``SIGALRM`` that only works in a process's main
thread and cannot interrupt C code (a pathological ``10^{10^{10}}`` hangs inside
sympy's integer arithmetic); it is disabled here and the per-sample limit is enforced
by :class:`covrl.rewards.RewardExecutor`, which runs scorers in a worker process.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

__all__ = ["compute_score"]

_BOXED_MARKERS = ("\\boxed", "\\fbox")


@lru_cache(maxsize=1)
def _configs():
    # The time limit is the executor's (see the module docstring): silence the
    # library's one-off warning that its own limit is off.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold = [LatexExtractionConfig()]
    pred = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return gold, pred


@lru_cache(maxsize=4096)
def _parse_gold(ground_truth: str):
    gold_cfg, _ = _configs()
    text = ground_truth if "\\boxed" in ground_truth else f"\\boxed{{{ground_truth}}}"
    return parse(text, extraction_config=gold_cfg, parsing_timeout=None)


def compute_score(solution_str: str, ground_truth, extra_info: dict | None = None) -> float:
    """1.0 if the boxed answer of ``solution_str`` equals ``ground_truth``, else 0.0."""
    del extra_info
    if not any(m in solution_str for m in _BOXED_MARKERS):
        return 0.0
    gold = _parse_gold(str(ground_truth))
    _, pred_cfg = _configs()
    pred = parse(solution_str, extraction_config=pred_cfg, parsing_timeout=None)
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=None) else 0.0
