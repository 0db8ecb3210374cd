"""The entropy-performance law ``R = -a exp(H) + b``: fit, prediction, live monitor.

Without entropy intervention, validation performance ``R`` and policy entropy ``H`` (token
mean over the rollouts, in nats) follow ``R = -a exp(H) + b`` (Cui et al., 2025). The
model is linear in ``x = exp(H)``, so the fit is ordinary least squares of ``R`` on ``x``
in closed form:

    x_bar, R_bar = means;   Sxx = sum (x - x_bar)^2;   Sxy = sum (x - x_bar)(R - R_bar)
    a = -Sxy / Sxx;         b = R_bar + a x_bar
    s^2 = SSE / (n - 2)                     (residual variance)
    Var(a) = s^2 / Sxx;     Var(b) = s^2 (1/n + x_bar^2 / Sxx);   Cov(a, b) = s^2 x_bar / Sxx

The ceiling (``H = 0``, a deterministic policy) is ``b - a``, the fitted line at ``x = 1``,
with ``Var(b - a) = s^2 (1/n + (1 - x_bar)^2 / Sxx)``. The standard errors assume
independent, equal-variance residuals; successive validation points of one run are
correlated, so read them as a lower bound on the uncertainty.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

MIN_POINTS = 3  # two parameters plus one degree of freedom for the residual variance


class EntropyLawError(ValueError):
    """The points do not determine a fit (too few, non-finite, or constant entropy)."""


@dataclass(frozen=True)
class EntropyLawFit:
    """Least-squares fit of ``R = -a exp(H) + b`` with standard errors."""

    a: float
    b: float
    a_se: float
    b_se: float
    cov_ab: float  # covariance of the estimates of a and b
    r2: float  # nan when the accuracy is constant
    rmse: float  # sqrt(SSE / n) over the fitted points
    residual_std: float  # sqrt(SSE / (n - 2))
    num_points: int
    entropy_min: float
    entropy_max: float

    @property
    def ceiling(self) -> float:
        """Predicted performance at ``H = 0``: ``b - a``."""
        return self.b - self.a

    @property
    def ceiling_se(self) -> float:
        var = self.a_se**2 + self.b_se**2 - 2.0 * self.cov_ab
        return math.sqrt(max(var, 0.0))

    def predict(self, entropy):
        """``b - a exp(H)`` for a float or an array of entropies."""
        return self.b - self.a * np.exp(entropy)

    def slope(self, entropy):
        """``dR/dH = -a exp(H)``: accuracy gained per nat of entropy given up is ``-slope``."""
        return -self.a * np.exp(entropy)

    def as_dict(self) -> dict[str, float]:
        d = asdict(self)
        d["ceiling"] = self.ceiling
        d["ceiling_se"] = self.ceiling_se
        return d


@dataclass(frozen=True)
class HeldOutError:
    """Error of a fit's predictions on points it was not fitted on (``actual - predicted``)."""

    num_points: int
    rmse: float
    max_abs: float
    mean: float  # bias: positive when the run beats the prediction
    first_step: int
    last_step: int


