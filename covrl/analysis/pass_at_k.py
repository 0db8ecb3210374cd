"""pass@k and answer diversity of ``n`` sampled responses per prompt.

pass@k is the probability that at least one of ``k`` responses drawn without
replacement from the ``n`` sampled ones is correct. With ``c`` correct responses the
unbiased estimator (Chen et al., 2021, "Evaluating Large Language Models Trained on
Code") is::

    pass@k = 1 - C(n - c, k) / C(n, k)

The binomial ratio is a product of factors in ``[0, 1]``::

    C(n - c, k) / C(n, k) = prod_{j=0}^{k-1} (n - c - j) / (n - j)

so one cumulative product gives pass@k for every ``k = 1..n`` without forming the
(huge) binomial coefficients. It is 0 for ``c = 0`` and 1 for every ``k > n - c``.
A data set's pass@k is the mean over its prompts.

Answer diversity: the number of *distinct correct answers* among a prompt's ``n``
responses, where two responses give the same answer when their answer keys are equal
(the caller's keys; :func:`covrl.tasks.answers.answer_key` gives the task's own notion
of an answer per scorer).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "PassAtKError",
    "PassAtKResult",
    "PromptResult",
    "count_distinct_correct",
    "mean_pass_at_k",
    "pass_at_k_curve",
    "summarize",
]


class PassAtKError(ValueError):
    """Inconsistent sample counts, or a result file that is not a pass@k result."""


def pass_at_k_curve(n: int, c: int) -> np.ndarray:
    """pass@k for ``k = 1..n`` of one prompt with ``c`` correct among ``n`` samples.

    Returns float64 ``[n]``; entry ``k - 1`` is ``1 - C(n - c, k) / C(n, k)``.
    """
    if n < 1 or not 0 <= c <= n:
        raise PassAtKError(f"pass@k needs n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    j = np.arange(n, dtype=np.float64)
    # Factors (n - c - j) / (n - j) for j = 0..n-1; clipped at 0 once j >= n - c, where
    # every later product is 0 as well (no k-subset avoids all correct samples).
    factors = np.clip(n - c - j, 0.0, None) / (n - j)
    return 1.0 - np.cumprod(factors)


def mean_pass_at_k(correct_counts: Sequence[int], n: int) -> np.ndarray:
    """pass@k for ``k = 1..n`` averaged over prompts; ``correct_counts[p]`` is the
    number of correct samples of prompt ``p`` among its ``n``. Returns float64 ``[n]``."""
    if len(correct_counts) == 0:
        raise PassAtKError("pass@k over no prompts")
    curves = np.stack([pass_at_k_curve(n, int(c)) for c in correct_counts])
    return curves.mean(axis=0)


def count_distinct_correct(keys: Sequence[str | None], correct: Sequence[bool]) -> int:
    """Distinct answer keys among the correct samples of one prompt."""
    if len(keys) != len(correct):
        raise PassAtKError(f"{len(keys)} answer keys for {len(correct)} correctness flags")
    return len({k for k, ok in zip(keys, correct, strict=True) if ok and k is not None})


@dataclass(frozen=True)
class PromptResult:
    """One prompt's ``n`` samples: how many are correct and how many distinct correct
    answers they hold; ``info`` carries what identifies the prompt (source row, data
    source, ground truth)."""

    correct: int
    distinct_correct: int
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.info, "correct": self.correct, "distinct_correct": self.distinct_correct}


@dataclass(frozen=True)
class PassAtKResult:
    """pass@k for ``k = 1..n`` (``pass_at_k[k - 1]``) over the prompts, the sampled
    accuracy (``pass_at_k[0]``: the fraction of correct samples) and the mean number of
    distinct correct answers per prompt."""

    n: int
    prompts: list[PromptResult]
    pass_at_k: list[float]

    @property
    def accuracy(self) -> float:
        return sum(p.correct for p in self.prompts) / (self.n * len(self.prompts))

    @property
    def mean_distinct_correct(self) -> float:
        return sum(p.distinct_correct for p in self.prompts) / len(self.prompts)

    def at(self, k: int) -> float:
        """pass@k of one ``k`` in ``1..n``."""
        if not 1 <= k <= self.n:
            raise PassAtKError(f"pass@{k}: expected 1 <= k <= n={self.n}")
        return self.pass_at_k[k - 1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "num_prompts": len(self.prompts),
            "accuracy": self.accuracy,
            "mean_distinct_correct": self.mean_distinct_correct,
            "k": list(range(1, self.n + 1)),
            "pass_at_k": list(self.pass_at_k),
            "prompts": [p.to_dict() for p in self.prompts],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "result") -> PassAtKResult:
        """Read back :meth:`to_dict`'s fields; raises :class:`PassAtKError` naming
        ``where`` and the field that is missing or malformed."""
        if not isinstance(data, Mapping):
            raise PassAtKError(f"{where}: expected a JSON object, got {type(data).__name__}")
        for name in ("n", "pass_at_k", "prompts"):
            if name not in data:
                raise PassAtKError(f"{where}: missing field {name!r}")
        n, curve, prompts = data["n"], data["pass_at_k"], data["prompts"]
        if not isinstance(n, int) or n < 1:
            raise PassAtKError(f"{where}: field 'n' = {n!r}: expected an integer >= 1")
        if (
            not isinstance(curve, list)
            or len(curve) != n
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in curve)
        ):
            raise PassAtKError(
                f"{where}: field 'pass_at_k': expected {n} finite numbers (k = 1..n)"
            )
        if not isinstance(prompts, list) or not prompts:
            raise PassAtKError(f"{where}: field 'prompts': expected a non-empty list")
        rows = []
        for i, p in enumerate(prompts):
            if (
                not isinstance(p, Mapping)
                or not isinstance(p.get("correct"), int)
                or not isinstance(p.get("distinct_correct"), int)
            ):
                raise PassAtKError(
                    f"{where}: field 'prompts[{i}]': expected an object with integer "
                    "'correct' and 'distinct_correct'"
                )
            info = {k: v for k, v in p.items() if k not in ("correct", "distinct_correct")}
            rows.append(PromptResult(p["correct"], p["distinct_correct"], info))
        return cls(n=n, prompts=rows, pass_at_k=[float(v) for v in curve])


def summarize(
    correct: Sequence[Sequence[bool]],
    keys: Sequence[Sequence[str | None]],
    infos: Sequence[Mapping[str, Any]] | None = None,
) -> PassAtKResult:
    """pass@k and distinct correct answers from per-sample outcomes.

    Args:
        correct: ``[prompts][n]`` whether each sample is correct (``n`` the same for
            every prompt).
        keys: ``[prompts][n]`` answer keys (:func:`answer_key`).
        infos: per prompt, what identifies it in the result (optional).
    """
    if not correct:
        raise PassAtKError("no prompts")
    n = len(correct[0])
    if n < 1 or any(len(row) != n for row in correct):
        raise PassAtKError(
            f"every prompt needs the same number >= 1 of samples, got {sorted({len(r) for r in correct})}"
        )
    if len(keys) != len(correct):
        raise PassAtKError(f"answer keys for {len(keys)} prompts, outcomes for {len(correct)}")
    infos = infos if infos is not None else [{}] * len(correct)
    prompts = [
        PromptResult(
            correct=sum(bool(ok) for ok in row),
            distinct_correct=count_distinct_correct(row_keys, [bool(ok) for ok in row]),
            info=dict(info),
        )
        for row, row_keys, info in zip(correct, keys, infos, strict=True)
    ]
    curve = mean_pass_at_k([p.correct for p in prompts], n)
    return PassAtKResult(n=n, prompts=prompts, pass_at_k=curve.tolist())
