"""The "two-sum" task: write two 2-digit numbers that add up to a given sum.

A small verifiable reasoning task with *many* correct answers per prompt, so a policy
warm-started on uniformly random correct answers is spread out and has entropy to lose
under RL (a single-answer task leaves almost none: see ``docs/tiny_task.md``).

Prompt (one user message; ``TwoSumConfig.prompt_template``)::

    Sum to 73

A correct response ends with a boxed pair of 2-digit numbers (10..99) whose sum is
the target, e.g. ``\\boxed{45+28}``. Sums run from ``min_sum`` to ``max_sum``; a fixed,
seeded subset of them is held out for validation, so validation prompts are never seen
in training. A sum ``S`` has ``min(S - 19, 199 - S)`` correct answers (11 to 90 for the
default range 30..188).

Rows follow verl's parquet layout::

    data_source   "two_sum"
    prompt        [{"role": "user", "content": ...}]     chat messages
    ability       "math"
    reward_model  {"style": "rule", "ground_truth": "73"}
    extra_info    {"split", "index", "target_sum", "num_solutions"}

This module imports nothing heavy (no torch), so reward code can use
:func:`compute_score` cheaply.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

DATA_SOURCE = "two_sum"
# The instruction is the same for every prompt, so a short one costs the model nothing
# and every rollout, log-prob and update pass fewer tokens (docs/tiny_task.md).
PROMPT_TEMPLATE = "Sum to {target}"
# The first version's instruction (kept for the step-cost benchmark's old recipe).
LONG_PROMPT_TEMPLATE = "Write two 2-digit numbers that sum to {target}."
LOW, HIGH = 10, 99  # the 2-digit numbers

_BOXED = "\\boxed{"
_PAIR_RE = re.compile(r"\s*(\d+)\s*\+\s*(\d+)\s*")


@dataclass(frozen=True)
class TwoSumConfig:
    """Which sums exist and which are held out for validation.

    ``num_validation`` sums are drawn from ``[min_sum, max_sum]`` with
    ``random.Random(seed)``; the rest are the training sums. ``prompt_template``: the
    user message, with ``{target}`` where the sum goes.
    """

    min_sum: int = 30
    max_sum: int = 188
    num_validation: int = 50
    seed: int = 0
    prompt_template: str = PROMPT_TEMPLATE

    def __post_init__(self) -> None:
        if not 2 * LOW <= self.min_sum <= self.max_sum <= 2 * HIGH:
            raise ValueError(
                f"two_sum: min_sum={self.min_sum}, max_sum={self.max_sum}: expected "
                f"{2 * LOW} <= min_sum <= max_sum <= {2 * HIGH}"
            )
        total = self.max_sum - self.min_sum + 1
        if not 0 < self.num_validation < total:
            raise ValueError(
                f"two_sum: num_validation={self.num_validation}: expected 1..{total - 1} "
                f"(the range {self.min_sum}..{self.max_sum} has {total} sums)"
            )
        if self.prompt_template.count("{target}") != 1:
            raise ValueError(
                f"two_sum: prompt_template={self.prompt_template!r}: expected one "
                "'{target}' placeholder"
            )


def split_sums(config: TwoSumConfig) -> dict[str, list[int]]:
    """``{"train": [...], "validation": [...]}``: disjoint, sorted, covering the range."""
    sums = list(range(config.min_sum, config.max_sum + 1))
    held_out = set(random.Random(config.seed).sample(sums, config.num_validation))
    return {
        "train": [s for s in sums if s not in held_out],
        "validation": sorted(held_out),
    }


def solutions(target: int) -> list[tuple[int, int]]:
    """Every ordered pair ``(a, b)`` of 2-digit numbers with ``a + b == target``."""
    return [(a, target - a) for a in range(LOW, HIGH + 1) if LOW <= target - a <= HIGH]


def prompt_messages(target: int, template: str = PROMPT_TEMPLATE) -> list[dict[str, str]]:
    """The chat messages of the prompt for ``target`` (one user message)."""
    return [{"role": "user", "content": template.format(target=target)}]


def format_answer(a: int, b: int) -> str:
    """The response text of a (worked) answer: the boxed pair."""
    return f"{_BOXED}{a}+{b}}}"


def sample_answer(target: int, rng: random.Random) -> str:
    """A uniformly random correct answer for ``target`` (the warm-start target: the
    starting policy is spread over all correct answers)."""
    a, b = rng.choice(solutions(target))
    return format_answer(a, b)


def make_rows(config: TwoSumConfig, split: str) -> list[dict]:
    """The dataset rows of ``split`` ("train" or "validation"), one per sum, in order."""
    sums = split_sums(config)
    if split not in sums:
        raise ValueError(f"two_sum: split={split!r}: expected 'train' or 'validation'")
    return [
        {
            "data_source": DATA_SOURCE,
            "prompt": prompt_messages(s, config.prompt_template),
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(s)},
            "extra_info": {
                "split": split,
                "index": i,
                "target_sum": s,
                "num_solutions": len(solutions(s)),
            },
        }
        for i, s in enumerate(sums[split])
    ]


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (braces balanced), or None."""
    start = text.rfind(_BOXED)
    while start != -1:
        depth, i = 1, start + len(_BOXED)
        while i < len(text):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start + len(_BOXED) : i]
            i += 1
        # Unclosed: look for an earlier, complete one.
        start = text.rfind(_BOXED, 0, start)
    return None


def parse_answer(solution_str: str) -> tuple[int, int] | None:
    """The answer ``(a, b)`` of the last ``\\boxed{a+b}`` in ``solution_str`` when both
    are 2-digit numbers (10..99, no leading zero; spaces around them are allowed), else
    None.

    An answer is an *ordered* pair: ``45+28`` and ``28+45`` are two answers, as
    :func:`solutions` and ``num_solutions`` count them.
    """
    boxed = last_boxed(solution_str)
    if boxed is None:
        return None
    match = _PAIR_RE.fullmatch(boxed)
    if match is None:
        return None
    a_str, b_str = match.groups()
    if any(len(x) != 2 or x[0] == "0" for x in (a_str, b_str)):
        return None
    return int(a_str), int(b_str)


def compute_score(solution_str: str, ground_truth: str | int, extra_info: dict | None = None):
    """1.0 if the last ``\\boxed{a+b}`` in ``solution_str`` holds two 2-digit numbers
    (10..99, no leading zero) that sum to ``ground_truth``, else 0.0."""
    del extra_info  # the score depends on the answer and the target only
    answer = parse_answer(solution_str)
    return 1.0 if answer is not None and sum(answer) == int(ground_truth) else 0.0


def corpus(config: TwoSumConfig) -> list[str]:
    """Every text the tokenizer must cover: each prompt and each correct answer."""
    texts = []
    for s in range(config.min_sum, config.max_sum + 1):
        texts.append(prompt_messages(s, config.prompt_template)[0]["content"])
        texts.extend(format_answer(a, b) for a, b in solutions(s))
    return texts


def write_dataset(config: TwoSumConfig, out_dir) -> dict[str, str]:
    """Write ``train.parquet`` and ``validation.parquet`` into ``out_dir``; returns
    ``{split: path}``. Deterministic: the same config gives byte-identical rows."""
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in ("train", "validation"):
        path = out / f"{split}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(pa.Table.from_pylist(make_rows(config, split)), tmp)
        tmp.replace(path)
        paths[split] = str(path)
    return paths
