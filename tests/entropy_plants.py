"""Simulated entropy plants for the entropy-target controller, and the measures the
tests and docs/entropy_control.md use (settling steps, overshoot, oscillation, error).

A plant maps (entropy at step t, knob applied at step t) to the entropy at step t + 1;
the knob is Clip-Cov's / KL-Cov's ratio or KL-Cov's beta. Two kinds:

- :class:`LagPlant`: first-order lag toward an equilibrium ``g(knob)`` that rises with
  ``log knob`` (a sigmoid between ``h_min`` and ``h_max``).
- :class:`CollapsePlant`: the rate of change of ``log H`` is proportional to
  ``log(knob / hold(t))``; ``hold(t)``, the knob that keeps the entropy steady, rises
  with ``drift`` as training sharpens the policy, so a fixed knob lets the entropy
  collapse (GRPO's behaviour) and the controller must keep raising it. On the tiny
  task's KL-Cov sweep (docs/reproduce.md) ``gain`` is about 0.003-0.015 per e-fold.

``python -m tests.entropy_plants`` prints the gain sweep of docs/entropy_control.md.
"""

from __future__ import annotations

import math
import random
import statistics
import sys
from dataclasses import dataclass, field, replace

from covrl.algorithms import (
    EntropyControlConfig,
    EntropyTargetConfig,
    EntropyTargetController,
    KLCovConfig,
)


@dataclass(frozen=True)
class LagPlant:
    """``H' = H + alpha (g(knob) - H)``, ``g = h_min + (h_max - h_min) sigmoid(log(knob /
    center) / width)``: a smaller ``width`` is a steeper (higher-gain) plant."""

    alpha: float
    width: float = 1.0
    center: float = 0.1
    h_min: float = 0.05
    h_max: float = 1.25

    def step(self, h: float, knob: float, t: int) -> float:
        g = self.h_min + (self.h_max - self.h_min) / (
            1.0 + math.exp(-math.log(knob / self.center) / self.width)
        )
        return h + self.alpha * (g - h)


@dataclass(frozen=True)
class CollapsePlant:
    """``log H' = log H + gain * (log knob - log hold - drift * t)``."""

    gain: float
    hold: float = 0.01
    drift: float = 0.0

    def step(self, h: float, knob: float, t: int) -> float:
        return h * math.exp(self.gain * (math.log(knob / self.hold) - self.drift * t))


@dataclass
class Trace:
    """Per step (index ``t - 1``): measured entropy, target, knob applied, the
    controller's integral after the step."""

    entropy: list[float] = field(default_factory=list)
    target: list[float] = field(default_factory=list)
    knob: list[float] = field(default_factory=list)
    integral: list[float] = field(default_factory=list)


def control_config(
    target: EntropyTargetConfig, knob0: float = 0.05, method: str = "kl_cov"
) -> EntropyControlConfig:
    return EntropyControlConfig(method=method, kl_cov=KLCovConfig(ratio=knob0), target=target)


def simulate(
    plant,
    segments: list[tuple[EntropyTargetConfig, int]],
    *,
    knob0: float = 0.05,
    h0: float = 0.7,
    measure_noise: float = 0.0,
    process_noise: float = 0.0,
    seed: int = 0,
) -> Trace:
    """Run the controller on ``plant`` for consecutive segments, each with its own
    target config (a step change of target is a new segment: the controller is rebuilt
    from the new config and restored from the previous one's state, as a resumed run
    with a changed target would be). Noise is relative Gaussian: ``measure_noise`` on
    what the controller reads, ``process_noise`` on the plant's state."""
    rng = random.Random(seed)
    trace, h, step, state = Trace(), h0, 0, None
    for target, n in segments:
        controller = EntropyTargetController(control_config(target, knob0))
        if state is not None:
            controller.load_state_dict(state)
        for _ in range(n):
            step += 1
            measured = h * (1.0 + measure_noise * rng.gauss(0.0, 1.0))
            knob = controller.update(step, measured)
            trace.entropy.append(measured)
            trace.target.append(target.target_at(step))
            trace.knob.append(knob)
            trace.integral.append(controller.state_dict()["integral"])
            h = max(plant.step(h, knob, step) * (1.0 + process_noise * rng.gauss(0.0, 1.0)), 1e-6)
        state = controller.state_dict()
    return trace


