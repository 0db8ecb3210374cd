"""slurm/ scripts on a real local Slurm cluster (tests/slurm_cluster.py): two fake nodes,
real sbatch/srun/torchrun, one torchrun per node.

The program under torchrun is tests/slurm_probe.py (the trainer's command line without
a model), so these tests check the launcher itself: rendezvous across nodes, arguments,
logs, exit codes, and a dead rank ending the whole job. Preemption with requeue and
resume runs with the real trainer in tests/test_slurm_train.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import cluster_fixture, start_or_skip

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


cluster = pytest.fixture(cluster_fixture, scope="module", name="cluster")


def job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The submitting shell's environment: the project's venv first on PATH, one CPU rank
    per fake node, the probe as the program, outputs under tmp_path."""
    return {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "COVRL_PROGRAM": "tests/slurm_probe.py",
        "COVRL_NPROC_PER_NODE": "1",
        "COVRL_OUTPUT": str(tmp_path / "runs"),
        "COVRL_MODEL": "/models/tiny",
        "PROBE_OUT": str(tmp_path / "probe"),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def run_dir(tmp_path: Path, job_id: int) -> Path:
    return tmp_path / "runs" / f"covrl-32b-{job_id}"


def test_two_nodes_rendezvous_arguments_logs_and_exit_code(cluster, tmp_path):
    env = job_env(tmp_path, PROBE_EXIT_RANK="1", PROBE_EXIT_CODE="3")
    out = tmp_path / "batch.out"
    job = cluster.sbatch(
        ["--wait", "--nodes", "2", f"--output={out}", "slurm/train_32b.sh",
         "trainer.total_steps=2", "policy.optim.lr=5e-7"],
        env=env, cwd=REPO, timeout=240,
    )  # fmt: skip
    print(f"2-node probe job: {job.seconds:.1f} s")
    # A failing rank fails the job: torchrun, srun and the batch script pass it on.
    assert job.returncode != 0, out.read_text()
    ranks = [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert {r["node"] for r in ranks} == {"n1", "n2"}  # one torchrun per node
    assert all(r["world_size"] == 2 and r["sum"] == 3.0 for r in ranks)
    rdir = run_dir(tmp_path, job.job_id)
    assert ranks[0]["argv"] == [
        "--config", "examples/qwen2.5-32b_kl_cov.yaml", "--resume", "auto",
        f"trainer.run_dir={rdir}", "policy.model_path=/models/tiny",
        "trainer.total_steps=2", "policy.optim.lr=5e-7",
    ]  # fmt: skip
    logs = sorted(p.name for p in (rdir / "logs").iterdir())
    assert logs == [f"{job.job_id}.0.node0.log", f"{job.job_id}.0.node1.log"]
    batch = out.read_text()
    assert "2 node(s) x 1 rank(s), backend gloo, rendezvous c10d at n1:" in batch
    assert "ranks finished with exit code 1" in batch


@pytest.mark.parametrize("failure", ["kill", "hang"])
def test_dead_rank_ends_the_job_within_60s(cluster, tmp_path, failure):
    """One rank SIGKILLed, or one node frozen (SIGSTOP: only the liveness heartbeat can
    tell), in steady state: every process exits and the job fails within 60 s."""
    env = job_env(
        tmp_path,
        PROBE_MODE="dead_rank",
        PROBE_FAILURE=failure,
        PROBE_KILL_RANK="1",
        PROBE_KILL_AFTER="2",
    )
    out = tmp_path / "batch.out"
    job_id, sbatch = cluster.submit(
        ["--nodes", "2", f"--output={out}", "slurm/train_32b.sh"], env=env, cwd=REPO
    )
    killed = tmp_path / "probe" / "killed"
    try:
        sbatch.communicate(timeout=240)
        ended = time.time()
    finally:
        if sbatch.poll() is None:
            sbatch.kill()
    assert killed.exists(), out.read_text()
    exit_seconds = ended - float(killed.read_text())
    print(f"dead rank ({failure}): job ended {exit_seconds:.1f} s after the failure")
    assert sbatch.returncode != 0
    assert exit_seconds < 60
    # Nothing of the job is left: no process with this test's environment.
    assert processes_with_env(f"PROBE_OUT={tmp_path / 'probe'}") == []


def processes_with_env(entry: str) -> list[int]:
    """Pids of live (not zombie) processes whose environment holds ``entry``."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if entry.encode() in environ and state != "Z":
            pids.append(int(proc.name))
    return pids


def test_stop_leaves_nothing_running():
    """A separate cluster: after stop() no daemon of it is alive and its folder is gone."""
    c = start_or_skip()
    pids = [p.pid for p in c._procs.values()]
    root = c.root
    c.stop()
    for pid in pids:
        stat = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True)
        assert stat.stdout.strip() in ("", "Z"), (pid, stat.stdout)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not root.exists()
