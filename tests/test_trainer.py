"""End-to-end runs of ``covrl-train`` on a tiny Qwen2 (vLLM rollout, megatron-core training).

Five launches: a TP1 run optimising an *inverted* reward (its logs are also the
reference of the resume check); the same run preempted (SIGUSR1), resumed and killed
with SIGKILL, and resumed again; and the same run at TP2. The reward (does the
response contain a digit?) is one a random policy meets about 60% of the time, so
RL can move it either way within three steps.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.trainer_fixtures import HANDLERS_READY, read_jsonl, run_overrides, shared_assets

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# Tags that depend on wall-clock time.
TIMING_PREFIXES = ("time/", "perf/")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _command(world: int, args: list[str]) -> list[str]:
    if world == 1:
        return [PYTHON, "-m", "covrl.training.cli", *args]
    torchrun = str(Path(PYTHON).with_name("torchrun"))
    return [torchrun, "--nproc_per_node", str(world), "-m", "covrl.training.cli", *args]


def _run(world: int, args: list[str], log: Path, timeout: float = 300) -> int:
    with open(log, "w") as out:
        proc = subprocess.run(
            _command(world, args),
            cwd=REPO,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    return proc.returncode


def _by_step(records: list[dict]) -> dict[int, dict]:
    """Per step, the record written last (a resumed run re-logs replayed steps)."""
    return {r["step"]: r for r in records}


def _untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(TIMING_PREFIXES)}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


def _run_until(args: list[str], log: Path, ready, sig: int) -> int:
    """Start a TP1 run, send ``sig`` once ``ready()`` holds, return its exit code."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            _command(1, args), cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if ready():
                proc.send_signal(sig)
                break
            time.sleep(0.05)
        return proc.wait(timeout=120)


def _tracker(run_dir: Path) -> int:
    path = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    text = path.read_text().strip() if path.is_file() else ""
    return int(text) if text.isdigit() else 0


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """Run every launch once; the tests below check their outputs."""
    root = tmp_path_factory.mktemp("runs")
    tp1 = {
        "reward.sources": "{two_sum: tests.trainer_fixtures:inverted_digit_reward}",
        "trainer.save_freq": 1,
        "trainer.total_steps": 4,
        "policy.loss.entropy_control.method": "kl_cov",
    }
    out = {}

    # 1. TP1, inverted reward, uninterrupted: the reference.
    ref_dir = root / "tp1"
    out["tp1_rc"] = _run(
        1, ["--resume", "none", *run_overrides(assets, ref_dir, **tp1)], root / "tp1.log"
    )
    out["tp1"] = ref_dir

    # 2. The same run interrupted twice: SIGUSR1 (preemption: checkpoint at the next
    # step boundary, exit 0), then, resumed, SIGKILL right after its next checkpoint;
    # resumed again to the end.
    run_dir = root / "interrupted"
    args = ["--resume", "auto", *run_overrides(assets, run_dir, **tp1)]
    preempted_log = root / "preempted.log"
    out["preempted_rc"] = _run_until(
        args,
        preempted_log,
        lambda: HANDLERS_READY in preempted_log.read_text(),
        signal.SIGUSR1,
    )
    out["preempted_log"] = (root / "preempted.log").read_text()
    out["preempted_step"] = _tracker(run_dir)
    out["killed_rc"] = _run_until(
        args,
        root / "killed.log",
        lambda: _tracker(run_dir) > out["preempted_step"],
        signal.SIGKILL,
    )
    out["killed_step"] = _tracker(run_dir)
    out["resumed_rc"] = _run(1, args, root / "resumed.log")
    out["resumed"] = run_dir
    out["resumed_log"] = (root / "resumed.log").read_text()

    # 3. The reference run at TP2 (checkpointing only at the end).
    tp2_dir = root / "tp2"
    tp2 = {**tp1, "policy.tp": 2, "trainer.save_freq": 0}
    out["tp2_rc"] = _run(
        2, ["--resume", "none", *run_overrides(assets, tp2_dir, **tp2)], root / "tp2.log"
    )
    out["tp2"] = tp2_dir
    out["logs"] = {p.stem: p.read_text()[-3000:] for p in root.glob("*.log")}
    return out


