"""Hold a chosen rollout entropy with feedback on Clip-Cov's / KL-Cov's knob.

The entropy a run settles at is set by the method's ratio (Clip-Cov's r, KL-Cov's k)
or KL-Cov's beta, but which value gives which entropy depends on the model and the
data. :class:`EntropyTargetController` closes the loop: once per step it reads the
step's rollout entropy ``H`` (nats per token, the mean over the step's response
tokens) and sets the knob for the step's updates.

Law (PI in log space of the knob; the entropy responds roughly to ``log knob``)::

    e     = (target(step) - H) / target(step)                          # relative error
    I    <- clamp(I + ki * clip(e, -0.2, 0.2), log knob_min, log knob_max)  # log-knob units
    knob  = clamp(exp(I + kp * e), knob_min, knob_max)

``I`` starts at ``log`` of the method's configured value. More selected tokens or a
larger beta keep more entropy, so an entropy below the target raises the knob.
The proportional term does the fast work; the integral holds the knob the plant needs
at the target (which drifts as training sharpens the policy). Its input is clipped so
that the large errors of a transient (the first steps, a step of the target) do not
wind it up into an overshoot. Anti-windup: the integral is clamped to the bounds, and
it does not move further in the direction the knob is already saturated in, so a
target that is out of reach for a while is followed again as soon as it is reachable.

Every rank holds its own controller and feeds it the same scalar (the rollout entropy
is reduced over the whole batch before it is logged), so the knob is identical on
every rank without any collective; the arithmetic is plain Python floats, deterministic
on any machine. The state (``I``, the knob, the last step) is a JSON-serialisable dict:
a controller restored from it continues bit-exactly.

Trainer use, per step (after the rollouts, before the updates)::

    controller = EntropyTargetController(cfg.entropy_control)    # once
    controller.update(step, metrics["rollout/entropy"])
    step_cfg = controller.apply(cfg)        # the knob is constant within the step
    metrics.update(controller.metrics())
    # checkpoint: in save_checkpoint's JSON ``extra``; on resume, load_state_dict
    extra["entropy_target"] = controller.state_dict()
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from covrl.algorithms.config import EntropyControlConfig, PolicyLossConfig

__all__ = ["EntropyTargetController"]

_STATE_KEYS = ("integral", "knob", "last_step")
# The integral's input is the relative error clipped to +-this: a transient's large error
# must not wind the integral up, a persistent one still moves it (at ki * 0.2 e-folds per
# step). On the simulated plants of docs/entropy_control.md it cut the largest overshoot
# after a step of target from 23% to 15% of the target.
_INTEGRAL_ERROR_CLIP = 0.2


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


class EntropyTargetController:
    """PI controller of the rollout entropy on the knob of ``config.target``.

    Args:
        config: the entropy-control config; ``config.target`` must be set. The
            method's configured knob value (e.g. ``kl_cov.ratio``) is the starting knob.

    Attributes:
        knob: the value to apply at the current step (the starting knob before the
            first :meth:`update`).
        last_step: the step of the last :meth:`update` (0 before the first).
    """

    def __init__(self, config: EntropyControlConfig):
        if config.target is None:
            raise ValueError("EntropyTargetController needs entropy_control.target to be set")
        self.config = config
        self.target = config.target
        self._section, self._field = config.target_knob
        self._lo, self._hi = self.target.knob_bounds
        self._log_lo, self._log_hi = math.log(self._lo), math.log(self._hi)
        self.knob = float(getattr(getattr(config, self._section), self._field))
        self._integral = math.log(self.knob)
        self.last_step = 0
        self._last: dict[str, float] = {}

    # ---------------------------------------------------------------------- control law
    def update(self, step: int, entropy: float) -> float:
        """Consume step ``step``'s rollout entropy and return the knob for its updates.

        Args:
            step: the trainer step (1-based), larger than any step seen before; gaps
                (steps without a measurement) are allowed and do not integrate.
            entropy: the step's mean rollout entropy in nats per token, identical on
                every rank.

        Raises:
            ValueError: on a step not after the last one, or an entropy that is NaN,
                infinite or negative.
        """
        if step <= self.last_step:
            raise ValueError(
                f"entropy target: step {step} is not after the last updated step {self.last_step}"
            )
        entropy = float(entropy)
        if not math.isfinite(entropy) or entropy < 0:
            raise ValueError(f"entropy target: rollout entropy {entropy} at step {step}")
        target = self.target.target_at(step)
        e = (target - entropy) / target
        p = self.target.kp * e
        integral = self._integral
        # Conditional integration: never push further into a saturated bound.
        saturated_high = e > 0 and integral + p >= self._log_hi
        saturated_low = e < 0 and integral + p <= self._log_lo
        if not (saturated_high or saturated_low):
            clipped = _clamp(e, -_INTEGRAL_ERROR_CLIP, _INTEGRAL_ERROR_CLIP)
            integral = _clamp(integral + self.target.ki * clipped, self._log_lo, self._log_hi)
        self._integral = integral
        # Clamped again after exp: exp(log(bound)) may be one ulp outside the bound.
        u = _clamp(integral + p, self._log_lo, self._log_hi)
        self.knob = _clamp(math.exp(u), self._lo, self._hi)
        self.last_step = step
        self._last = {"target": target, "error": target - entropy}
        return self.knob

    def apply(self, config: PolicyLossConfig) -> PolicyLossConfig:
        """``config`` with the driven field (``clip_cov.ratio``, ``kl_cov.ratio`` or
        ``kl_cov.beta``) set to :attr:`knob`; everything else unchanged."""
        ec = config.entropy_control
        if ec.method != self.config.method:
            raise ValueError(
                f"entropy target drives {self.config.method}.{self._field} but the config's "
                f"entropy_control.method is {ec.method!r}"
            )
        section = dataclasses.replace(getattr(ec, self._section), **{self._field: self.knob})
        return dataclasses.replace(
            config, entropy_control=dataclasses.replace(ec, **{self._section: section})
        )

    def metrics(self) -> dict[str, float]:
        """``entropy_control/knob``, and after an update in this process
        ``entropy_control/target`` and ``entropy_control/error`` (``target - H``, nats
        per token) of the last update."""
        out = {"entropy_control/knob": self.knob}
        if self._last:
            out["entropy_control/target"] = self._last["target"]
            out["entropy_control/error"] = self._last["error"]
        return out

    # ---------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """``{"integral": float, "knob": float, "last_step": int}`` (JSON-serialisable;
        ``integral`` is in log-knob units)."""
        return {"integral": self._integral, "knob": self.knob, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the next :meth:`update` continues as the
        saved controller would have. Values outside the current bounds are clamped."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing or set(state) - set(_STATE_KEYS):
            raise ValueError(
                f"entropy target state has keys {sorted(state)}, expected {list(_STATE_KEYS)}"
            )
        integral, knob, last_step = (state[k] for k in _STATE_KEYS)
        if not (math.isfinite(integral) and math.isfinite(knob) and knob > 0):
            raise ValueError(f"entropy target state is not finite: {state}")
        if isinstance(last_step, bool) or int(last_step) != last_step or last_step < 0:
            raise ValueError(f"entropy target state: last_step={last_step!r}")
        self._integral = _clamp(float(integral), self._log_lo, self._log_hi)
        self.knob = _clamp(float(knob), self._lo, self._hi)
        self.last_step = int(last_step)
        self._last = {}