def relative_errors(trace: Trace, start: int, end: int) -> list[float]:
    """``(H - target) / target`` over step indices ``[start, end)``."""
    return [(trace.entropy[i] - trace.target[i]) / trace.target[i] for i in range(start, end)]


def settling_steps(trace: Trace, start: int, end: int, band: float = 0.1) -> int | None:
    """Steps after ``start`` until the entropy enters ``target * (1 +- band)`` for good
    (up to ``end``); None if it is outside at ``end - 1``."""
    outside = [i for i, e in enumerate(relative_errors(trace, start, end)) if abs(e) > band]
    if not outside:
        return 0
    return None if outside[-1] == end - start - 1 else outside[-1] + 1


def overshoot(trace: Trace, start: int, end: int, direction: int) -> float:
    """Largest relative excursion past the target in the direction of a target step
    (``+1`` up, ``-1`` down) within ``[start, end)``; 0 if none."""
    return max([0.0, *(direction * e for e in relative_errors(trace, start, end))])


def sign_changes(trace: Trace, start: int, end: int, dead: float = 0.02) -> int:
    """Sign changes of the error within ``[start, end)``, ignoring errors below ``dead``."""
    signs = [e > 0 for e in relative_errors(trace, start, end) if abs(e) > dead]
    return sum(a != b for a, b in zip(signs, signs[1:], strict=False))


# -------------------------------------------------------------------------- gain sweep
SEGMENT = 150
STEP_TARGETS = (0.3, 0.45, 0.2)
SWEEP_PLANTS = {
    **{
        f"collapse gain={g} drift={d}": CollapsePlant(g, drift=d)
        for g in (0.005, 0.01, 0.02, 0.05)
        for d in (0.0, 0.006)
    },
    **{f"lag alpha={a} width={w}": LagPlant(a, w) for a in (0.05, 0.1) for w in (1.0, 2.0)},
}
FAST_PLANTS = {
    "collapse gain=0.2": CollapsePlant(0.2),
    "lag alpha=0.3 width=1": LagPlant(0.3, 1.0),
    "lag alpha=0.3 width=0.5": LagPlant(0.3, 0.5),
}


def step_response(plant, target: EntropyTargetConfig, **noise) -> Trace:
    """From H = 0.7, knob 0.05: targets 0.3, 0.45, 0.2 for 150 steps each."""
    return simulate(plant, [(replace(target, value=v), SEGMENT) for v in STEP_TARGETS], **noise)


def sweep_row(plant, target: EntropyTargetConfig, seeds: int = 4) -> dict:
    clean = step_response(plant, target)
    spans = [(i * SEGMENT, (i + 1) * SEGMENT) for i in range(len(STEP_TARGETS))]
    maes = []
    for seed in range(seeds):
        noisy = step_response(plant, target, measure_noise=0.05, process_noise=0.01, seed=seed)
        maes.append(
            statistics.mean(abs(e) for a, b in spans for e in relative_errors(noisy, a + 50, b))
        )
    return {
        "settle": [settling_steps(clean, a, b) for a, b in spans],
        "overshoot": max(overshoot(clean, *spans[1], 1), overshoot(clean, *spans[2], -1)),
        "late_sign_changes": max(sign_changes(clean, b - 75, b) for _, b in spans),
        "mae": statistics.mean(maes),
    }


def _main(argv: list[str]) -> None:
    gains = [(8.0, 0.3)] if not argv else [tuple(map(float, a.split(","))) for a in argv]
    for kp, ki in gains:
        target = EntropyTargetConfig(value=1.0, kp=kp, ki=ki)
        print(f"kp={kp} ki={ki}")
        print("| plant | steps to 10% (0.7->0.3, ->0.45, ->0.2) | overshoot | noisy MAE |")
        print("|---|---|---|---|")
        for name, plant in SWEEP_PLANTS.items():
            r = sweep_row(plant, target)
            settle = ", ".join("-" if s is None else str(s) for s in r["settle"])
            print(f"| {name} | {settle} | {r['overshoot']:.2f} | {r['mae']:.3f} |")
        for name, plant in FAST_PLANTS.items():
            r = sweep_row(plant, target, seeds=1)
            print(
                f"| {name} (fast) | sign changes in the last 75 steps: {r['late_sign_changes']} |"
            )


if __name__ == "__main__":
    _main(sys.argv[1:])
