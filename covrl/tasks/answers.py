"""What counts as the same answer, per scorer: the key that
:func:`covrl.analysis.count_distinct_correct` counts distinct correct answers by.

* ``two_sum``: the ordered pair of the last ``\\boxed{a+b}``
  (:func:`covrl.tasks.two_sum.parse_answer`), written ``"a+b"``: the task counts ordered
  pairs, so ``45+28`` and ``28+45`` are two answers.
* any other scorer: the content of the last ``\\boxed{}`` with white space removed, or
  the whole response with white space folded when it has no box (surface forms differ:
  ``0.5`` and ``\\frac{1}{2}`` are two keys).
"""

from __future__ import annotations

from collections.abc import Callable

from covrl.tasks import two_sum

__all__ = ["answer_key"]


def _whitespace_free(text: str) -> str:
    return "".join(text.split())


def _two_sum_key(response: str) -> str | None:
    answer = two_sum.parse_answer(response)
    return None if answer is None else f"{answer[0]}+{answer[1]}"


def _boxed_or_response_key(response: str) -> str:
    boxed = two_sum.last_boxed(response)
    if boxed is not None:
        return _whitespace_free(boxed)
    return " ".join(response.split())


# Scorer spec (a built-in name of covrl.rewards) -> answer key; None: not an answer.
_ANSWER_KEYS: dict[str, Callable[[str], str | None]] = {
    "two_sum": _two_sum_key,
}


def answer_key(spec: str, response: str) -> str | None:
    """The answer of ``response`` under the scorer ``spec`` (see the module docstring);
    None when the response gives no answer the scorer could accept."""
    return _ANSWER_KEYS.get(spec, _boxed_or_response_key)(response)