def _check_rc(runs, name):
    assert runs[f"{name}_rc"] == 0, runs["logs"].get(name, "")


@pytest.mark.parametrize("name", ["tp1", "tp2"])
def test_run_finishes_with_outputs(runs, name):
    _check_rc(runs, name)
    run_dir = runs[name]
    records = _by_step(read_jsonl(run_dir / "metrics.jsonl"))
    assert sorted(records) == [0, 1, 2, 3, 4]
    assert (run_dir / "config.yaml").is_file()
    versions = json.loads((run_dir / "versions.json").read_text())
    assert versions["torch"] == torch.__version__ and versions["megatron-core"]
    assert (run_dir / "hf" / "config.json").is_file()
    assert (run_dir / "hf" / "tokenizer_config.json").is_file()
    assert "val/accuracy" in records[0] and "val/two_sum/avg@2" in records[max(records)]
    # A step whose groups all have equal rewards (the policy has learnt the reward)
    # skips its update; the others carry the full set of scalars.
    updated = [r for r in records.values() if r.get("train/updates", 0) > 0]
    assert updated
    for tag in (
        "rollout/entropy",
        "rollout/accuracy",
        "train/loss",
        "train/grad_norm",
        "train/pg_clipfrac",
        "mismatch/abs_diff_mean",
        "entropy_dynamics/measured_change",
        "time/rollout",
        "time/update",
        "time/sync",
        "perf/tokens_per_s",
    ):
        assert all(tag in r for r in updated), tag
    # vLLM and megatron score the sampled tokens alike after every weight sync.
    assert all(r.get("mismatch/abs_diff_max", 0.0) < 1e-3 for r in records.values())


@pytest.mark.parametrize("name", ["tp1", "tp2"])
def test_tensorboard_events_agree_with_json_lines(runs, name):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _check_rc(runs, name)
    run_dir = runs[name]
    records = _by_step(read_jsonl(run_dir / "metrics.jsonl"))
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    json_tags = {k for r in records.values() for k, v in r.items() if k != "step" and v is not None}
    assert set(tags) == json_tags
    for tag in tags:
        events = {e.step: e.value for e in acc.Scalars(tag)}
        expected = {s: r[tag] for s, r in records.items() if r.get(tag) is not None}
        assert events.keys() == expected.keys(), tag
        for step, value in expected.items():
            assert math.isclose(events[step], value, rel_tol=1e-6, abs_tol=1e-6), (tag, step)


@pytest.mark.parametrize("name", ["tp1", "tp2"])
def test_inverted_reward_makes_accuracy_fall(runs, name):
    """The loop optimises the reward it is given: rewarding digit-free responses drives
    the share of responses with a digit (the logged accuracy) down. (With the sign of
    the advantages flipped in the trainer, this accuracy rises instead.)"""
    _check_rc(runs, name)
    r = _by_step(read_jsonl(runs[name] / "metrics.jsonl"))
    # Validation: 8 prompts, greedy and 2 samples each at temperature 0.6.
    assert r[4]["val/two_sum/avg@2"] < r[0]["val/two_sum/avg@2"] - 0.2
    assert r[4]["val/accuracy"] <= r[0]["val/accuracy"]


