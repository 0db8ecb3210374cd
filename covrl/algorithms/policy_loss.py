"""Token-level policy losses: PPO (clip-higher, dual-clip), Clip-Cov, KL-Cov, and extras.

All per-token tensors are ``[b, s]`` with a response mask of the same shape. The
output's ``token_loss`` is 0 at padding and is reduced to a scalar by
:func:`covrl.algorithms.aggregation.aggregate_loss`. Padding values never reach the
loss or its gradient: inputs are zeroed there before any arithmetic.

With ``r = exp(logp - logp_old)`` (log-ratio clamped to ``+-log_ratio_clamp``):

* PPO: ``max(-A r, -A clip(r, 1 - low, 1 + high))``; with dual-clip, for ``A < 0``
  the result is also capped at ``-A c``.
* Clip-Cov: the PPO loss, with the selected tokens' terms set to 0 (no gradient; they
  still count in the aggregation's denominator).
* KL-Cov: ``-A r`` for every token (PPO surrogate if ``kl_cov.ppo_clip``), plus
  ``beta |logp - logp_old|`` on the selected tokens.
* Entropy bonus: ``- entropy_coeff * H``; reference KL: ``+ kl_coeff * kl(logp, ref)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from covrl.algorithms._common import as_bool_mask, check_finite, check_same_shape, masked
from covrl.algorithms.config import PolicyLossConfig


@dataclass
class PolicyLossOutput:
    """Per-token results of :func:`compute_policy_loss`; all ``[b, s]``.

    Attributes:
        token_loss: differentiable loss terms, 0 at padding.
        log_ratio: ``logp - logp_old`` (detached, unclamped, 0 at padding).
        clipped: PPO ratio clip active (gradient 0 through the ratio).
        dual_clipped: dual-clip active (``A < 0`` and ``-A r > -A c``).
        selected: tokens the entropy-control method acted on (all False for ``none``).
        mask: the bool response mask.
    """

    token_loss: torch.Tensor
    log_ratio: torch.Tensor
    clipped: torch.Tensor
    dual_clipped: torch.Tensor
    selected: torch.Tensor
    mask: torch.Tensor


def ppo_surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate with separate ranges and optional dual-clip.

    Returns ``(loss, clipped, dual_clipped)``, all shaped like ``ratio``. ``clipped``
    marks tokens whose ratio left ``[1 - low, 1 + high]`` in the direction the clip
    acts on (``A > 0`` above, ``A < 0`` below); ``dual_clipped`` marks ``A < 0``
    tokens capped at ``-A c``. Both have zero gradient through the ratio.
    """
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped
    if clip_ratio_c is None:
        return loss, clipped, torch.zeros_like(clipped)
    loss_dual = -advantages * clip_ratio_c
    negative = advantages < 0
    dual_clipped = negative & (loss_dual < loss)
    return torch.where(negative, torch.minimum(loss, loss_dual), loss), clipped, dual_clipped


