"""pass@k and distinct correct answers: the estimator against enumeration of every
k-subset and the exact binomial ratio, answer keys on hand-made responses, and
tools/pass_at_k.py end to end on the tiny random Qwen2 (one vLLM start), recounted
from the samples it stores with the scorer itself."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from covrl.analysis import (
    PassAtKError,
    PassAtKResult,
    count_distinct_correct,
    mean_pass_at_k,
    pass_at_k_curve,
    summarize,
)
from covrl.tasks import two_sum
from covrl.tasks.answers import answer_key
from tests.trainer_fixtures import digit_reward, shared_assets

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "pass_at_k.py"


def brute_force(n: int, c: int, k: int) -> Fraction:
    """The share of the k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(any(i < c for i in s) for s in subsets)
    return Fraction(hits, len(subsets))


def closed_form(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


# ---------------------------------------------------------------------------- estimator
def test_estimator_matches_enumeration_of_every_subset():
    for n in range(1, 9):
        for c in range(n + 1):
            curve = pass_at_k_curve(n, c)
            assert curve.dtype == np.float64 and curve.shape == (n,)
            for k in range(1, n + 1):
                assert curve[k - 1] == pytest.approx(float(brute_force(n, c, k)), abs=1e-14)


@pytest.mark.parametrize("n", [16, 64, 200, 1000])
def test_estimator_matches_the_exact_binomial_ratio(n):
    # Exact rational reference (math.comb), rounded once to float64.
    for c in sorted({0, 1, 2, n // 7, n // 2, n - 3, n - 1, n}):
        curve = pass_at_k_curve(n, c)
        for k in range(1, n + 1):
            exact = float(closed_form(n, c, k))
            assert abs(curve[k - 1] - exact) <= 1e-12 * max(1.0, exact), (n, c, k)


def test_estimator_edge_cases():
    n = 64
    assert (pass_at_k_curve(n, 0) == 0.0).all()  # c = 0: never solved
    assert (pass_at_k_curve(n, n) == 1.0).all()  # c = n: always solved
    for c in range(1, n + 1):
        curve = pass_at_k_curve(n, c)
        assert curve[n - 1] == 1.0  # k = n: every sample drawn
        assert (curve[n - c :] == 1.0).all()  # k > n - c: no subset avoids the correct ones
        assert curve[0] == pytest.approx(c / n, abs=1e-15)  # pass@1 = c / n
        assert (np.diff(curve) >= 0).all()
    assert pass_at_k_curve(1, 1).tolist() == [1.0] and pass_at_k_curve(1, 0).tolist() == [0.0]
    for n_bad, c_bad in ((0, 0), (4, 5), (4, -1)):
        with pytest.raises(PassAtKError, match="0 <= c <= n"):
            pass_at_k_curve(n_bad, c_bad)


def test_mean_over_prompts():
    counts, n = [0, 3, 8, 1], 8
    expected = [
        float(sum(closed_form(n, c, k) for c in counts) / len(counts)) for k in range(1, n + 1)
    ]
    np.testing.assert_allclose(mean_pass_at_k(counts, n), expected, rtol=1e-13, atol=1e-15)
    with pytest.raises(PassAtKError, match="no prompts"):
        mean_pass_at_k([], n)


# ---------------------------------------------------------------------------- answers
def test_two_sum_answers_are_ordered_pairs_of_the_last_box():
    cases = {
        "\\boxed{45+28}": "45+28",
        "\\boxed{ 45 + 28 }": "45+28",  # spacing is not part of the answer
        "\\boxed{28+45}": "28+45",  # another answer of the same sum
        "first \\boxed{10+63} then \\boxed{45+28}": "45+28",  # the last box counts
        "\\boxed{05+68}": None,  # leading zero: not a 2-digit number
        "\\boxed{100+27}": None,
        "\\boxed{45-28}": None,
        "\\boxed{45+28": None,  # unclosed
        "45+28": None,  # no box
    }
    for text, key in cases.items():
        assert answer_key("two_sum", text) == key, text
        # The key is an answer exactly when the task's scorer can accept it.
        accepted = two_sum.compute_score(text, 73) == 1.0
        assert accepted == (key is not None and sum(map(int, key.split("+"))) == 73), text


def test_other_scorers_key_the_boxed_content_or_the_response():
    assert answer_key("math", "so \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert answer_key("math", "so \\boxed{ \\frac {1}{2} }") == "\\frac{1}{2}"
    assert answer_key("math", "\\boxed{0.5}") == "0.5"  # surface forms differ
    assert answer_key("pkg.mod:fn", "  the  answer\n is 7 ") == "the answer is 7"


def test_distinct_correct_answers_on_hand_made_responses():
    target = 73
    responses = [
        "\\boxed{45+28}",
        "\\boxed{45 + 28}",  # same answer as the first
        "\\boxed{28+45}",  # a different answer
        "\\boxed{45+29}",  # wrong sum
        "\\boxed{10+63}",
        "no answer",
        "\\boxed{63+10}",
        "\\boxed{10+63}",
    ]
    correct = [two_sum.compute_score(r, target) == 1.0 for r in responses]
    keys = [answer_key("two_sum", r) for r in responses]
    assert correct == [True, True, True, False, True, False, True, True]
    assert count_distinct_correct(keys, correct) == 4  # 45+28, 28+45, 10+63, 63+10
    # A key shared with an incorrect sample does not count when no correct one has it.
    assert count_distinct_correct(["a", "a", "b"], [False, True, False]) == 1
    with pytest.raises(PassAtKError, match="3 answer keys for 2"):
        count_distinct_correct(["a", "b", "c"], [True, False])


def test_summarize_and_read_back():
    correct = [[True, False, True, True], [False] * 4, [True] * 4]
    keys = [["a", "b", "a", "c"], ["x"] * 4, ["p", "q", "p", "q"]]
    result = summarize(correct, keys, [{"source": f"f:{i}"} for i in range(3)])
    assert [p.correct for p in result.prompts] == [3, 0, 4]
    assert [p.distinct_correct for p in result.prompts] == [2, 0, 2]
    assert result.accuracy == pytest.approx(7 / 12)
    assert result.at(1) == pytest.approx(result.accuracy, abs=1e-15)
    assert result.mean_distinct_correct == pytest.approx(4 / 3)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["k"] == [1, 2, 3, 4] and data["prompts"][0]["source"] == "f:0"
    back = PassAtKResult.from_dict(data)
    assert back.pass_at_k == result.pass_at_k and back.prompts == result.prompts
    with pytest.raises(PassAtKError, match="same number >= 1 of samples"):
        summarize([[True], [True, False]], [["a"], ["a", "b"]])
    with pytest.raises(PassAtKError, match="r.json: missing field 'pass_at_k'"):
        PassAtKResult.from_dict({"n": 2, "prompts": []}, "r.json")
    bad = dict(data, pass_at_k=[0.5])
    with pytest.raises(PassAtKError, match="r.json: field 'pass_at_k': expected 4 finite"):
        PassAtKResult.from_dict(bad, "r.json")
    bad = dict(data, prompts=[{"correct": 1}])
    with pytest.raises(PassAtKError, match=r"field 'prompts\[0\]'"):
        PassAtKResult.from_dict(bad, "r.json")


# ---------------------------------------------------------------------------- the tool
@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("pass_at_k_cli", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module.main


def test_cli_help_and_input_errors(cli, tmp_path, capsys):
    for argv in (["--help"], ["eval", "--help"], ["plot", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            cli(argv)
        assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--data", "--config", "--num-samples", "--reward-source", "--labels"):
        assert option in text
    assert "45+28 and 28+45 are two answers" in text

    model = tmp_path / "model"
    assert cli(["eval", "--model", str(model), "--data", "x.parquet", "--out", "o.json"]) == 1
    assert f"--model {model}: directory does not exist" in capsys.readouterr().err
    model.mkdir()
    assert cli(["eval", "--model", str(model), "--data", "x.parquet", "--out", "o.json"]) == 1
    assert "no config.json" in capsys.readouterr().err
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    missing = tmp_path / "missing.parquet"
    assert cli(["eval", "--model", str(model), "--data", str(missing), "--out", "o.json"]) == 1
    assert f"--data: {missing}: file does not exist" in capsys.readouterr().err
    config = tmp_path / "bad.yaml"
    config.write_text("sampling:\n  max_tokenz: 3\n")
    assert cli(["eval", "--model", str(model), "--config", str(config), "--out", "o.json"]) == 1
    assert f"--config {config}" in capsys.readouterr().err

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"n": 2, "pass_at_k": [0.1, 0.2]}))
    assert cli(["plot", str(bad), "--out", str(tmp_path / "p.png")]) == 1
    assert f"{bad}: missing field 'prompts'" in capsys.readouterr().err
    assert cli(["plot", str(tmp_path / "none.json"), "--out", str(tmp_path / "p.png")]) == 1
    assert "none.json: file does not exist" in capsys.readouterr().err


N, PROMPTS, MAX_TOKENS = 8, 6, 8
# The fixture's random policy rarely writes a two-sum answer; "contains a digit" is met
# by about 60% of its samples, so the counts vary from prompt to prompt.
REWARD = "tests.trainer_fixtures:digit_reward"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    assets = shared_assets(tmp_path_factory)
    out = tmp_path_factory.mktemp("pass_at_k")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    command = [
        sys.executable,
        str(TOOL),
        "eval",
        "--model",
        assets["model"],
        "--data",
        assets["val"],
        "-n",
        str(N),
        "--max-prompts",
        str(PROMPTS),
        "--max-tokens",
        str(MAX_TOKENS),
        "--reward-source",
        f"two_sum={REWARD}",
        "--kv-cache-mb",
        "16",
        "--seed",
        "3",
        "--save-samples",
        "--out",
        str(out / "result.json"),
        "--plot",
        str(out / "result.png"),
    ]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "result.json").read_text()), proc.stdout


@pytest.mark.slow
def test_tool_counts_match_a_recount_with_the_scorer(evaluated):
    _, data, stdout = evaluated
    assert data["n"] == N and data["num_prompts"] == PROMPTS == len(data["prompts"])
    assert data["sampling"]["temperature"] == 1.0 and data["sampling"]["seed"] == 3
    assert data["reward"]["scorers"] == {"two_sum": REWARD}
    assert data["checkpoint"].endswith("model")
    counts = []
    for prompt in data["prompts"]:
        samples = prompt["samples"]
        assert len(samples) == N
        ok = [digit_reward("two_sum", s["response"], prompt["ground_truth"]) > 0 for s in samples]
        assert [s["correct"] for s in samples] == ok
        assert prompt["correct"] == sum(ok)
        assert [s["answer"] for s in samples] == [
            answer_key(REWARD, s["response"]) for s in samples
        ]
        distinct = {s["answer"] for s, good in zip(samples, ok, strict=True) if good}
        assert prompt["distinct_correct"] == len(distinct)
        counts.append(sum(ok))
    # Not all-or-nothing: the counts exercise the estimator.
    assert 0 < sum(counts) < N * PROMPTS
    accuracy = sum(counts) / (N * PROMPTS)
    assert data["accuracy"] == pytest.approx(accuracy, abs=1e-15)
    assert data["pass_at_k"][0] == pytest.approx(accuracy, abs=1e-12)
    exact = [float(sum(closed_form(N, c, k) for c in counts) / PROMPTS) for k in range(1, N + 1)]
    np.testing.assert_allclose(data["pass_at_k"], exact, rtol=1e-12, atol=1e-15)
    assert (np.diff(data["pass_at_k"]) >= 0).all()
    assert data["mean_distinct_correct"] == pytest.approx(
        sum(p["distinct_correct"] for p in data["prompts"]) / PROMPTS
    )
    assert f"pass@{N} {data['pass_at_k'][-1]:.4f}" in stdout


@pytest.mark.slow
def test_tool_plots_one_or_several_results(evaluated, cli, tmp_path):
    from PIL import Image

    out, data, _ = evaluated
    assert Image.open(out / "result.png").size == (800, 500)
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(data, pass_at_k=[v / 2 for v in data["pass_at_k"]])))
    png = tmp_path / "both.png"
    argv = ["plot", str(out / "result.json"), str(other), "--labels", "a,b", "--out", str(png)]
    assert cli([*argv, "--size", "6x4", "--dpi", "50"]) == 0
    assert Image.open(png).size == (300, 200)
    assert cli(["plot", str(other), "--labels", "a,b", "--out", str(png)]) == 1
