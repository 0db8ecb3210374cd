"""Advantage estimators and DAPO dynamic sampling against plain-Python float64 references."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from covrl.algorithms import (
    AdvantageConfig,
    broadcast_to_tokens,
    compute_advantages,
    dynamic_sampling_filter,
    grpo_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)


def _groups(rewards, labels):
    out = {}
    for i, g in enumerate(labels):
        out.setdefault(g, []).append(i)
    return out


def _ref_grpo(rewards, labels, norm_by_std, eps):
    adv = [0.0] * len(rewards)
    for idx in _groups(rewards, labels).values():
        if len(idx) < 2:
            continue
        rs = [rewards[i] for i in idx]
        mu, sd = statistics.fmean(rs), statistics.stdev(rs)
        for i in idx:
            adv[i] = (rewards[i] - mu) / (sd + eps) if norm_by_std else rewards[i] - mu
    return adv


def _ref_rloo(rewards, labels):
    adv = [0.0] * len(rewards)
    for idx in _groups(rewards, labels).values():
        if len(idx) < 2:
            continue
        for i in idx:
            others = [rewards[j] for j in idx if j != i]
            adv[i] = rewards[i] - sum(others) / len(others)
    return adv


rewards_and_labels = st.integers(1, 24).flatmap(
    lambda n: st.tuples(
        st.lists(
            st.one_of(st.sampled_from([0.0, 1.0]), st.floats(-5, 5, width=32)),
            min_size=n,
            max_size=n,
        ),
        st.lists(st.integers(-3, 6), min_size=n, max_size=n),
    )
)


@settings(max_examples=60, deadline=None)
@given(rewards_and_labels, st.booleans())
def test_grpo_matches_reference(data, norm_by_std):
    rewards, labels = data
    got = grpo_advantages(
        torch.tensor(rewards, dtype=torch.float64),
        torch.tensor(labels),
        norm_by_std=norm_by_std,
        eps=1e-6,
    )
    ref = _ref_grpo(rewards, labels, norm_by_std, 1e-6)
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(rewards_and_labels)
def test_rloo_matches_reference(data):
    rewards, labels = data
    got = rloo_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(labels))
    ref = _ref_rloo(rewards, labels)
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_grpo_binary_group_values_and_dtype():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = grpo_advantages(r, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    assert adv.dtype == torch.float32
    # mean 0.25, unbiased std 0.5: +1.5 for the correct answer, -0.5 for the others.
    torch.testing.assert_close(adv[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-5, rtol=0)
    assert (adv[4:] == 0).all()  # all-equal group: zero advantage, no division by 0


def _ref_rpp(rewards, labels, lengths, eps):
    base = [0.0] * len(rewards)
    for idx in _groups(rewards, labels).values():
        if len(idx) > 1:
            mu = statistics.fmean(rewards[i] for i in idx)
            for i in idx:
                base[i] = rewards[i] - mu
    tokens = [base[i] for i, n in enumerate(lengths) for _ in range(n)]
    mu = statistics.fmean(tokens)
    var = statistics.variance(tokens)
    return [[(base[i] - mu) / math.sqrt(var + eps)] * n for i, n in enumerate(lengths)]


def test_reinforce_pp_baseline_matches_reference():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (12,), generator=g).double()
    rewards[5] = 0.5
    labels = torch.arange(12) // 3
    lengths = torch.randint(0, 9, (12,), generator=g).tolist()
    lengths[0] = 8
    mask = torch.zeros(12, 8, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    got = reinforce_pp_baseline_advantages(rewards, labels, mask, eps=1e-8)
    ref = _ref_rpp(rewards.tolist(), labels.tolist(), lengths, 1e-8)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(got[i, :n], torch.tensor(ref[i], dtype=torch.float64))
        assert (got[i, n:] == 0).all()
    # Token-weighted whitening: zero mean, unit (unbiased) variance over valid tokens.
    assert got[mask].mean().item() == pytest.approx(0.0, abs=1e-12)
    assert got[mask].var().item() == pytest.approx(1.0, rel=1e-6)


def test_broadcast_to_tokens():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1]])
    out = broadcast_to_tokens(torch.tensor([2.0, 3.0, -1.0]), mask)
    assert torch.equal(out, torch.tensor([[2.0, 2.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.0, -1.0]]))
    with pytest.raises(ValueError, match="values"):
        broadcast_to_tokens(torch.ones(2), mask)


def test_compute_advantages_dispatch():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[2, 3] = False
    for est in ("grpo", "rloo"):
        got = compute_advantages(r, labels, mask, AdvantageConfig(estimator=est))
        fn = grpo_advantages if est == "grpo" else rloo_advantages
        assert torch.equal(got, broadcast_to_tokens(fn(r, labels), mask))
    got = compute_advantages(r, labels, mask, AdvantageConfig(estimator="reinforce_pp_baseline"))
    assert torch.equal(got, reinforce_pp_baseline_advantages(r, labels, mask, eps=1e-6))
    got = compute_advantages(r, labels, mask, AdvantageConfig(norm_by_std=False))
    assert torch.equal(
        got, broadcast_to_tokens(grpo_advantages(r, labels, norm_by_std=False), mask)
    )


@settings(max_examples=60, deadline=None)
@given(rewards_and_labels)
def test_dynamic_sampling_filter_matches_reference(data):
    rewards, labels = data
    res = dynamic_sampling_filter(torch.tensor(rewards), torch.tensor(labels))
    groups = _groups(rewards, labels)
    kept_groups = [idx for idx in groups.values() if len({rewards[i] for i in idx}) > 1]
    kept = sorted(i for idx in kept_groups for i in idx)
    assert res.kept_indices.tolist() == kept
    assert (res.num_groups, res.num_kept_groups, res.num_kept) == (
        len(groups),
        len(kept_groups),
        len(kept),
    )


def test_non_finite_rewards_rejected():
    with pytest.raises(ValueError, match="rewards"):
        grpo_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="group_index"):
        grpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0, 1]))
