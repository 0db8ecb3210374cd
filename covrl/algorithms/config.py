"""Typed configuration of the policy losses, covariance-based entropy control and advantages.

Defaults follow the paper (Cui et al., 2025, "The Entropy Mechanism of Reinforcement
Learning for Reasoning Language Models"): Clip-Cov r=2e-4, omega=(1, 5); KL-Cov
k=2e-3, beta=1 (the public implementation defaults beta to 0.1, which is not the
paper's value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal, get_args

EntropyControlMethod = Literal["none", "clip_cov", "kl_cov"]
SelectionScope = Literal["minibatch", "microbatch"]
CovLogprobSource = Literal["current", "old"]
LossAggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
KLEstimator = Literal["k1", "abs", "k2", "k3"]
AdvantageEstimator = Literal["grpo", "rloo", "reinforce_pp_baseline"]
TargetSchedule = Literal["constant", "linear", "cosine"]
TargetKnob = Literal["ratio", "beta"]

LOSS_AGG_MODES: tuple[str, ...] = get_args(LossAggMode)
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)


def selection_count(ratio: float, num_tokens: int) -> int:
    """How many of a scope's ``N`` tokens a ratio selects: ``max(1, floor(ratio * N))``
    for ``N > 0``, else 0.

    The product is taken on the decimal value of ``ratio`` (exactly, so ``0.29 * 100``
    is 29). The public implementation's ``int(ratio * N)`` rounds the binary product
    and is one token short for some N (28 there). Both methods' counts and the
    covariance summary's top fractions use this rule.
    """
    if num_tokens <= 0:
        return 0
    return max(1, int(Fraction(repr(float(ratio))) * num_tokens))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


def _check_positive(name: str, value: float | None, what: str) -> None:
    if value is None or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value} must be finite and > 0 ({what})")


@dataclass
class ClipCovConfig:
    """Clip-Cov: stop the gradient of a few random tokens inside a covariance band.

    ``max(1, floor(ratio * N))`` tokens are drawn uniformly without replacement from the
    scope's valid, not PPO-clipped tokens with ``omega_low < cov < omega_high``
    (N = valid tokens of the scope). The paper's runs pair Clip-Cov with a PPO clip
    range of 1 on both sides, which is what ``PolicyLossConfig`` uses for Clip-Cov
    unless ``clip_ratio_low/high`` are set.
    """

    ratio: float = 2e-4
    omega_low: float = 1.0
    omega_high: float = 5.0

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"clip_cov.ratio={self.ratio} must be in (0, 1]")
        if not self.omega_low < self.omega_high:
            raise ValueError(
                f"clip_cov.omega_low={self.omega_low} must be < "
                f"clip_cov.omega_high={self.omega_high}"
            )


@dataclass
class KLCovConfig:
    """KL-Cov: add ``beta * |logp - logp_old|`` to the top-covariance tokens.

    ``max(1, floor(ratio * N))`` tokens with the largest covariance are penalised.
    As in the paper, the surrogate of every token is the unclipped ``-A * ratio``;
    ``ppo_clip=True`` uses the PPO clipped surrogate (with dual-clip if configured)
    for all tokens instead, the penalty still added on the selected ones.
    """

    ratio: float = 2e-3
    beta: float = 1.0
    ppo_clip: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"kl_cov.ratio={self.ratio} must be in (0, 1]")
        if self.beta < 0:
            raise ValueError(f"kl_cov.beta={self.beta} must be >= 0")


# Default knob bounds: the paper's settings (r = 2e-4, k = 2e-3 / 2e-4, beta = 1) and the
# tiny task's (k = 0.2, beta up to 5) lie well inside, with decades of room either side.
_KNOB_BOUNDS: dict[str, tuple[float, float]] = {"ratio": (1e-5, 0.5), "beta": (1e-2, 100.0)}


@dataclass
class EntropyTargetConfig:
    """A target for the rollout entropy (nats per token), held by a feedback controller
    (:class:`covrl.algorithms.entropy_target.EntropyTargetController`) that sets the
    entropy-control method's knob once per step.

    Target:
        ``schedule="constant"`` (default): ``value`` at every step.
        ``"linear"`` / ``"cosine"``: from ``start`` at step 1 to ``end`` at step
        ``1 + steps``, ``end`` after. With ``p = min((step - 1) / steps, 1)``, linear is
        ``start + (end - start) p`` and cosine ``end + (start - end) (1 + cos(pi p)) / 2``.
    Knob:
        ``"ratio"``: the fraction of tokens selected (Clip-Cov's ``clip_cov.ratio`` or
        KL-Cov's ``kl_cov.ratio``, by ``entropy_control.method``); more selected tokens
        keep more entropy. ``"beta"``: KL-Cov's ``kl_cov.beta``; a larger pull keeps more.
        The method's configured value is the controller's starting knob.
        ``knob_min``/``knob_max``: the knob's bounds (None: 1e-5 / 0.5 for ``ratio``,
        1e-2 / 100 for ``beta``); ``0 < knob_min < knob_max``, and ``knob_max <= 1``
        for a ratio.
    Controller (PI in log space of the knob on the error normalised by the target; the
    law is in :mod:`covrl.algorithms.entropy_target`):
        ``kp``: proportional gain, ``ki``: integral gain, both in e-folds of the knob per
        unit of relative error. The defaults were chosen on simulated plants
        (docs/entropy_control.md): where one e-fold of the knob changes ``log H`` by
        0.01-0.05 per step (the tiny task's KL-Cov sweep measures 0.003-0.015), a step
        of target settles within 10% in 3-52 steps with at most 11% overshoot, also
        against an entropy-collapse drift. The loop is well damped while that
        sensitivity stays below about ``1 / kp`` (0.12 per step) and oscillates above
        about ``1.8 / kp``: halve ``kp`` if the knob and the entropy alternate step to
        step, raise it if the approach is slow.
    """

    value: float | None = None
    schedule: TargetSchedule = "constant"
    start: float | None = None
    end: float | None = None
    steps: int | None = None
    knob: TargetKnob = "ratio"
    knob_min: float | None = None
    knob_max: float | None = None
    kp: float = 8.0
    ki: float = 0.3

    def __post_init__(self) -> None:
        _check_choice("target.schedule", self.schedule, get_args(TargetSchedule))
        _check_choice("target.knob", self.knob, get_args(TargetKnob))
        if self.schedule == "constant":
            _check_positive("target.value", self.value, "a constant target in nats per token")
            for name in ("start", "end", "steps"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"target.{name}={getattr(self, name)} is only used by a linear or "
                        "cosine schedule; a constant target takes target.value"
                    )
        else:
            if self.value is not None:
                raise ValueError(
                    f"target.value={self.value}: a {self.schedule} schedule takes "
                    "target.start, target.end and target.steps instead"
                )
            _check_positive("target.start", self.start, "the target at step 1 (nats per token)")
            _check_positive("target.end", self.end, "the target after the schedule")
            if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
                raise ValueError(
                    f"target.steps={self.steps!r} must be an integer >= 1 (the schedule's length)"
                )
        lo, hi = self.knob_bounds
        for name, v in (("knob_min", lo), ("knob_max", hi)):
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"target.{name}={v} must be finite and > 0")
        if not lo < hi:
            raise ValueError(f"target.knob_min={lo} must be < target.knob_max={hi}")
        if self.knob == "ratio" and hi > 1.0:
            raise ValueError(f"target.knob_max={hi} must be <= 1 for the ratio knob")
        for name in ("kp", "ki"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"target.{name}={v} must be finite and >= 0")
        if self.ki == 0 and self.kp == 0:
            raise ValueError("target.kp=0 and target.ki=0: the controller would never move")

    @property
    def knob_bounds(self) -> tuple[float, float]:
        """``(knob_min, knob_max)`` in effect (the set values, else the knob's defaults)."""
        lo, hi = _KNOB_BOUNDS[self.knob]
        return (
            lo if self.knob_min is None else float(self.knob_min),
            hi if self.knob_max is None else float(self.knob_max),
        )

    def target_at(self, step: int) -> float:
        """The target (nats per token) at trainer step ``step`` (1-based)."""
        if self.schedule == "constant":
            return float(self.value)
        p = min(max(step - 1, 0) / self.steps, 1.0)
        if self.schedule == "linear":
            return self.start + (self.end - self.start) * p
        return self.end + (self.start - self.end) * (1.0 + math.cos(math.pi * p)) / 2.0


@dataclass
class EntropyControlConfig:
    """Which covariance method to apply, over which scope, on which log-probs.

    ``scope``:
        ``"minibatch"`` (default): covariance means and the selection run over the
        whole optimizer mini-batch: every micro-batch on every rank of the group passed
        to the selection pass. The selected set does not depend on the micro-batch
        split or on the data-parallel size.
        ``"microbatch"``: each micro-batch on each rank selects on its own, with its own
        means and its own ``max(1, ...)`` count (the public implementation's behaviour,
        kept for comparison studies).
    ``logp_source``:
        ``"current"`` (the paper's definition): covariance of the current parameters'
        log-probs. Needs a no-grad forward of the mini-batch before its gradient
        micro-batches (about one third of the update's forward+backward compute).
        ``"old"``: the rollout-time log-probs, no extra forward. Clip-Cov's
        "not PPO-clipped" filter then sees ratio = 1 and excludes nothing.
    ``seed``: with the optimizer step, fixes Clip-Cov's random draw.
    ``covariance_summary``: also compute the covariance summary (the paper's Table 1:
        mean and top-fraction means, ``cov/*`` metrics) in the selection pass (eight
        small all-reduces).
    ``target``: an entropy target held by feedback on the method's ratio or beta
        (:class:`EntropyTargetConfig`); None (default): the knob stays as configured.
    """

    method: EntropyControlMethod = "none"
    scope: SelectionScope = "minibatch"
    logp_source: CovLogprobSource = "current"
    seed: int = 0
    clip_cov: ClipCovConfig = field(default_factory=ClipCovConfig)
    kl_cov: KLCovConfig = field(default_factory=KLCovConfig)
    covariance_summary: bool = True
    # Fractions of the scope's tokens whose mean covariance is reported (paper, Table 1).
    cov_top_fractions: tuple[float, ...] = (2e-4, 2e-3, 2e-2, 2e-1, 5e-1)
    target: EntropyTargetConfig | None = None

    def __post_init__(self) -> None:
        _check_choice("entropy_control.method", self.method, get_args(EntropyControlMethod))
        _check_choice("entropy_control.scope", self.scope, get_args(SelectionScope))
        _check_choice("entropy_control.logp_source", self.logp_source, get_args(CovLogprobSource))
        for f in self.cov_top_fractions:
            if not 0.0 < f <= 1.0:
                raise ValueError(f"entropy_control.cov_top_fractions entry {f} not in (0, 1]")
        if self.target is not None:
            section, name = self.target_knob
            start = getattr(getattr(self, section), name)
            lo, hi = self.target.knob_bounds
            if not lo <= start <= hi:
                raise ValueError(
                    f"entropy_control.{section}.{name}={start} is the entropy target's "
                    f"starting knob and must lie within target.knob_min={lo} .. "
                    f"target.knob_max={hi}"
                )

    @property
    def target_knob(self) -> tuple[str, str]:
        """``(section, field)`` of the knob the entropy target drives, e.g.
        ``("kl_cov", "beta")``; ValueError when ``target`` is None or does not fit the
        method."""
        if self.target is None:
            raise ValueError("entropy_control.target is None: no knob is driven")
        if self.method == "none":
            raise ValueError(
                "entropy_control.target needs entropy_control.method clip_cov or kl_cov "
                "(method='none' has no knob to drive)"
            )
        if self.target.knob == "beta":
            if self.method != "kl_cov":
                raise ValueError(
                    f"entropy_control.target.knob='beta' drives KL-Cov's beta, but "
                    f"entropy_control.method={self.method!r} (use knob='ratio')"
                )
            return ("kl_cov", "beta")
        return (self.method, "ratio")

    @property
    def selection_ratio(self) -> float:
        """The fraction of the scope's tokens the method selects (0 for ``none``)."""
        if self.method == "clip_cov":
            return self.clip_cov.ratio
        if self.method == "kl_cov":
            return self.kl_cov.ratio
        return 0.0


@dataclass
class PolicyLossConfig:
    """Token-level policy loss and its aggregation.

    ``clip_ratio_low/high``: PPO ratio clip range ``[1 - low, 1 + high]``; a larger
        ``high`` is "clip-higher" (DAPO uses 0.2 / 0.28). None (default): the method's
        recipe, :attr:`clip_range`: 1 / 1 for Clip-Cov (the paper's setting), 0.2 / 0.2
        otherwise. So ``method="clip_cov"`` alone is the paper's Clip-Cov.
    ``clip_ratio_c``: dual-clip bound (> 1) for negative advantages; None disables it.
    ``entropy_coeff``: entropy bonus; ``coeff * entropy`` is subtracted per token.
    ``kl_coeff``/``kl_estimator``: penalty toward a reference policy, added per token.
    ``loss_agg_mode``/``loss_norm_constant``: see :mod:`covrl.algorithms.aggregation`.
    ``check_finite``: reject NaN/inf at valid positions (one host sync per call).
    """

    clip_ratio_low: float | None = None
    clip_ratio_high: float | None = None
    clip_ratio_c: float | None = 3.0
    entropy_coeff: float = 0.0
    kl_coeff: float = 0.0
    kl_estimator: KLEstimator = "k3"
    loss_agg_mode: LossAggMode = "token-mean"
    loss_norm_constant: float | None = None
    # log(ratio) is clamped to +-this before exp, so a far off-policy token cannot overflow.
    log_ratio_clamp: float = 20.0
    entropy_control: EntropyControlConfig = field(default_factory=EntropyControlConfig)
    check_finite: bool = True

    def __post_init__(self) -> None:
        for name in ("clip_ratio_low", "clip_ratio_high"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name}={value} must be >= 0 (or None: the method's recipe)")
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c={self.clip_ratio_c} must be > 1 (or None)")
        _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _check_choice("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        if self.loss_norm_constant is not None and self.loss_norm_constant <= 0:
            raise ValueError(f"loss_norm_constant={self.loss_norm_constant} must be > 0")
        if self.log_ratio_clamp <= 0:
            raise ValueError(f"log_ratio_clamp={self.log_ratio_clamp} must be > 0")

    @property
    def clip_range(self) -> tuple[float, float]:
        """``(low, high)`` of the PPO ratio clip in effect: the set values, else the
        method's recipe (1 / 1 for Clip-Cov as in the paper, 0.2 / 0.2 otherwise)."""
        default = 1.0 if self.entropy_control.method == "clip_cov" else 0.2
        low, high = self.clip_ratio_low, self.clip_ratio_high
        return (default if low is None else low, default if high is None else high)


@dataclass
class AdvantageConfig:
    """Outcome-reward advantage estimator (see :mod:`covrl.algorithms.advantages`)."""

    estimator: AdvantageEstimator = "grpo"
    # GRPO: divide by the group's std (False: Dr. GRPO's mean-only centring).
    norm_by_std: bool = True
    eps: float = 1e-6
    # DAPO dynamic sampling: drop groups whose rewards are all equal.
    dynamic_sampling: bool = True

    def __post_init__(self) -> None:
        _check_choice("estimator", self.estimator, get_args(AdvantageEstimator))
        if self.eps < 0:
            raise ValueError(f"eps={self.eps} must be >= 0")
