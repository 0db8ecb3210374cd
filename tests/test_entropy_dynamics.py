"""The entropy-change theorem, measured: predicted -Cov(log pi, dz) vs H_new - H_old."""

from __future__ import annotations

import pytest
import torch

from covrl.ops import (
    entropy_dynamics,
    log_prob_covariance,
    sampled_entropy_change,
    vocab_parallel_logprob_entropy,
)
from covrl.parallel import SINGLE_PROCESS
from tests.harness import launch

STATES, VOCAB, PADDED = 12, 45, 48  # PADDED: a multiple of 2 * 8 (TP=2, 8-column padding)
# One process holding all PADDED columns as real tokens (input checks only).
WHOLE_VOCAB = dict(tp_group=SINGLE_PROCESS, vocab_size=PADDED)


def _policy(seed: int, dtype=torch.float64):
    """Seeded old logits, per-action advantages ``[states, padded]`` (padding = junk)."""
    gen = torch.Generator().manual_seed(seed)
    z_old = 2.0 * torch.randn(STATES, PADDED, generator=gen, dtype=torch.float64)
    z_old[::3, 0] += 6.0  # a few near-deterministic states
    advantages = torch.randn(STATES, PADDED, generator=gen, dtype=torch.float64)
    z_old[:, VOCAB:] = 40.0  # padding must never matter
    advantages[:, VOCAB:] = 100.0
    return z_old.to(dtype), advantages.to(dtype)


def _reference(z_old, z_new, temperature: float):
    """Float64 covariance over the valid vocabulary and the exact entropy change."""
    x_old = z_old[:, :VOCAB].double() / temperature
    x_new = z_new[:, :VOCAB].double() / temperature
    logp_old, logp_new = x_old.log_softmax(-1), x_new.log_softmax(-1)
    p_old = logp_old.exp()
    dz = x_new - x_old
    centred_logp = logp_old - (p_old * logp_old).sum(-1, keepdim=True)
    centred_dz = dz - (p_old * dz).sum(-1, keepdim=True)
    cov = (p_old * centred_logp * centred_dz).sum(-1)
    h_old = -(p_old * logp_old).sum(-1)
    h_new = -(logp_new.exp() * logp_new).sum(-1)
    return cov, h_new - h_old, h_old


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_covariance_and_entropies_match_reference(dtype):
    z_old, advantages = _policy(0, dtype)
    z_new = (z_old.double() + 0.3 * advantages.double()).to(dtype)
    z_new[:, VOCAB:] = -50.0
    d = entropy_dynamics(
        z_old, z_new, tp_group=SINGLE_PROCESS, vocab_size=VOCAB, temperature=0.8, chunk_size=5
    )
    cov, measured, h_old = _reference(z_old, z_new, 0.8)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(d.covariance.double(), cov, atol=tol, rtol=tol)
    torch.testing.assert_close(d.predicted_change, -d.covariance)
    torch.testing.assert_close(d.measured_change.double(), measured, atol=tol, rtol=tol)
    torch.testing.assert_close(d.entropy_old.double(), h_old, atol=tol, rtol=tol)
    assert torch.allclose(d.mean_covariance, d.covariance.mean())
    assert torch.allclose(d.mean_measured_change, d.measured_change.mean())


def test_natural_gradient_step_first_order_with_quadratic_error():
    """z_new = z_old + eta * A: predicted -eta Cov(log pi, A), error O(eta^2)."""
    z_old, advantages = _policy(1)
    errors, predicted = [], []
    for eta in (0.04, 0.02, 0.01, 0.005):
        d = entropy_dynamics(
            z_old, z_old + eta * advantages, tp_group=SINGLE_PROCESS, vocab_size=VOCAB
        )
        # The exact change, independently of the code under test.
        _, measured, _ = _reference(z_old, z_old + eta * advantages, 1.0)
        torch.testing.assert_close(d.measured_change, measured, atol=1e-12, rtol=1e-10)
        errors.append((measured - d.predicted_change).norm())
        predicted.append(d.predicted_change.norm())
    errors, predicted = torch.stack(errors), torch.stack(predicted)
    # First order: the relative error is ~eta-sized (about 0.9 * eta here), ...
    relative = errors / predicted
    assert torch.all(relative < 1.5 * torch.tensor([0.04, 0.02, 0.01, 0.005], dtype=torch.float64))
    # ... and halving eta divides it by ~4 (second-order remainder).
    ratios = errors[:-1] / errors[1:]
    assert torch.all((ratios > 3.7) & (ratios < 4.3)), ratios
    # The prediction itself is linear in eta.
    torch.testing.assert_close(
        predicted[:-1] / predicted[1:], torch.full((3,), 2.0, dtype=torch.float64)
    )


def test_per_state_natural_pg_form_is_the_logit_change_covariance():
    z_old, advantages = _policy(2, torch.float32)
    eta = 0.05
    cov_a = log_prob_covariance(
        z_old, advantages, tp_group=SINGLE_PROCESS, vocab_size=VOCAB, temperature=1.3, chunk_size=7
    )
    # A logit change eta * A on raw logits is eta * A / T on the scaled ones.
    d = entropy_dynamics(
        z_old, z_old + eta * advantages, tp_group=SINGLE_PROCESS, vocab_size=VOCAB, temperature=1.3
    )
    torch.testing.assert_close(-eta * cov_a / 1.3, d.predicted_change, atol=1e-6, rtol=1e-4)