# TP1 and TP2 reduce in different orders, so their parameters drift apart by float32
# rounding that the optimizer carries from step to step (Adam normalises each update,
# so a relative difference in a gradient becomes the same relative difference in the
# step). After a few steps the logged values agree to ~1e-5 relative on one CPU and
# ~1e-4 on another; RTOL leaves a factor of 10 above that, far below the O(1)
# differences a sharding bug gives.
RTOL, ATOL = 1e-3, 1e-5
# Differences and covariances of nearly equal, O(entropy) quantities: their absolute
# error is that of the entropies they come from, not a fraction of their own (small)
# value, so they are compared to a tolerance scaled by the step's entropy.
ENTROPY_SCALED = (
    "entropy_dynamics/measured_change",
    "entropy_dynamics/predicted_change",
    "entropy_dynamics/logp_adv_covariance",
)


def assert_same_run(a: dict, b: dict, step: int) -> None:
    """Per-step metrics of one run at two parallel layouts agree, each as its kind allows."""
    assert a.keys() == b.keys(), step
    scale = max(abs(a.get("rollout/entropy", 1.0)), 1e-3)
    for tag in a:
        if tag.startswith("mismatch/"):
            assert abs(a[tag] - b[tag]) < 1e-4, (step, tag)
        elif tag.startswith(("rollout/", "val/")) and tag != "rollout/entropy":
            assert a[tag] == b[tag], (step, tag)  # same samples, same rewards
        elif tag in ENTROPY_SCALED:
            assert abs(a[tag] - b[tag]) <= RTOL * scale, (step, tag, a[tag], b[tag])
        else:
            assert math.isclose(a[tag], b[tag], rel_tol=RTOL, abs_tol=ATOL), (step, tag)


def test_tp2_matches_tp1(runs):
    """The same run at TP2 logs what the TP1 run logs, step for step: the same samples
    (per-sample vLLM seeds), and training metrics equal up to float32 reduction order."""
    _check_rc(runs, "tp1")
    _check_rc(runs, "tp2")
    tp1 = _by_step(read_jsonl(runs["tp1"] / "metrics.jsonl"))
    tp2 = _by_step(read_jsonl(runs["tp2"] / "metrics.jsonl"))
    assert sorted(tp1) == sorted(tp2)
    for step in sorted(tp1):
        assert_same_run(_untimed(tp1[step]), _untimed(tp2[step]), step)


def test_layout_comparison_tolerates_rounding_not_errors():
    """The comparison above accepts the drift seen between CPUs (a measured entropy
    change off by 2e-5 at entropy 3) and rejects a wrong change or a wrong loss."""
    a = {"rollout/entropy": 3.0, "entropy_dynamics/measured_change": -0.045426, "train/loss": 0.1}
    assert_same_run(a, {**a, "entropy_dynamics/measured_change": -0.045446}, 3)
    for tag, value in (("entropy_dynamics/measured_change", -0.05), ("train/loss", 0.1002)):
        with pytest.raises(AssertionError):
            assert_same_run(a, {**a, tag: value}, 3)


def test_preemption_then_kill_then_resume_equals_uninterrupted(runs):
    """SIGUSR1: a checkpoint at the next step boundary and exit 0; a resumed run killed
    with SIGKILL after its next checkpoint; resumed again, the per-step metrics equal
    those of the uninterrupted run exactly (CPU is deterministic)."""
    assert runs["preempted_rc"] == 0, runs["logs"].get("preempted")
    step = runs["preempted_step"]
    assert 1 <= step < 4
    assert f"preempted: checkpoint saved at step {step}" in runs["preempted_log"]
    assert runs["killed_rc"] == -signal.SIGKILL
    assert step < runs["killed_step"] < 4
    _check_rc(runs, "resumed")
    assert (
        f"resumed from {runs['resumed']}/checkpoints/iter_{runs['killed_step']:07d}"
        in (runs["resumed_log"])
    )
    reference = _by_step(read_jsonl(runs["tp1"] / "metrics.jsonl"))
    resumed = _by_step(read_jsonl(runs["resumed"] / "metrics.jsonl"))
    assert sorted(resumed) == sorted(reference)
    for step in sorted(reference):
        assert _untimed(resumed[step]) == _untimed(reference[step]), step