def kl_penalty(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str, log_ratio_clamp: float = 20.0
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi.

    ``k1``: ``logp - ref``; ``abs``: ``|logp - ref|``; ``k2``: ``0.5 (logp - ref)^2``;
    ``k3``: ``exp(ref - logp) - (ref - logp) - 1`` (non-negative, unbiased, low
    variance; the exponent is clamped to ``+-log_ratio_clamp``).
    """
    diff = logp - ref_logp
    if estimator == "k1":
        return diff
    if estimator == "abs":
        return diff.abs()
    if estimator == "k2":
        return 0.5 * diff.square()
    if estimator == "k3":
        neg = (-diff).clamp(-log_ratio_clamp, log_ratio_clamp)
        return torch.exp(neg) - neg - 1.0
    raise ValueError(f"unknown kl estimator {estimator!r}; expected k1, abs, k2 or k3")


def compute_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: PolicyLossConfig,
    *,
    selected: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """Per-token policy loss of one micro-batch.

    Args:
        logp: ``[b, s]`` log-probs of the sampled tokens under the current parameters
            (requires grad).
        old_logp: ``[b, s]`` rollout-time log-probs.
        advantages: ``[b, s]`` per-token advantages (constants: no gradient flows to
            them, nor to ``old_logp``).
        mask: ``[b, s]`` response mask.
        config: loss configuration; ``config.entropy_control.method`` picks the method.
        selected: ``[b, s]`` bool selection of this micro-batch from
            :func:`covrl.algorithms.selection.prepare_selection` (required for
            ``clip_cov``/``kl_cov``, must be None for ``none``).
        entropy: ``[b, s]`` per-token policy entropy (required if ``entropy_coeff``).
        ref_logp: ``[b, s]`` reference-policy log-probs (required if ``kl_coeff``).

    Raises:
        ValueError: with ``config.check_finite``, if an input that enters the loss has
            NaN/inf at a valid position, naming the tensor (padding may hold anything).
    """
    method = config.entropy_control.method
    check_same_shape(
        "logp",
        logp,
        old_logp=old_logp,
        advantages=advantages,
        mask=mask,
        selected=selected,
        entropy=entropy,
        ref_logp=ref_logp,
    )
    if method == "none" and selected is not None:
        raise ValueError("a selection mask was passed but entropy_control.method is 'none'")
    if method != "none" and selected is None:
        raise ValueError(f"entropy_control.method={method!r} needs the selection mask")
    if config.entropy_coeff != 0.0 and entropy is None:
        raise ValueError(f"entropy_coeff={config.entropy_coeff} needs the entropy tensor")
    if config.kl_coeff != 0.0 and ref_logp is None:
        raise ValueError(f"kl_coeff={config.kl_coeff} needs ref_logp")

    m = as_bool_mask(mask)
    raw = dict(logp=logp, old_logp=old_logp, advantages=advantages)
    if config.entropy_coeff != 0.0:
        raw["entropy"] = entropy
    if config.kl_coeff != 0.0:
        raw["ref_logp"] = ref_logp
    logp = masked(logp, m)
    with torch.no_grad():
        old_logp = masked(old_logp, m)
        advantages = masked(advantages, m)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio.clamp(-config.log_ratio_clamp, config.log_ratio_clamp))
    # The only differentiable path of the surrogate: every other token's term is a
    # constant (clipped ratio, dual-clip cap, Clip-Cov stop-gradient, padding).
    surrogate = -advantages * ratio

    # Values and flags of the full loss, without autograd; ``live`` marks the tokens
    # whose term is ``surrogate`` (with the same value bits) and carries its gradient.
    with torch.no_grad():
        if method == "kl_cov" and not config.entropy_control.kl_cov.ppo_clip:
            value = surrogate.detach()
            clipped = torch.zeros_like(m)
            dual_clipped = torch.zeros_like(m)
        else:
            value, clipped, dual_clipped = ppo_surrogate(
                ratio.detach(),
                advantages,
                config.clip_ratio_low,
                config.clip_ratio_high,
                config.clip_ratio_c,
            )
        sel = torch.zeros_like(m) if selected is None else (as_bool_mask(selected) & m)
        frozen = clipped | dual_clipped
        if method == "clip_cov":
            frozen = frozen | sel
            value = torch.where(sel, 0.0, value)
        value = masked(value, m)
        live = m & ~frozen
    loss = torch.where(live, surrogate, value)

    if method == "kl_cov":
        # beta |log_ratio| as (beta sign(log_ratio)) log_ratio: the same value and
        # gradient bits (sign is +-1 or 0), one differentiable op instead of three.
        with torch.no_grad():
            beta_sign = torch.where(sel, config.entropy_control.kl_cov.beta, 0.0)
            beta_sign = beta_sign * torch.sign(log_ratio.detach())
        loss = loss + beta_sign * log_ratio

    if config.entropy_coeff != 0.0:
        loss = loss - config.entropy_coeff * masked(entropy, m)
    sums = [log_ratio.detach().sum(dtype=torch.float64)]
    if config.kl_coeff != 0.0:
        ref_logp = masked(ref_logp, m)
        sums.append(ref_logp.detach().sum(dtype=torch.float64))  # k3 clamps: check ref
        kl = kl_penalty(logp, ref_logp, config.kl_estimator, config.log_ratio_clamp)
        loss = loss + config.kl_coeff * kl

    if config.check_finite:
        # NaN/inf in any input that enters the loss makes one of these sums non-finite
        # (log_ratio is unclamped): a few reductions and one host sync in the common
        # case, the per-tensor diagnosis only on failure.
        total = sum(sums, loss.detach().sum(dtype=torch.float64))
        if not math.isfinite(total.item()):
            check_finite(m, **raw)
            raise ValueError("non-finite policy loss terms at valid positions")
    return PolicyLossOutput(
        token_loss=loss,
        log_ratio=log_ratio.detach(),
        clipped=clipped & m,
        dual_clipped=dual_clipped & m,
        selected=sel,
        mask=m,
    )
