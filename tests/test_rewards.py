"""Rewards: the registry, the boxed-math verifier, the time-limited worker, error paths."""

from __future__ import annotations

import time

import pytest

from covrl.rewards import (
    RewardError,
    RewardExecutor,
    RewardRegistry,
    ScoreRequest,
    call_scorer,
)
from covrl.rewards.boxed_math import compute_score as math_score


@pytest.mark.parametrize(
    ("solution", "truth", "expected"),
    [
        ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{3}", "\\frac{6}{2}", 1.0),
        ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
        ("\\boxed{4}", "5", 0.0),
        ("the answer is 5", "5", 0.0),  # no boxed answer
        ("\\boxed{5", "5", 0.0),  # unclosed
    ],
)
def test_math_verifier(solution, truth, expected):
    assert math_score(solution, truth) == expected


def test_registry_sources_and_specs(tmp_path):
    registry = RewardRegistry({"mine": "tests.trainer_fixtures:digit_reward"}, default=None)
    assert registry.spec_for("two_sum") == "two_sum"
    assert registry.spec_for("math_dapo") == "math"
    assert registry.spec_for("mine") == "tests.trainer_fixtures:digit_reward"
    with pytest.raises(RewardError, match="no reward function for data_source='aime'"):
        registry.spec_for("aime")
    assert RewardRegistry(default="math").spec_for("aime") == "math"
    # Built-ins take (solution, truth, extra); user functions verl's 4 arguments.
    assert call_scorer("two_sum", "two_sum", "\\boxed{45+28}", "73", None).reward == 1.0
    user = call_scorer("tests.trainer_fixtures:inverted_digit_reward", "x", "a1", "0", None)
    assert (user.reward, user.acc) == (0.0, 1.0)
    # A file path works as the module.
    f = tmp_path / "my_reward.py"
    f.write_text(
        "def score(data_source, solution_str, ground_truth, extra_info):\n    return 0.25\n"
    )
    assert call_scorer(f"{f}:score", "x", "s", "t", None) == call_scorer(
        f"{f}:score", "x", "s", "t", None
    )
    assert call_scorer(f"{f}:score", "x", "s", "t", None).reward == 0.25
    for bad, needle in [
        ("no_such_module_xyz:fn", "cannot import no_such_module_xyz"),
        ("tests.trainer_fixtures:missing", "has no function 'missing'"),
        ("justaname", "expected a built-in name"),
    ]:
        with pytest.raises(RewardError, match=needle):
            RewardRegistry({"s": bad}).check(["s"])


def test_bad_return_values_are_errors():
    with pytest.raises(RewardError, match="returned nan, expected a finite number"):
        call_scorer("tests.trainer_fixtures:nan_reward", "src", "x", "y", None)


@pytest.fixture(scope="module")
def executor():
    with RewardExecutor(timeout_s=2.0) as ex:
        yield ex


def test_worker_scores_and_survives_a_hang(executor):
    """A pathological answer (sympy never returns on 10^{10^{10}}, in C code a signal
    cannot interrupt) scores 0 after the limit; the next samples are still scored."""
    reqs = [
        ScoreRequest("math", "math_dapo", "\\boxed{1/2}", "0.5"),
        ScoreRequest("math", "math_dapo", "\\boxed{10^{10^{10}}}", "1"),
        ScoreRequest("two_sum", "two_sum", "\\boxed{45+28}", "73"),
        ScoreRequest("math", "math_dapo", "\\boxed{7}", "3"),
    ]
    executor.score(reqs[:1])  # worker started and warm
    start = time.monotonic()
    results = executor.score(reqs)
    elapsed = time.monotonic() - start
    assert [(r.reward, r.timed_out) for r in results] == [
        (1.0, False),
        (0.0, True),
        (1.0, False),
        (0.0, False),
    ]
    assert elapsed < 2.0 + 15.0  # one limit, one worker restart


def test_worker_errors_name_function_and_prompt(executor):
    with pytest.raises(RewardError) as info:
        executor.score(
            [
                ScoreRequest(
                    "tests.trainer_fixtures:nan_reward", "src", "x", "y", source="train.parquet:7"
                )
            ]
        )
    message = str(info.value)
    assert "tests.trainer_fixtures:nan_reward" in message and "train.parquet:7" in message
    # The worker is still usable afterwards.
    assert (
        executor.score([ScoreRequest("two_sum", "two_sum", "\\boxed{45+28}", "73")])[0].reward
        == 1.0
    )
