"""The entropy-target controller: simulated plants (step changes of target, collapse
drift, saturation), target schedules, exact resume, config checks, and the selection
following a knob that changes between steps."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import replace
from decimal import ROUND_FLOOR, Decimal

import pytest
import torch

from covrl.algorithms import (
    ClipCovConfig,
    EntropyControlConfig,
    EntropyTargetConfig,
    EntropyTargetController,
    KLCovConfig,
    PolicyLossConfig,
    prepare_selection,
)
from covrl.parallel import SINGLE_PROCESS
from tests.entropy_plants import (
    SEGMENT,
    CollapsePlant,
    LagPlant,
    control_config,
    overshoot,
    relative_errors,
    settling_steps,
    sign_changes,
    simulate,
    step_response,
)
from tests.token_fixtures import make_samples, reference_selection, selection_batches, split

DEFAULT = EntropyTargetConfig(value=1.0)  # the default gains and bounds
PLANTS = {
    # Collapse: the knob that holds the entropy steady rises 0.6% per step.
    "collapse_slow": CollapsePlant(gain=0.01, drift=0.006),
    "collapse": CollapsePlant(gain=0.02),
    "lag": LagPlant(alpha=0.1, width=1.0),
    "lag_slow_flat": LagPlant(alpha=0.05, width=2.0),
}
SPANS = [(i * SEGMENT, (i + 1) * SEGMENT) for i in range(3)]

# Thresholds (independent of the controller): after each step of target (0.7 -> 0.3,
# -> 0.45, -> 0.2) the entropy is within 10% of the target for good within 60 steps,
# overshoots by at most 15% of the target, and its error changes sign at most twice
# after settling (no oscillation).
SETTLE_STEPS = 60
MAX_OVERSHOOT = 0.15
MAX_SIGN_CHANGES = 2


def _in_bounds(knobs, cfg=DEFAULT):
    lo, hi = cfg.knob_bounds
    return all(lo <= k <= hi for k in knobs)


@pytest.mark.parametrize("name", PLANTS)
def test_step_changes_of_target_settle_without_oscillation(name):
    trace = step_response(PLANTS[name], DEFAULT)
    for i, (a, b) in enumerate(SPANS):
        settled = settling_steps(trace, a, b)
        assert settled is not None and settled <= SETTLE_STEPS, (name, i, settled)
        assert sign_changes(trace, a + settled, b) <= MAX_SIGN_CHANGES, (name, i)
    assert overshoot(trace, *SPANS[1], direction=1) <= MAX_OVERSHOOT
    assert overshoot(trace, *SPANS[2], direction=-1) <= MAX_OVERSHOOT
    assert _in_bounds(trace.knob)


@pytest.mark.parametrize("name", PLANTS)
def test_noisy_entropy_is_held_near_the_target(name):
    # 5% measurement noise, 1% process noise: the mean absolute error over each
    # segment's last 100 steps stays below 8% of the target.
    for seed in (0, 1):
        trace = step_response(
            PLANTS[name], DEFAULT, measure_noise=0.05, process_noise=0.01, seed=seed
        )
        for a, b in SPANS:
            errors = relative_errors(trace, a + 50, b)
            assert sum(map(abs, errors)) / len(errors) < 0.08, (name, seed, a)
        assert _in_bounds(trace.knob)


def test_collapse_drift_is_countered():
    # With the starting knob held fixed, this plant's entropy collapses (the knob that
    # holds it steady rises 0.6% per step); the controller keeps it at the target by
    # raising the knob as the drift grows.
    plant = CollapsePlant(gain=0.02, hold=0.05, drift=0.006)
    h = 0.7
    for t in range(1, 301):
        h = plant.step(h, 0.05, t)
    assert h < 0.01
    trace = simulate(plant, [(replace(DEFAULT, value=0.3), 300)], knob0=0.05)
    assert settling_steps(trace, 0, 300) <= SETTLE_STEPS
    assert max(map(abs, relative_errors(trace, 60, 300))) < 0.1
    assert trace.knob[-1] > 2.5 * trace.knob[100]  # the knob follows the drift up
    assert _in_bounds(trace.knob)


@pytest.mark.parametrize(
    ("unreachable", "bound"),
    [(2.0, 1), (0.02, 0)],  # above the plant's reach (h_max 1.25); below h_min 0.05
)
def test_saturation_with_anti_windup(unreachable, bound):
    plant = LagPlant(alpha=0.1, width=1.0)
    cfg = replace(DEFAULT, value=unreachable)
    reachable = replace(DEFAULT, value=0.6 if bound else 0.1)
    trace = simulate(plant, [(cfg, 100), (reachable, 100)])
    edge = DEFAULT.knob_bounds[bound]
    # Saturated cleanly: exactly at the bound once there, never beyond, and the integral
    # does not wind up meanwhile.
    assert all(k == edge for k in trace.knob[30:100])
    assert len(set(trace.integral[30:100])) == 1
    assert _in_bounds(trace.knob)
    # The knob leaves the bound at the first step the error changes sign...
    first = next(i for i in range(100, 200) if (trace.target[i] > trace.entropy[i]) != bound)
    assert trace.knob[first] != edge
    # ...and the entropy settles within 10% of the new target as after a step of target.
    assert settling_steps(trace, 100, 200) <= SETTLE_STEPS


def test_integral_is_clamped_at_the_bound():
    # Pure integral control toward an unreachable target: the integral climbs to the
    # upper bound and stops there; the first error of the other sign moves it off.
    target = replace(DEFAULT, value=2.0, kp=0.0)
    controller = EntropyTargetController(control_config(target))
    hi = target.knob_bounds[1]
    states = []
    for step in range(1, 201):
        controller.update(step, 0.5)
        states.append(controller.state_dict())
    assert states[100]["integral"] == states[-1]["integral"] == math.log(hi)
    assert states[-1]["knob"] == hi
    released = EntropyTargetController(control_config(replace(target, value=0.3)))
    released.load_state_dict(states[-1])
    assert released.update(201, 0.5) < hi


def test_schedules_against_hand_computed_values():
    linear = EntropyTargetConfig(schedule="linear", start=0.6, end=0.2, steps=4)
    assert [linear.target_at(s) for s in (1, 2, 3, 4, 5, 6, 100)] == pytest.approx(
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.2, 0.2], abs=1e-15
    )
    cosine = EntropyTargetConfig(schedule="cosine", start=0.6, end=0.2, steps=4)
    # 0.2 + 0.4 * (1 + cos(pi * p)) / 2 at p = 0, 1/4, 1/2, 3/4, 1
    expected = [0.6, 0.2 + 0.2 * (1 + 2**-0.5), 0.4, 0.2 + 0.2 * (1 - 2**-0.5), 0.2, 0.2]
    assert [cosine.target_at(s) for s in range(1, 7)] == pytest.approx(expected, abs=1e-15)
    rising = EntropyTargetConfig(schedule="cosine", start=0.1, end=0.5, steps=2)
    assert [rising.target_at(s) for s in (1, 2, 3)] == pytest.approx([0.1, 0.3, 0.5])
    assert EntropyTargetConfig(value=0.3).target_at(1000) == 0.3


def test_controller_follows_the_schedule():
    # The controller reads the target of each step from the schedule.
    for schedule in ("linear", "cosine"):
        cfg = EntropyTargetConfig(schedule=schedule, start=0.7, end=0.3, steps=100)
        trace = simulate(PLANTS["collapse"], [(cfg, 200)], knob0=0.01)
        assert trace.target[0] == 0.7 and trace.target[50] == pytest.approx(0.5)
        assert trace.target == [cfg.target_at(t) for t in range(1, 201)]
        assert max(map(abs, relative_errors(trace, 0, 200))) < 0.06


def _knobs(controller, entropies, first_step):
    return [controller.update(first_step + i, h) for i, h in enumerate(entropies)]


@pytest.mark.parametrize("resume_at", [1, 17, 63])
def test_resume_is_bit_exact(resume_at):
    cfg = control_config(EntropyTargetConfig(schedule="cosine", start=0.6, end=0.25, steps=50))
    trace = simulate(PLANTS["collapse_slow"], [(cfg.target, 90)], measure_noise=0.05, seed=3)
    entropies = trace.entropy
    straight = _knobs(EntropyTargetController(cfg), entropies, 1)
    first = EntropyTargetController(cfg)
    _knobs(first, entropies[:resume_at], 1)
    saved = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    assert set(saved) == {"integral", "knob", "last_step"} and saved["last_step"] == resume_at
    resumed = EntropyTargetController(cfg)
    resumed.load_state_dict(saved)
    assert resumed.knob.hex() == straight[resume_at - 1].hex()
    tail = _knobs(resumed, entropies[resume_at:], resume_at + 1)
    assert [k.hex() for k in tail] == [k.hex() for k in straight[resume_at:]]
    # Without the state the sequence differs: the state carries the history.
    fresh = _knobs(EntropyTargetController(cfg), entropies[resume_at:], resume_at + 1)
    assert fresh != straight[resume_at:]


def test_update_and_state_checks():
    controller = EntropyTargetController(control_config(EntropyTargetConfig(value=0.3)))
    assert controller.knob == 0.05 and controller.last_step == 0
    assert controller.metrics() == {"entropy_control/knob": 0.05}
    controller.update(3, 0.2)
    with pytest.raises(ValueError, match="step 3 is not after the last updated step 3"):
        controller.update(3, 0.2)
    for bad in (float("nan"), float("inf"), -0.1):
        with pytest.raises(ValueError, match="rollout entropy"):
            controller.update(4, bad)
    with pytest.raises(ValueError, match="expected"):
        controller.load_state_dict({"integral": 0.0, "knob": 0.1})
    with pytest.raises(ValueError, match="not finite"):
        controller.load_state_dict({"integral": float("nan"), "knob": 0.1, "last_step": 2})
    with pytest.raises(ValueError, match="needs entropy_control.target"):
        EntropyTargetController(EntropyControlConfig(method="kl_cov"))


def test_metrics_after_an_update():
    controller = EntropyTargetController(control_config(EntropyTargetConfig(value=0.4)))
    knob = controller.update(1, 0.3)
    metrics = controller.metrics()
    assert metrics == {
        "entropy_control/knob": knob,
        "entropy_control/target": 0.4,
        "entropy_control/error": pytest.approx(0.1),
    }
    assert all(type(v) is float for v in metrics.values())
    assert knob > 0.05  # entropy below the target raises the knob


def _leaves(tree: dict, prefix: tuple = ()) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


@pytest.mark.parametrize(
    ("method", "knob", "path"),
    [
        ("clip_cov", "ratio", ("clip_cov", "ratio")),
        ("kl_cov", "ratio", ("kl_cov", "ratio")),
        ("kl_cov", "beta", ("kl_cov", "beta")),
    ],
)
def test_apply_sets_only_the_driven_field(method, knob, path):
    ec = EntropyControlConfig(
        method=method,
        clip_cov=ClipCovConfig(ratio=0.01),
        kl_cov=KLCovConfig(ratio=0.02, beta=1.0),
        target=EntropyTargetConfig(value=0.3, knob=knob),
    )
    base = PolicyLossConfig(clip_ratio_high=0.28, entropy_control=ec)
    controller = EntropyTargetController(ec)
    value = controller.update(1, 0.1)
    applied = controller.apply(base)
    assert getattr(getattr(applied.entropy_control, path[0]), path[1]) == value
    # Every other field as before, and the input untouched.
    before, after = _leaves(dataclasses.asdict(base)), _leaves(dataclasses.asdict(applied))
    assert {k for k in before if before[k] != after[k]} == {("entropy_control", *path)}
    assert base.entropy_control == ec
    other = "kl_cov" if method == "clip_cov" else "clip_cov"
    with pytest.raises(ValueError, match="entropy_control.method"):
        controller.apply(PolicyLossConfig(entropy_control=EntropyControlConfig(method=other)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(), "target.value=None must be finite and > 0"),
        (dict(value=-0.1), "target.value=-0.1"),
        (dict(value=float("nan")), "target.value=nan"),
        (dict(value=0.3, steps=10), "target.steps=10 is only used by a linear or cosine"),
        (dict(schedule="exp", value=0.3), "target.schedule='exp' is not one of"),
        (dict(schedule="linear", start=0.5, end=0.2), "target.steps=None must be an integer"),
        (dict(schedule="linear", start=0.5, end=0.2, steps=0), "target.steps=0"),
        (dict(schedule="cosine", start=0.5, steps=5), "target.end=None"),
        (dict(schedule="cosine", value=0.3, start=0.5, end=0.2, steps=5), "takes target.start"),
        (dict(value=0.3, knob="k"), "target.knob='k' is not one of"),
        (dict(value=0.3, knob_min=0.0), "target.knob_min=0.0 must be finite and > 0"),
        (dict(value=0.3, knob_min=0.1, knob_max=0.05), "target.knob_min=0.1 must be < "),
        (dict(value=0.3, knob_max=2.0), "target.knob_max=2.0 must be <= 1 for the ratio"),
        (dict(value=0.3, kp=-1.0), "target.kp=-1.0 must be finite and >= 0"),
        (dict(value=0.3, kp=0.0, ki=0.0), "would never move"),
    ],
)
def test_target_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EntropyTargetConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(method="none"), "needs entropy_control.method clip_cov or kl_cov"),
        (dict(method="clip_cov", knob="beta"), "knob='beta' drives KL-Cov's beta"),
        (dict(method="kl_cov", knob_min=0.1), "kl_cov.ratio=0.002 is the entropy target's"),
        (dict(method="kl_cov", knob="beta", knob_max=0.5), "kl_cov.beta=1.0 is the entropy"),
    ],
)
def test_control_config_cross_checks(kwargs, message):
    method = kwargs.pop("method")
    with pytest.raises(ValueError, match=re.escape(message)):
        EntropyControlConfig(method=method, target=EntropyTargetConfig(value=0.3, **kwargs))


def test_default_bounds_and_disabled_by_default():
    assert EntropyControlConfig().target is None
    assert EntropyTargetConfig(value=0.3).knob_bounds == (1e-5, 0.5)
    assert EntropyTargetConfig(value=0.3, knob="beta").knob_bounds == (1e-2, 100.0)
    # The paper's settings are valid starting knobs.
    for method in ("clip_cov", "kl_cov"):
        EntropyControlConfig(method=method, target=EntropyTargetConfig(value=0.3))
    EntropyControlConfig(method="kl_cov", target=EntropyTargetConfig(value=0.3, knob="beta"))


# --- the selection with a knob that changes between steps ----------------------------


def _floor_count(knob: float, n: int) -> int:
    """``max(1, floor(knob * N))`` on the decimal value of the knob."""
    product = (Decimal(repr(knob)) * n).to_integral_value(rounding=ROUND_FLOOR)
    return max(1, int(product))


@pytest.mark.parametrize("method", ["kl_cov", "clip_cov"])
def test_selection_follows_the_knob_each_step(method):
    samples = make_samples("continuous", n_seqs=16, seed=5)
    n_tokens = sum(s["logp"].numel() for s in samples)
    # Clip-Cov with an all-covering band and the rollout log-probs (nothing PPO-clipped):
    # every token is a candidate, so its subset size is the count itself.
    omega = (-1e9, 1e9)
    ec = EntropyControlConfig(
        method=method,
        logp_source="old" if method == "clip_cov" else "current",
        clip_cov=ClipCovConfig(ratio=0.05, omega_low=omega[0], omega_high=omega[1]),
        kl_cov=KLCovConfig(ratio=0.05),
        target=EntropyTargetConfig(value=0.4, knob_min=0.003, knob_max=0.6),
    )
    base = PolicyLossConfig(clip_ratio_low=0.2, clip_ratio_high=0.2, entropy_control=ec)
    controller = EntropyTargetController(ec)
    counts, knobs = [], []
    entropies = [0.36, 0.33, 0.43, 0.5, 0.41, 0.35, 0.39, 0.46]
    for step, h in enumerate(entropies, start=1):
        knob = controller.update(step, h)
        cfg = controller.apply(base)
        expected = sorted(
            reference_selection(
                samples,
                method,
                knob,
                omega=omega,
                step=step,
                use_current=method == "kl_cov",
            )
        )
        for n_mb, order_seed in ((1, 0), (3, 11), (6, 29)):
            mbs = split(samples, 1, 0, n_mb, order_seed)
            result = prepare_selection(
                selection_batches(mbs, with_logp=method == "kl_cov"),
                cfg,
                step=step,
                group=SINGLE_PROCESS,
            )
            ids = torch.cat([mb["token_ids"][m] for mb, m in zip(mbs, result.masks, strict=True)])
            assert sorted(ids.tolist()) == expected  # split-invariant and exact
        knobs.append(knob)
        counts.append(len(expected))
        assert len(expected) == _floor_count(knob, n_tokens)
    assert len(set(counts)) >= 5  # the count moved with the knob
    assert len(set(knobs)) == len(knobs)