def test_sampled_token_form_estimates_the_exact_covariance():
    """One state: the batch covariance of sampled (logp, A) converges to Cov_{a~pi}."""
    z_old, advantages = _policy(3)
    state = 1
    gen = torch.Generator().manual_seed(3)
    probs = z_old[state, :VOCAB].softmax(-1)
    actions = torch.multinomial(probs, 200_000, replacement=True, generator=gen)
    logits = z_old[state].expand(actions.numel(), PADDED)
    logp, _ = vocab_parallel_logprob_entropy(
        logits, actions, tp_group=SINGLE_PROCESS, vocab_size=VOCAB, chunk_size=65536
    )
    adv = advantages[state, actions]
    eta = 0.1
    sampled = sampled_entropy_change(logp, adv, eta, group=SINGLE_PROCESS)
    exact = log_prob_covariance(
        z_old[state : state + 1],
        advantages[state : state + 1],
        tp_group=SINGLE_PROCESS,
        vocab_size=VOCAB,
    )
    stderr = sampled.token_covariance.std() / actions.numel() ** 0.5
    assert abs(sampled.covariance - exact[0]) < 4 * stderr
    assert abs(exact[0]) > 10 * stderr  # the test can tell a wrong sign or scale apart
    torch.testing.assert_close(sampled.predicted_change, -eta * sampled.covariance)


def test_sampled_token_form_with_mask_matches_formula():
    gen = torch.Generator().manual_seed(4)
    logp = -3 * torch.rand(4, 9, generator=gen, dtype=torch.float64)
    adv = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    mask = torch.rand(4, 9, generator=gen) > 0.3
    out = sampled_entropy_change(logp, adv, 0.5, mask, group=SINGLE_PROCESS)
    lv, av = logp[mask], adv[mask]
    cov = ((lv - lv.mean()) * (av - av.mean())).mean()
    torch.testing.assert_close(out.covariance, cov)
    torch.testing.assert_close(out.predicted_change, -0.5 * cov)
    assert int(out.num_tokens) == int(mask.sum())
    assert torch.all(out.token_covariance[~mask] == 0)


def test_bad_inputs():
    z_old, _ = _policy(5, torch.float32)
    with pytest.raises(ValueError, match="new_logits has shape"):
        entropy_dynamics(z_old, z_old[:, :10], **WHOLE_VOCAB)
    bad = z_old.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="new_logits has non-finite.*token 2"):
        entropy_dynamics(z_old, bad, **WHOLE_VOCAB)
    with pytest.raises(ValueError, match="old_logits has non-finite"):
        entropy_dynamics(bad, z_old, **WHOLE_VOCAB)
    with pytest.raises(ValueError, match="values has shape"):
        log_prob_covariance(z_old, z_old[:5], **WHOLE_VOCAB)


def _tp_body(ctx):
    """Each rank: its shard of the seeded policy; half of a token batch for the batch form."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    local = PADDED // ctx.tp
    cols = slice(rank * local, (rank + 1) * local)
    z_old, advantages = _policy(6, torch.float32)
    z_new = z_old + 0.03 * advantages
    d = entropy_dynamics(
        z_old[:, cols].contiguous(),
        z_new[:, cols].contiguous(),
        tp_group=group,
        vocab_size=VOCAB,
        temperature=0.9,
        chunk_size=5,
    )
    cov_a = log_prob_covariance(
        z_old[:, cols].contiguous(),
        advantages[:, cols].contiguous(),
        tp_group=group,
        vocab_size=VOCAB,
    )
    logp, adv = _token_batch()
    half = logp.shape[0] // ctx.tp
    rows = slice(rank * half, (rank + 1) * half)
    sampled = sampled_entropy_change(logp[rows], adv[rows], 0.2, group=group)
    return dict(dynamics=vars(d), cov_a=cov_a, sampled=sampled.covariance, count=sampled.num_tokens)


def _token_batch():
    gen = torch.Generator().manual_seed(7)
    return -4 * torch.rand(8, 5, generator=gen), torch.randn(8, 5, generator=gen)


def test_tp2_equals_tp1():
    results = launch(_tp_body, world_size=2, tp=2)
    z_old, advantages = _policy(6, torch.float32)
    z_new = z_old + 0.03 * advantages
    d1 = entropy_dynamics(
        z_old, z_new, tp_group=SINGLE_PROCESS, vocab_size=VOCAB, temperature=0.9, chunk_size=5
    )
    cov_a1 = log_prob_covariance(z_old, advantages, tp_group=SINGLE_PROCESS, vocab_size=VOCAB)
    logp, adv = _token_batch()
    sampled1 = sampled_entropy_change(logp, adv, 0.2, group=SINGLE_PROCESS)
    for res in results:
        for key, value in vars(d1).items():
            torch.testing.assert_close(res["dynamics"][key], value, atol=1e-6, rtol=1e-5, msg=key)
        torch.testing.assert_close(res["cov_a"], cov_a1, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(res["sampled"], sampled1.covariance, atol=1e-12, rtol=1e-9)
        assert int(res["count"]) == logp.numel()
    # Non-trivial: the states' covariances differ and are not all ~0.
    assert d1.covariance.abs().max() > 1e-2