def _points(entropy, accuracy, steps, context: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h = np.asarray(entropy, dtype=np.float64)
    r = np.asarray(accuracy, dtype=np.float64)
    where = f" ({context})" if context else ""
    if h.ndim != 1 or h.shape != r.shape:
        raise EntropyLawError(
            f"entropy and accuracy must be 1-D of equal length, got {h.shape} and {r.shape}{where}"
        )
    st = np.arange(len(h)) if steps is None else np.asarray(steps)
    if st.shape != h.shape:
        raise EntropyLawError(f"steps must match the points, got {st.shape} and {h.shape}{where}")
    bad = ~(np.isfinite(h) & np.isfinite(r))
    if bad.any():
        label = "indices" if steps is None else "steps"
        raise EntropyLawError(
            f"non-finite entropy or accuracy at {label} {st[bad][:10].tolist()}{where}"
        )
    return h, r, st


def fit_entropy_law(entropy, accuracy, *, steps=None, context: str = "") -> EntropyLawFit:
    """Fit ``R = -a exp(H) + b`` by least squares.

    Args:
        entropy: ``[n]`` policy entropies ``H`` (nats).
        accuracy: ``[n]`` validation performance ``R`` at the same steps.
        steps: ``[n]`` step numbers, only for error messages.
        context: names the run / file / tags in error messages.

    Raises:
        EntropyLawError: fewer than 3 points, non-finite values, ``exp(H)`` overflowing,
            or an entropy too constant to separate ``a`` from ``b``.
    """
    h, r, _ = _points(entropy, accuracy, steps, context)
    where = f" ({context})" if context else ""
    n = len(h)
    if n == 0:
        raise EntropyLawError(f"no (entropy, accuracy) points to fit{where}")
    if n < MIN_POINTS:
        raise EntropyLawError(
            f"too few points: {n} (entropy, accuracy) pairs, need at least {MIN_POINTS}{where}"
        )
    # Relative tolerance: float32 logs of a constant entropy may differ in the last bit.
    spread = float(h.max() - h.min())
    if spread <= 1e-6 * max(1.0, float(np.abs(h).max())):
        raise EntropyLawError(
            f"entropy is constant (H = {h[0]:.6g}, spread {spread:.3g} over {n} points): "
            f"a and b cannot be separated{where}"
        )
    with np.errstate(over="ignore"):
        x = np.exp(h)
    if not np.isfinite(x).all():
        raise EntropyLawError(
            f"exp(H) overflows (max H = {h.max():.6g}); is the tag a token entropy in nats?{where}"
        )
    x_bar, r_bar = x.mean(), r.mean()
    dx, dr = x - x_bar, r - r_bar
    sxx = float(dx @ dx)
    slope = float(dx @ dr) / sxx
    a = -slope
    b = float(r_bar) - slope * float(x_bar)
    resid = r - (b - a * x)
    sse = float(resid @ resid)
    sst = float(dr @ dr)
    s2 = sse / (n - 2)
    return EntropyLawFit(
        a=a,
        b=b,
        a_se=math.sqrt(s2 / sxx),
        b_se=math.sqrt(s2 * (1.0 / n + float(x_bar) ** 2 / sxx)),
        cov_ab=s2 * float(x_bar) / sxx,
        r2=1.0 - sse / sst if r.max() > r.min() else math.nan,
        rmse=math.sqrt(sse / n),
        residual_std=math.sqrt(s2),
        num_points=n,
        entropy_min=float(h.min()),
        entropy_max=float(h.max()),
    )


def prediction_error(
    fit: EntropyLawFit, entropy, accuracy, *, steps=None, context: str = ""
) -> HeldOutError:
    """Error of ``fit``'s predictions ``b - a exp(H)`` against the given points."""
    h, r, st = _points(entropy, accuracy, steps, context)
    if len(h) == 0:
        where = f" ({context})" if context else ""
        raise EntropyLawError(f"no points to evaluate the prediction on{where}")
    err = r - fit.predict(h)
    return HeldOutError(
        num_points=len(h),
        rmse=float(np.sqrt(np.mean(err**2))),
        max_abs=float(np.abs(err).max()),
        mean=float(err.mean()),
        first_step=int(st.min()),
        last_step=int(st.max()),
    )


def fit_prefix(
    steps, entropy, accuracy, fit_until: int, *, context: str = ""
) -> tuple[EntropyLawFit, HeldOutError]:
    """Fit on the points with ``step <= fit_until``; error on the others (held out)."""
    st = np.asarray(steps)
    h = np.asarray(entropy, dtype=np.float64)
    r = np.asarray(accuracy, dtype=np.float64)
    head = st <= fit_until
    where = f" ({context})" if context else ""
    if not (~head).any():
        last = int(st.max()) if len(st) else None
        raise EntropyLawError(
            f"no held-out points after step {fit_until} (last step with both tags: {last}){where}"
        )
    ctx = f"steps <= {fit_until}" + (f", {context}" if context else "")
    fit = fit_entropy_law(h[head], r[head], steps=st[head], context=ctx)
    held = prediction_error(fit, h[~head], r[~head], steps=st[~head], context=context)
    return fit, held


# --------------------------------------------------------------------------- live monitor


@dataclass
class EntropyLawMonitorConfig:
    """Running fit during training.

    Attributes:
        min_points: validation points before the first fit is reported (>= 3).
        prefix: prefix of the returned scalar names.
    """

    min_points: int = 5
    prefix: str = "entropy_law/"

    def __post_init__(self) -> None:
        if self.min_points < MIN_POINTS:
            raise ValueError(f"min_points must be >= {MIN_POINTS}, got {self.min_points}")


@dataclass
class EntropyLawMonitor:
    """Fits the law on the (entropy, accuracy) pairs seen so far, at each validation step.

    The trainer calls :meth:`update` at every step with a validation result and logs the
    returned scalars (TensorBoard and JSON lines), so a run shows where it will saturate::

        monitor = EntropyLawMonitor()
        scalars = monitor.update(step, metrics["rollout/entropy"], metrics["val/accuracy"])
        # {} until min_points pairs; then entropy_law/a, b, ceiling, ceiling_se, r2, ...

    Keys (with ``prefix``): ``a``, ``b``, ``a_se``, ``b_se``, ``ceiling`` (``b - a``),
    ``ceiling_se``, ``r2``, ``rmse``, ``dR_dH`` (at this step's entropy), ``num_points``,
    and ``prediction_error`` (this point's accuracy minus the previous fit's prediction, a
    held-out check) once a previous fit exists; non-finite values (``r2`` of a constant
    accuracy) are left out. A step at or before the last one recorded
    (a resumed run replaying steps) replaces the points from that step on.
    :meth:`state_dict` / :meth:`load_state_dict` carry the points through checkpoints.
    """

    config: EntropyLawMonitorConfig = field(default_factory=EntropyLawMonitorConfig)
    steps: list[int] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    fit: EntropyLawFit | None = None

    def update(self, step: int, entropy: float, accuracy: float | None) -> dict[str, float]:
        """Record one point and refit; the scalars to log, or ``{}`` when there is no fit.

        ``accuracy=None`` (no validation at this step) and non-finite values record nothing.
        """
        if accuracy is None or not (math.isfinite(entropy) and math.isfinite(accuracy)):
            return {}
        step = int(step)
        if self.steps and step <= self.steps[-1]:
            keep = sum(1 for s in self.steps if s < step)
            del self.steps[keep:], self.entropy[keep:], self.accuracy[keep:]
            self.fit = None
        previous = self.fit
        self.steps.append(step)
        self.entropy.append(float(entropy))
        self.accuracy.append(float(accuracy))
        out: dict[str, float] = {}
        if previous is not None:
            out["prediction_error"] = float(accuracy) - float(previous.predict(entropy))
        if len(self.steps) < self.config.min_points:
            return self._prefixed(out)
        try:
            self.fit = fit_entropy_law(self.entropy, self.accuracy, steps=self.steps)
        except EntropyLawError:
            # Early steps can have (near-)constant entropy; no fit yet is the honest answer.
            self.fit = None
            return self._prefixed(out)
        f = self.fit
        out.update(
            a=f.a,
            b=f.b,
            a_se=f.a_se,
            b_se=f.b_se,
            ceiling=f.ceiling,
            ceiling_se=f.ceiling_se,
            r2=f.r2,
            rmse=f.rmse,
            dR_dH=float(f.slope(entropy)),
            num_points=float(f.num_points),
        )
        return self._prefixed(out)

    def _prefixed(self, d: dict[str, float]) -> dict[str, float]:
        # Non-finite values (r2 of a constant accuracy) are not loggable as JSON.
        return {self.config.prefix + k: v for k, v in d.items() if math.isfinite(v)}

    def state_dict(self) -> dict[str, list]:
        """JSON-serializable points (the fit is recomputed on load)."""
        return {
            "steps": list(self.steps),
            "entropy": list(self.entropy),
            "accuracy": list(self.accuracy),
        }

    def load_state_dict(self, state: dict[str, list]) -> None:
        self.steps = [int(s) for s in state["steps"]]
        self.entropy = [float(v) for v in state["entropy"]]
        self.accuracy = [float(v) for v in state["accuracy"]]
        self.fit = None
        if len(self.steps) >= self.config.min_points:
            try:
                self.fit = fit_entropy_law(self.entropy, self.accuracy, steps=self.steps)
            except EntropyLawError:
                pass
