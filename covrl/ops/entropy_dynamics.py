"""Entropy dynamics of a softmax policy, measured on vocab-parallel logits.

Cui et al. (2025), "The Entropy Mechanism of RL for Reasoning LMs": for a softmax
policy ``pi(.|s) = softmax(z(s, .))`` one update changes the entropy at state ``s`` by

    H(pi_new | s) - H(pi_old | s)  ~=  -Cov_{a ~ pi_old(.|s)}( log pi_old(a|s),
                                                             z_new(s, a) - z_old(s, a) )

to first order in the logit change. Under natural policy gradient the logit change is
``eta * A(s, a)``, so the change is ``-eta * Cov_{a ~ pi}(log pi(a|s), A(s, a))``; over a
batch of sampled tokens the paper estimates it with the covariance of the sampled
tokens' log-probs and advantages.

This module measures both sides: the exact covariance over the whole (sharded)
vocabulary next to the measured entropy change, per state, with TP all-reduces of
per-state sums only; and the batch (sampled-token) form. With a temperature ``T`` the
policy is ``softmax(z / T)`` and the logit change is ``(z_new - z_old) / T``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from covrl.ops.token_covariance import covariance_means, token_covariance
from covrl.ops.vocab_parallel import VocabShard, load_scaled, softmax_stats, vocab_shard
from covrl.parallel.groups import Group, all_reduce

__all__ = [
    "EntropyDynamics",
    "SampledEntropyChange",
    "entropy_dynamics",
    "log_prob_covariance",
    "sampled_entropy_change",
]


@dataclass
class EntropyDynamics:
    """Predicted and measured entropy change per state (``[states]`` tensors).

    Attributes:
        covariance: ``Cov_{a~pi_old}(log pi_old(a), dz(a))`` with ``dz`` the change of
            the (temperature-scaled) logits, exact over the vocabulary.
        predicted_change: ``-covariance``, the first-order entropy change.
        measured_change: ``entropy_new - entropy_old``.
        entropy_old, entropy_new: ``H(pi_old | s)``, ``H(pi_new | s)``.
    """

    covariance: Tensor
    predicted_change: Tensor
    measured_change: Tensor
    entropy_old: Tensor
    entropy_new: Tensor

    @property
    def mean_covariance(self) -> Tensor:
        return self.covariance.mean()

    @property
    def mean_predicted_change(self) -> Tensor:
        return self.predicted_change.mean()

    @property
    def mean_measured_change(self) -> Tensor:
        return self.measured_change.mean()


def _covariance_with_logp(
    logits: Tensor,
    lse: Tensor,
    entropy: Tensor,
    values: Tensor,
    shard: VocabShard,
    *,
    subtract_logits: bool,
    values_scale: float,
) -> Tensor:
    """``Cov_{a~pi}(log pi(a), v(a))`` per state, summed over the TP group.

    With ``subtract_logits`` the values are ``values - logits`` (a logit change),
    formed chunk by chunk. Uses ``E_pi[log pi + H] = 0``:
    ``Cov = sum_a pi(a) (log pi(a) + H) v(a)``, which needs no mean of ``v``.

    Args:
        logits: ``[states, vocab/tp]`` the policy's raw logits.
        lse, entropy: ``[states]`` from :func:`softmax_stats` on ``logits``.
        values: ``[states, vocab/tp]`` in the same layout.

    Returns:
        ``[states]`` in the compute dtype. Peak extra memory: the working buffer,
        split into two halves.
    """
    num_states, num_valid = logits.shape[0], shard.num_valid
    dtype, device = lse.dtype, lse.device
    cov = torch.zeros(num_states, dtype=dtype, device=device)
    if num_valid > 0 and num_states > 0:
        centred_logp, weighted = shard.split_buffer(num_states, dtype, device)
        for rows in shard.chunks(num_states, centred_logp.shape[0]):
            n = rows.stop - rows.start
            lse_rows, ent_rows = lse[rows].unsqueeze(-1), entropy[rows].unsqueeze(-1)
            # log pi + H
            c = load_scaled(centred_logp[:n], logits[rows, :num_valid], shard.inv_temperature)
            c.sub_(lse_rows).add_(ent_rows)
            # v, upcast before subtracting so a half-precision difference is not rounded
            w = weighted[:n].copy_(values[rows, :num_valid])
            if subtract_logits:
                w.sub_(logits[rows, :num_valid])
            if values_scale != 1.0:
                w.mul_(values_scale)
            w.mul_(c)
            # pi = exp((log pi + H) - H)
            c.sub_(ent_rows).exp_()
            cov[rows] = c.mul_(w).sum(-1)
    all_reduce(cov, shard.group)
    return cov


def _check_same_layout(name: str, tensor: Tensor, ref_name: str, ref: Tensor) -> None:
    if tensor.shape != ref.shape:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)} "
            f"(the shape of {ref_name}, [states, vocab/tp])"
        )
    if ref.dim() != 2:
        raise ValueError(f"{ref_name} must be [states, vocab/tp], got {tuple(ref.shape)}")


def log_prob_covariance(
    logits: Tensor,
    values: Tensor,
    *,
    tp_group: Group,
    vocab_size: int,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Exact per-state ``Cov_{a ~ pi(.|s)}( log pi(a|s), values(s, a) )``.

    ``pi = softmax(logits / T)`` over the valid vocabulary. With ``values`` the
    advantages ``A(s, a)`` of every action this is the natural-PG entropy-change
    covariance (the entropy changes by about ``-eta`` times it).

    Args:
        logits: ``[states, vocab/tp]`` this rank's vocab-parallel shard.
        values: ``[states, vocab/tp]`` the same layout (padded columns ignored).
        tp_group, vocab_size, temperature, chunk_size: as in
            :func:`~covrl.ops.vocab_parallel.vocab_parallel_logprob_entropy`.

    Returns:
        ``[states]`` float32 (float64 for float64 logits), identical on all TP ranks.
    """
    _check_same_layout("values", values, "logits", logits)
    shard = vocab_shard(
        logits,
        tp_group=tp_group,
        vocab_size=vocab_size,
        temperature=temperature,
        chunk_size=chunk_size,
    )
    with torch.no_grad():
        lse, _, entropy = softmax_stats(logits, None, shard)
        return _covariance_with_logp(
            logits, lse, entropy, values, shard, subtract_logits=False, values_scale=1.0
        )


