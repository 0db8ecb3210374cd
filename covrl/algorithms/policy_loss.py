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
* Rollout correction: with truncated importance weights ``w`` (rollout engine vs
  trainer), the terms above are multiplied by ``w`` per token.
* Entropy bonus: ``- entropy_coeff * H``; reference KL: ``+ kl_coeff * kl(logp, ref)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from covrl.algorithms.config import PolicyLossConfig
from covrl.ops.masking import as_bool_mask, check_finite, check_same_shape, masked


@dataclass
class PolicyLossOutput:
    """Per-token results of :func:`compute_policy_loss`; all ``[b, s]``.

    Attributes:
        token_loss: differentiable loss terms, 0 at padding.
        log_ratio: ``logp - logp_old`` (detached, unclamped, 0 at padding).
        clipped: PPO ratio clip active (gradient 0 through the ratio).
        dual_clipped: dual-clip active (``A < 0`` and ``-A r > -A c``).
        mask: the bool response mask.
    """

    token_loss: torch.Tensor
    log_ratio: torch.Tensor
    clipped: torch.Tensor
    dual_clipped: torch.Tensor
    mask: torch.Tensor


def ppo_surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float | None,
    *,
    neg_adv: torch.Tensor | None = None,
    loss_unclipped: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate with separate ranges and optional dual-clip.

    ``neg_adv`` (``-advantages``) and ``loss_unclipped`` (``-advantages * ratio``) may
    be passed when the caller has them already.

    Returns ``(loss, clipped, dual_clipped)``, all shaped like ``ratio``. ``clipped``
    marks tokens whose ratio left ``[1 - low, 1 + high]`` in the direction the clip
    acts on (``A > 0`` above, ``A < 0`` below); ``dual_clipped`` marks ``A < 0``
    tokens capped at ``-A c``. Both have zero gradient through the ratio.
    """
    if neg_adv is None:
        neg_adv = -advantages
    if loss_unclipped is None:
        loss_unclipped = neg_adv * ratio
    loss_clipped = neg_adv * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped
    if clip_ratio_c is None:
        return loss, clipped, torch.zeros_like(clipped)
    loss_dual = neg_adv * clip_ratio_c
    dual_clipped = (advantages < 0) & (loss_dual < loss)
    return torch.where(dual_clipped, loss_dual, loss), clipped, dual_clipped


@dataclass(frozen=True)
class SurrogateParams:
    """The scalars of :class:`SurrogateLoss`, from a :class:`PolicyLossConfig`.

    Attributes:
        clip_ratio_low, clip_ratio_high, clip_ratio_c: PPO clip ranges and dual-clip
            (None: no PPO clip at all when ``ppo_clip`` is False).
        ppo_clip: use the PPO surrogate (False: plain ``-A r``, KL-Cov's default).
        log_ratio_clamp: bound on ``|logp - logp_old|`` inside ``exp``.
        stop_selected: Clip-Cov: selected terms are 0 with no gradient.
        kl_beta: KL-Cov: ``beta`` of the ``beta |logp - logp_old|`` term on selected
            tokens (None: no term).
    """

    clip_ratio_low: float
    clip_ratio_high: float
    clip_ratio_c: float | None
    ppo_clip: bool
    log_ratio_clamp: float
    stop_selected: bool
    kl_beta: float | None

    @classmethod
    def from_config(cls, config: PolicyLossConfig) -> SurrogateParams:
        ec = config.entropy_control
        low, high = config.clip_range
        return cls(
            clip_ratio_low=low,
            clip_ratio_high=high,
            clip_ratio_c=config.clip_ratio_c,
            ppo_clip=not (ec.method == "kl_cov" and not ec.kl_cov.ppo_clip),
            log_ratio_clamp=config.log_ratio_clamp,
            stop_selected=ec.method == "clip_cov",
            kl_beta=ec.kl_cov.beta if ec.method == "kl_cov" else None,
        )


class SurrogateLoss(torch.autograd.Function):
    """Token loss of the PPO / Clip-Cov / KL-Cov surrogate as one autograd node.

    With ``lr = logp - logp_old`` and ``r = exp(clamp(lr, +-log_ratio_clamp))``, a
    token's term is the PPO surrogate (or ``-A r``), 0 for Clip-Cov's selected tokens,
    plus ``beta |lr|`` for KL-Cov's. Its derivative wrt ``logp`` is closed form:
    ``-A r`` where the term is the unclipped surrogate and the clamp is inactive,
    plus ``beta sign(lr)`` on KL-Cov's selected tokens, 0 elsewhere (clips, dual-clip,
    Clip-Cov stop-gradient, padding). The forward stores that derivative; the backward
    is one multiply.

    Inputs: ``logp`` ``[b, s]`` (the only differentiable input), ``old_logp`` and
    ``advantages`` ``[b, s]``, bool ``mask`` and ``selected`` ``[b, s]`` (``selected``
    within ``mask``), :class:`SurrogateParams`. Padding may hold anything (NaN
    included): it never reaches the outputs.

    Outputs (all ``[b, s]``, 0 / False at padding): the token loss, the unclamped
    ``lr`` (no gradient), and the bool ``clipped`` / ``dual_clipped`` flags.
    """

    @staticmethod
    def forward(ctx, logp, old_logp, advantages, mask, selected, params: SurrogateParams):
        logp = logp.detach()
        log_ratio = logp - old_logp
        clamped = log_ratio.clamp(-params.log_ratio_clamp, params.log_ratio_clamp)
        ratio = torch.exp(clamped)
        neg_adv = -advantages
        surrogate = neg_adv * ratio
        if params.ppo_clip:
            value, clipped, dual_clipped = ppo_surrogate(
                ratio,
                advantages,
                params.clip_ratio_low,
                params.clip_ratio_high,
                params.clip_ratio_c,
                neg_adv=neg_adv,
                loss_unclipped=surrogate,
            )
            clipped = clipped & mask
            dual_clipped = dual_clipped & mask
        else:
            value = surrogate
            clipped = dual_clipped = torch.zeros_like(mask)
        # Terms kept in the loss: valid, and not stopped by Clip-Cov.
        keep = mask & ~selected if params.stop_selected else mask
        # The gradient -A r flows exactly where a kept term is the unclipped surrogate
        # (a clip or dual-clip makes it differ) and the clamp is inactive.
        live = keep & (clamped == log_ratio)
        if value is not surrogate:
            live = live & (value == surrogate)
        grad = masked(surrogate, live)
        log_ratio = masked(log_ratio, mask)
        if params.kl_beta is not None:
            # beta |lr| as (beta sign(lr)) lr: the same bits (sign is +-1 or 0).
            beta_sign = torch.where(selected, torch.sign(log_ratio), 0.0).mul_(params.kl_beta)
            value = value + beta_sign * log_ratio
            grad = grad.add_(beta_sign)
        value = masked(value, keep)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(log_ratio, clipped, dual_clipped)
        return value, log_ratio, clipped, dual_clipped

    @staticmethod
    def backward(ctx, grad_loss, *_):
        (grad,) = ctx.saved_tensors
        return grad_loss * grad, None, None, None, None, None


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
    *,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: PolicyLossConfig,
    selected: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    rollout_weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """Per-token policy loss of one micro-batch.

    Every argument after ``logp`` is keyword-only: the per-token inputs are
    same-shaped float tensors, and a positional swap would pass unnoticed.

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
        rollout_weights: ``[b, s]`` per-token importance weights correcting for the
            rollout engine's sampling distribution (e.g. truncated
            ``min(exp(old_logp - rollout_logp), C)``); they multiply the surrogate term
            (PPO / Clip-Cov / KL-Cov), not the entropy bonus or the reference KL.

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
        rollout_weights=rollout_weights,
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
    if rollout_weights is not None:
        raw["rollout_weights"] = rollout_weights
    sel = torch.zeros_like(m) if selected is None else (as_bool_mask(selected) & m)
    loss, log_ratio, clipped, dual_clipped = SurrogateLoss.apply(
        logp, old_logp, advantages, m, sel, SurrogateParams.from_config(config)
    )
    check_sum = log_ratio.sum()
    if rollout_weights is not None:
        weights = masked(rollout_weights.detach(), m)
        check_sum = check_sum + weights.sum()
        loss = loss * weights

    if config.entropy_coeff != 0.0:
        loss = loss - config.entropy_coeff * masked(entropy, m)
    if config.kl_coeff != 0.0:
        ref_logp = masked(ref_logp, m)
        check_sum = check_sum + ref_logp.detach().sum()  # k3 clamps: check ref
        kl = kl_penalty(masked(logp, m), ref_logp, config.kl_estimator, config.log_ratio_clamp)
        loss = loss + config.kl_coeff * kl

    if config.check_finite:
        check_sum = check_sum + loss.detach().sum()
        # NaN/inf in any input that enters the loss makes this float32 sum non-finite
        # (log_ratio is unclamped): a sum and a scalar read in the common case. A
        # finite sum that overflowed is a false alarm that the exact per-tensor
        # diagnosis clears.
        if not math.isfinite(check_sum.item()):
            check_finite(m, **raw)
            terms = torch.stack([loss.detach()[m], log_ratio[m]])
            if not bool(torch.isfinite(terms).all()):
                raise ValueError("non-finite policy loss terms at valid positions")
    return PolicyLossOutput(
        token_loss=loss,
        log_ratio=log_ratio,
        clipped=clipped,
        dual_clipped=dual_clipped,
        mask=m,
    )
