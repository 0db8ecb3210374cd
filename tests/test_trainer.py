"""End-to-end runs of ``covrl-train`` on a tiny Qwen2 (vLLM rollout, megatron-core training).

Seven launches: a TP1 run optimising an *inverted* reward; the same run at TP2 (its
logs are also the reference of the resume check); the TP2 run preempted (SIGUSR1 to one
rank 0), resumed and killed with SIGKILL (every process of the launch), and resumed again;
at TP1 with packed sequences; and Clip-Cov at PP2. Every run holds an entropy
target on KL-Cov's ratio (far above the policy's entropy at step 1, below it after), so
the controller's knob, its state in the checkpoints and its TP invariance are checked
by the same launches. The reward (does the
response contain a digit?) is one a random policy meets about 60% of the time, so
RL can move it either way within three steps. One more run scores every response 0,
so every step's update is skipped.

Every run is under the device-separation mode (tests/device_mode.py): an emulated
accelerator whose report per rank lists the host/device tensor mixes a GPU run would
fail at, and the host syncs per step.
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

from tests.device_mode import (
    ENV,
    RELEASED_WEIGHTS_ERROR,
    assert_no_violations,
    format_violations,
    read_reports,
)
from tests.trainer_fixtures import HANDLERS_READY, read_jsonl, run_overrides, shared_assets

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# Tags that depend on wall-clock time.
TIMING_PREFIXES = ("time/", "perf/")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    # Reports only: test_runs_mix_no_host_and_device_tensors reads them.
    env[ENV] = "report"
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


# Target 8 nats at step 1 (above any entropy of a 64-token vocabulary: 4.16 at most),
# 1 nat from step 2 on (below the random policy's ~3.5). A small kp keeps the knob off
# its bounds, so it depends on the controller's integral: a resume that lost the
# controller's state would log other knobs.
KL_COV_RATIO = 2e-3  # the KL-Cov ratio default, the controller's starting knob
ENTROPY_TARGET = {
    "policy.loss.entropy_control.kl_cov.ratio": KL_COV_RATIO,
    "policy.loss.entropy_control.target.schedule": "linear",
    "policy.loss.entropy_control.target.start": 8.0,
    "policy.loss.entropy_control.target.end": 1.0,
    "policy.loss.entropy_control.target.steps": 1,
    "policy.loss.entropy_control.target.kp": 0.5,
}


def _untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(TIMING_PREFIXES)}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


def _rank_process(proc: subprocess.Popen, world: int):
    """Rank 0 of a launch (the rank that prints the line ``ready()`` waits for, so its
    handlers are installed): the process itself at world 1, else the child of torchrun's
    agent with ``RANK=0``."""
    import psutil

    if world == 1:
        return psutil.Process(proc.pid)
    for child in psutil.Process(proc.pid).children():
        if child.environ().get("RANK") == "0":
            return child
    raise AssertionError(f"no rank 0 among the children of torchrun (pid {proc.pid})")


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launch and every process under it at once. torchrun starts each rank
    in a session of its own, so its process group alone would leave the ranks running."""
    import psutil

    parent = psutil.Process(proc.pid)
    for p in [parent, *parent.children(recursive=True)]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _run_until(world: int, args: list[str], log: Path, ready, sig: int) -> int:
    """Start a run of ``world`` ranks, send ``sig`` once ``ready()`` holds, return the
    launch's exit code. SIGKILL goes to every process of the launch (launcher, ranks
    and their workers, as a node failure takes them); any other signal to rank 0
    only (torchrun's agent dies of SIGUSR1, and the ranks agree on a preemption at the
    step boundary: one signalled rank is enough)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            _command(world, args),
            cwd=REPO,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if ready():
                if sig == signal.SIGKILL:
                    _kill_tree(proc)
                else:
                    _rank_process(proc, world).send_signal(sig)
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
        **ENTROPY_TARGET,
    }
    out = {}

    # 1. TP1, inverted reward, uninterrupted.
    ref_dir = root / "tp1"
    out["tp1_rc"] = _run(
        1, ["--resume", "none", *run_overrides(assets, ref_dir, **tp1)], root / "tp1.log"
    )
    out["tp1"] = ref_dir

    # 2. The same run at TP2, uninterrupted: the reference of the resume check.
    tp2_dir = root / "tp2"
    tp2 = {**tp1, "policy.tp": 2}
    out["tp2_rc"] = _run(
        2, ["--resume", "none", *run_overrides(assets, tp2_dir, **tp2)], root / "tp2.log"
    )
    out["tp2"] = tp2_dir

    # 3. The TP2 run interrupted twice: SIGUSR1 (preemption: checkpoint at the next
    # step boundary, exit 0), then, resumed, SIGKILL right after its next checkpoint;
    # resumed again to the end.
    run_dir = root / "interrupted"
    args = ["--resume", "auto", *run_overrides(assets, run_dir, **tp2)]
    preempted_log = root / "preempted.log"
    out["preempted_rc"] = _run_until(
        2,
        args,
        preempted_log,
        lambda: HANDLERS_READY in preempted_log.read_text(),
        signal.SIGUSR1,
    )
    out["preempted_log"] = (root / "preempted.log").read_text()
    out["preempted_step"] = _tracker(run_dir)
    out["killed_rc"] = _run_until(
        2,
        args,
        root / "killed.log",
        lambda: _tracker(run_dir) > out["preempted_step"],
        signal.SIGKILL,
    )
    out["killed_step"] = _tracker(run_dir)
    out["resumed_rc"] = _run(2, args, root / "resumed.log")
    out["resumed"] = run_dir
    out["resumed_log"] = (root / "resumed.log").read_text()

    # 4. The reference run with packed sequences (token-budget micro-batches).
    packed_dir = root / "packed"
    packed = {**tp1, "trainer.save_freq": 0, "policy.engine.max_tokens_per_micro_batch": 48}
    out["packed_rc"] = _run(
        1, ["--resume", "none", *run_overrides(assets, packed_dir, **packed)], root / "packed.log"
    )
    out["packed"] = packed_dir

    # 5. Clip-Cov at PP=2 (under the device-separation mode as every run here).
    pp2_dir = root / "pp2_clip_cov"
    pp2 = {
        **tp1,
        "policy.pp": 2,
        "trainer.save_freq": 0,
        "trainer.total_steps": 3,
        "policy.loss.entropy_control.method": "clip_cov",
        "policy.loss.entropy_control.clip_cov.ratio": 0.2,
        "policy.loss.entropy_control.clip_cov.omega_low": 0.0,
    }
    pp2 = {k: v for k, v in pp2.items() if not k.startswith("policy.loss.entropy_control.target")}
    pp2.pop("policy.loss.entropy_control.kl_cov.ratio")
    out["pp2_clip_cov_rc"] = _run(
        2, ["--resume", "none", *run_overrides(assets, pp2_dir, **pp2)], root / "pp2_clip_cov.log"
    )
    out["pp2_clip_cov"] = pp2_dir
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


def _assert_runs_match(runs, reference: str, other: str) -> None:
    _check_rc(runs, reference)
    _check_rc(runs, other)
    ref = _by_step(read_jsonl(runs[reference] / "metrics.jsonl"))
    got = _by_step(read_jsonl(runs[other] / "metrics.jsonl"))
    assert sorted(ref) == sorted(got)
    for step in sorted(ref):
        assert_same_run(_untimed(ref[step]), _untimed(got[step]), step)


def test_tp2_matches_tp1(runs):
    """The same run at TP2 logs what the TP1 run logs, step for step: the same samples
    (per-sample vLLM seeds), and training metrics equal up to float32 reduction order."""
    _assert_runs_match(runs, "tp1", "tp2")


def test_packed_run_matches_the_padded_run(runs):
    """Packing sequences into token-budget micro-batches changes no step: the same
    samples and the same training metrics as the padded reference run."""
    _assert_runs_match(runs, "tp1", "packed")


def test_layout_comparison_tolerates_rounding_not_errors():
    """The comparison above accepts the drift seen between CPUs (a measured entropy
    change off by 2e-5 at entropy 3) and rejects a wrong change or a wrong loss."""
    a = {"rollout/entropy": 3.0, "entropy_dynamics/measured_change": -0.045426, "train/loss": 0.1}
    assert_same_run(a, {**a, "entropy_dynamics/measured_change": -0.045446}, 3)
    for tag, value in (("entropy_dynamics/measured_change", -0.05), ("train/loss", 0.1002)):
        with pytest.raises(AssertionError):
            assert_same_run(a, {**a, tag: value}, 3)


@pytest.mark.parametrize("name", ["tp1", "tp2"])
def test_entropy_target_moves_the_knob_toward_the_target(runs, name):
    """Entropy below the target raises KL-Cov's ratio above its starting value; above
    the target lowers it; the logged target follows the schedule."""
    _check_rc(runs, name)
    records = _by_step(read_jsonl(runs[name] / "metrics.jsonl"))
    controlled = {s: r for s, r in records.items() if "entropy_control/knob" in r}
    assert 1 in controlled and len(controlled) >= 2, sorted(controlled)
    for step, r in controlled.items():
        target = 8.0 if step == 1 else 1.0
        assert r["entropy_control/target"] == target
        assert math.isclose(r["entropy_control/error"], target - r["rollout/entropy"], abs_tol=1e-9)
        if step == 1:
            assert r["entropy_control/error"] > 0 and r["entropy_control/knob"] > KL_COV_RATIO
        else:
            assert r["entropy_control/error"] < 0 and r["entropy_control/knob"] < KL_COV_RATIO
        assert 1e-5 < r["entropy_control/knob"] < 0.5  # off the bounds: set by the PI law


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
    reference = _by_step(read_jsonl(runs["tp2"] / "metrics.jsonl"))
    resumed = _by_step(read_jsonl(runs["resumed"] / "metrics.jsonl"))
    assert sorted(resumed) == sorted(reference)
    for step in sorted(reference):
        assert _untimed(resumed[step]) == _untimed(reference[step]), step


def test_device_separation_reports_every_run(runs):
    """Every rank of every run wrote its report, with the host syncs of each step."""
    for name, ranks in (("tp1", 1), ("resumed", 2), ("tp2", 2)):
        reports = read_reports(runs[name])
        assert len({r["rank"] for r in reports}) == ranks, name
    for report in read_reports(runs["tp1"]):
        counted = report["host_syncs"]
        assert {"1", "2", "3", "4"} <= counted.keys(), counted.keys()
        for step in ("1", "2", "3", "4"):
            sites = counted[step]["sites"]
            assert counted[step]["total"] == sum(s["count"] for s in sites) > 0


def test_runs_mix_no_host_and_device_tensors(runs):
    """No op of any run mixed host and device tensors, no collective got a host tensor
    (a batch left on the host fails here, naming e.g. ``Tensor.mul`` at the token mean
    of steps.py and the entropy-change sums of covrl/ops/token_covariance.py)."""
    for name in ("tp1", "resumed", "tp2", "packed", "pp2_clip_cov"):
        assert_no_violations(runs[name])


def test_clip_cov_runs_at_pp2(runs):
    """Clip-Cov over two pipeline stages: it finishes and acts on tokens."""
    _check_rc(runs, "pp2_clip_cov")
    records = _by_step(read_jsonl(runs["pp2_clip_cov"] / "metrics.jsonl"))
    updated = [r for r in records.values() if r.get("train/updates", 0) > 0]
    assert updated and all(r["cov/selected_tokens"] >= 1 for r in updated)


def test_step_after_a_skipped_update(assets, tmp_path):
    """Every reward 0: dynamic sampling keeps no group, the update of step 1 (and 2) is
    skipped; step 2 still generates on valid weights. Under the device-separation mode
    the rollout has CUDA sleep-mode semantics: sleep releases vLLM's weights, and a
    generation before the next weight sync fails."""
    run_dir = tmp_path / "skipped"
    extra = {
        "reward.sources": "{two_sum: tests.trainer_fixtures:zero_reward}",
        "trainer.total_steps": 2,
        "validation.test_freq": 0,
        "trainer.export_hf": "false",
    }
    log = tmp_path / "skipped.log"
    rc = _run(1, ["--resume", "none", *run_overrides(assets, run_dir, **extra)], log)
    text = log.read_text()
    assert RELEASED_WEIGHTS_ERROR not in text, "rollout on released weights:\n" + text[-3000:]
    assert rc == 0, text[-3000:]
    records = _by_step(read_jsonl(run_dir / "metrics.jsonl"))
    assert [records[s]["train/updates"] for s in (1, 2)] == [0.0, 0.0]
    assert not format_violations(read_reports(run_dir))