def entropy_dynamics(
    old_logits: Tensor,
    new_logits: Tensor,
    *,
    tp_group: Group,
    vocab_size: int,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> EntropyDynamics:
    """Predicted (``-Cov``) and measured entropy change between two parameter versions.

    Args:
        old_logits: ``[states, vocab/tp]`` logits of the sampled states before the
            update, this rank's vocab-parallel shard.
        new_logits: ``[states, vocab/tp]`` logits of the same states after it.
        tp_group, vocab_size, temperature, chunk_size: as in
            :func:`~covrl.ops.vocab_parallel.vocab_parallel_logprob_entropy`.

    Returns:
        :class:`EntropyDynamics` of ``[states]`` tensors, identical on all TP ranks.
        The logit change is ``(new_logits - old_logits) / T``, formed chunk by chunk in
        one ``[chunk_size, vocab/tp]`` float32 working buffer.
    """
    _check_same_layout("new_logits", new_logits, "old_logits", old_logits)
    options = dict(
        tp_group=tp_group, vocab_size=vocab_size, temperature=temperature, chunk_size=chunk_size
    )
    shard = vocab_shard(old_logits, name="old_logits", **options)
    vocab_shard(new_logits, name="new_logits", **options)
    with torch.no_grad():
        lse_old, _, entropy_old = softmax_stats(old_logits, None, shard, name="old_logits")
        _, _, entropy_new = softmax_stats(new_logits, None, shard, name="new_logits")
        cov = _covariance_with_logp(
            old_logits,
            lse_old,
            entropy_old,
            new_logits,
            shard,
            subtract_logits=True,
            values_scale=shard.inv_temperature,
        )
    return EntropyDynamics(
        covariance=cov,
        predicted_change=-cov,
        measured_change=entropy_new - entropy_old,
        entropy_old=entropy_old,
        entropy_new=entropy_new,
    )


@dataclass
class SampledEntropyChange:
    """The batch (sampled-token) form of the natural-PG entropy change.

    Attributes:
        token_covariance: per-token ``(logp_i - mean logp) (A_i - mean A)``, float64,
            0 at padding; the shape of ``logp``.
        covariance: the batch covariance, the mean of ``token_covariance`` over valid
            tokens (float64 scalar).
        predicted_change: ``-eta * covariance``.
        num_tokens: valid tokens in the batch (over the whole group).
    """

    token_covariance: Tensor
    covariance: Tensor
    predicted_change: Tensor
    num_tokens: Tensor


def sampled_entropy_change(
    logp: Tensor,
    advantages: Tensor,
    eta: float,
    mask: Tensor | None = None,
    *,
    group: Group,
) -> SampledEntropyChange:
    """``-eta * Cov(logp, A)`` over the batch of sampled tokens.

    The means are over every valid token of the batch on all ranks of ``group``
    (e.g. the data-parallel group), as in the paper's token covariance.

    Args:
        logp: ``[batch, seq]`` (any shape) log-probs of the sampled tokens, e.g. the
            first output of ``vocab_parallel_logprob_entropy``.
        advantages: same shape, the tokens' advantages.
        eta: the natural-PG step size (logit change ``eta * A``).
        mask: same shape, nonzero at valid tokens (default: all valid).
        group: ranks holding the rest of the batch (e.g. the data-parallel group), or
            :data:`covrl.parallel.SINGLE_PROCESS` when this process holds it all.
    """
    if mask is None:
        mask = torch.ones_like(logp, dtype=torch.bool)
    means = covariance_means([logp], [advantages], [mask], group)
    cov_tokens = token_covariance(logp, advantages, mask, means)
    total = cov_tokens.sum()
    all_reduce(total, group)
    covariance = total / means.num_tokens.clamp(min=1.0)
    return SampledEntropyChange(
        token_covariance=cov_tokens,
        covariance=covariance,
        predicted_change=-eta * covariance,
        num_tokens=means.num_tokens,
    )
