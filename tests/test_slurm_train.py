"""`sbatch slurm/train_32b.sh` with the real trainer on the local two-node Slurm cluster.

The 32B script runs unchanged except for its documented overrides: the tiny two-sum
policy (tests/trainer_fixtures.py), one CPU rank per fake node (gloo, DP=2) and
TP=PP=1. One job covers the multi-node run and preemption: once training has
started the batch shell gets USR1 (as `--signal=B:USR1@T` sends it before the time
limit); the trainer checkpoints at the step boundary and exits 0, the job requeues
itself, and the requeued run resumes from that checkpoint, finishes all iterations and
exits 0.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.device_mode import ENV, format_violations, read_reports
from tests.slurm_cluster import cluster_fixture
from tests.trainer_fixtures import HANDLERS_READY, build_assets, run_overrides

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
cluster = pytest.fixture(cluster_fixture, scope="module", name="cluster")
TOTAL_STEPS = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("assets"))


def cpu_overrides(assets: dict[str, str]) -> list[str]:
    """The tiny run on CPU: what replaces the 32B example's model, data and layout."""
    tiny = [o for o in run_overrides(assets, Path("unused")) if not o.startswith("trainer.run_dir")]
    return tiny + [
        "policy.tp=1",
        "policy.pp=1",
        "policy.sequence_parallel=false",  # the example's TP=8 has it; TP=1 cannot
        "policy.dtype=float32",
        "rollout.tensor_parallel_size=1",
        "rollout.gpu_memory_utilization=0.1",
        "rollout.dtype=auto",
        "data.val_files=[]",
        "validation.before_train=false",
        "trainer.export_hf=false",
        "trainer.save_freq=0",
        # Less work per step: one PPO epoch, no extra entropy-change pass.
        "algorithm.ppo_epochs=1",
        "trainer.entropy_change_freq=0",
        f"trainer.total_steps={TOTAL_STEPS}",
    ]


def _tails(*paths: Path, chars: int = 3000) -> str:
    """The ends of the batch output and the node logs, for a failure message."""
    files = [p for path in paths for p in ([path] if path.is_file() else path.rglob("*.log"))]
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-chars:]}" for p in files)


def test_train_32b_script_two_nodes_preempted_requeued_resumed(cluster, assets, tmp_path):
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "COVRL_NPROC_PER_NODE": "1",
        "COVRL_OUTPUT": str(tmp_path / "runs"),
        "OMP_NUM_THREADS": "1",
        # The trainer under the emulated accelerator (tests/device_mode.py), reports only.
        ENV: "report",
    }
    out = tmp_path / "batch.out"
    t0 = time.monotonic()
    job_id, sbatch = cluster.submit(
        ["--nodes", "2", f"--output={out}", "slurm/train_32b.sh", *cpu_overrides(assets)],
        env=env,
        cwd=REPO,
    )
    run_dir = tmp_path / "runs" / f"covrl-32b-{job_id}"
    metrics = run_dir / "metrics.jsonl"
    logs = run_dir / "logs"
    try:
        # Signal once the ranks' handlers are installed: a tiny step can take 0.3 s,
        # less than Slurm's signal delivery, so waiting for step 1's metrics could
        # let the run finish before the signal lands.
        deadline = time.monotonic() + 400
        while not any(HANDLERS_READY in p.read_text() for p in logs.glob(f"{job_id}.0.node*.log")):
            assert sbatch.poll() is None, f"job ended before training:\n{_tails(out, run_dir)}"
            assert time.monotonic() < deadline, _tails(out, run_dir)
            time.sleep(0.2)
        ready = time.monotonic() - t0
        signalled = subprocess.run(
            ["scancel", "--signal=USR1", "--batch", str(job_id)], env=cluster.env
        )
        assert signalled.returncode == 0
        sbatch.communicate(timeout=600)
    finally:
        if sbatch.poll() is None:
            sbatch.kill()
    total = time.monotonic() - t0
    print(
        f"\ntrain_32b.sh on 2 nodes: training started after {ready:.1f} s, job done in {total:.1f} s"
    )
    batch = out.read_text()
    attempt0 = "".join(p.read_text() for p in sorted(logs.glob(f"{job_id}.0.node*.log")))
    attempt1 = "".join(p.read_text() for p in sorted(logs.glob(f"{job_id}.1.node*.log")))
    assert sbatch.returncode == 0, batch + attempt0[-3000:] + attempt1[-3000:]
    assert "2 node(s) x 1 rank(s), backend gloo" in batch
    # One trainer rank per node, data-parallel over the two nodes.
    assert "covrl: 2 ranks (tp=1, pp=1, dp=2)" in attempt0
    assert "USR1 received" in batch and f"requeueing job {job_id}" in batch
    saved = int(re.search(r"preempted: checkpoint saved at step (\d+)", attempt0).group(1))
    assert 1 <= saved < TOTAL_STEPS
    assert re.search(rf"resumed from \S*{saved}\b", attempt1), attempt1[-3000:]
    assert f"done: {TOTAL_STEPS} steps" in attempt1
    # Every iteration logged once, in order: attempt 0 up to the checkpoint, the
    # requeued attempt from the next step on.
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, TOTAL_STEPS + 1)), steps
    assert sorted(p.name for p in logs.iterdir()) == [
        f"{job_id}.{a}.node{n}.log" for a in (0, 1) for n in (0, 1)
    ]
    # Both attempts' ranks ran under the device-separation mode.
    reports = read_reports(run_dir)
    assert sorted(r["rank"] for r in reports) == [0, 0, 1, 1]
    print(format_violations(reports))
