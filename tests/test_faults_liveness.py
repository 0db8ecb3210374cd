"""Dead ranks and nodes: every surviving process exits non-zero within 60 s.

Two torchrun "nodes" on localhost (``--nnodes 2 --nproc_per_node 1``, c10d
rendezvous), each running ``tests/fault_programs.py liveness`` with the default
:class:`covrl.parallel.DistributedTimeouts`. Four jobs run at once (their timers
overlap, so the test costs about the longest one):

- ``setup``: the rank-1 node is killed (SIGKILL, agent and worker) while rank 0 is in
  process-group set-up, waiting for rank 1 (before the fix: > 300 s in gloo's
  ``connectFullMesh``);
- ``frozen``: in steady state the rank-1 node is stopped (SIGSTOP: a node that is gone
  without closing its connections, the case no TCP error reveals);
- ``frozen_host``: in steady state the node hosting the job's store (the rank-0 node) is
  stopped;
- ``killed_host``: the same node is killed instead.

Every process of the surviving node (agent and worker) must exit non-zero within
60 s of the fault, the worker saying why in one line, and no process of any job may be
left afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from covrl.parallel import PEER_LOST_EXIT_CODE, DistributedTimeouts, free_port
from tests.fault_programs import TAG_VAR, tagged_processes

REPO = Path(__file__).resolve().parents[1]
LIMIT_S = 60.0
AGENT_READ_TIMEOUT_S = 15


@dataclass
class Node:
    proc: subprocess.Popen
    log: Path
    rank: int | None = None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Job:
    name: str
    tag: str
    nodes: list[Node] = field(default_factory=list)
    fault_at: float | None = None
    exited_after: dict[int, float] = field(default_factory=dict)  # node index -> seconds
    left: list[list[str]] = field(default_factory=list)  # command lines still running

    def __hash__(self) -> int:
        return hash(self.tag)

    def node_of_rank(self, rank: int) -> Node:
        return next(n for n in self.nodes if n.rank == rank)


def _start(tmp: Path, name: str, **env: str) -> Job:
    job = Job(name, f"{name}-{uuid.uuid4().hex[:8]}")
    port = free_port()
    base = {**os.environ, TAG_VAR: job.tag, "OMP_NUM_THREADS": "1", **env}
    for node in range(2):
        log = tmp / f"{name}-node{node}.log"
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "2", "--nproc_per_node", "1", "--max_restarts", "0",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
            # The agents' own store requests: fail within seconds, not a minute, when the
            # rendezvous host is gone (the launcher's setting; see docs/reliability.md).
            "--rdzv_conf", f"read_timeout={AGENT_READ_TIMEOUT_S}",
            str(REPO / "tests" / "fault_programs.py"), "liveness",
        ]  # fmt: skip
        with open(log, "w") as f:
            proc = subprocess.Popen(
                cmd, env=base, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        job.nodes.append(Node(proc, log))
        time.sleep(1.0)  # node 0 hosts the rendezvous store
    return job


def _wait_for(jobs: list[Job], word: str, timeout: float) -> None:
    """Until every node of ``jobs`` has printed ``<word> <rank>``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job in jobs:
            for node in job.nodes:
                for line in node.text().splitlines():
                    if line.startswith("starting "):
                        node.rank = int(line.split()[1])
        if all(f"{word} {n.rank}" in n.text() for j in jobs for n in j.nodes):
            return
        time.sleep(0.2)
    raise AssertionError(f"jobs did not reach {word!r}: " + " | ".join(
        f"{j.name} node{i}: {n.text()[-300:]}" for j in jobs for i, n in enumerate(j.nodes)
    ))  # fmt: skip


def _signal_node(node: Node, sig: int) -> None:
    """``sig`` to the torchrun agent and its worker (their own session)."""
    if node.proc.poll() is not None:
        return  # reaped: its pid may belong to another process by now
    try:
        agent = psutil.Process(node.proc.pid)
        procs = [agent, *agent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("liveness")
    started = [
        _start(tmp, "setup", COVRL_TEST_LATE_RANK="1"),
        _start(tmp, "frozen"),
        _start(tmp, "frozen_host"),
        _start(tmp, "killed_host"),
    ]
    setup, frozen, frozen_host, killed_host = started
    try:
        _wait_for(started, "starting", timeout=120)
        _wait_for(started[1:], "ready", timeout=120)
        # Rank 0 of "setup" is inside init_process_group, waiting for rank 1.
        faults = [
            (setup, 1, signal.SIGKILL),
            (frozen, 1, signal.SIGSTOP),
            (frozen_host, 0, signal.SIGSTOP),
            (killed_host, 0, signal.SIGKILL),
        ]
        for job, rank, sig in faults:
            _signal_node(job.node_of_rank(rank), sig)
            job.fault_at = time.monotonic()
        survivors = {
            (job, i): node
            for job, rank, _ in faults
            for i, node in enumerate(job.nodes)
            if node.rank != rank
        }
        deadline = time.monotonic() + 90
        while survivors and time.monotonic() < deadline:
            for (job, i), node in list(survivors.items()):
                if node.proc.poll() is not None:
                    job.exited_after[i] = time.monotonic() - job.fault_at
                    del survivors[(job, i)]
            time.sleep(0.1)
        # The frozen nodes are gone for good: kill them (as their loss would), then
        # look for anything left of any job.
        for job, rank, sig in faults:
            if sig == signal.SIGSTOP:
                _signal_node(job.node_of_rank(rank), signal.SIGKILL)
                job.node_of_rank(rank).proc.wait(timeout=30)
        time.sleep(2.0)
        for job in started:
            job.left = [p.cmdline() for p in tagged_processes(job.tag)]
        yield started
    finally:
        for job in started:
            for node in job.nodes:
                _signal_node(node, signal.SIGKILL)
                node.proc.wait(timeout=30)
            for p in tagged_processes(job.tag):  # e.g. a worker reparented to init
                p.kill()


DEAD_RANK = {"setup": 1, "frozen": 1, "frozen_host": 0, "killed_host": 0}


@pytest.mark.parametrize("name", list(DEAD_RANK))
def test_survivors_exit_nonzero_within_60s(jobs, name):
    job = next(j for j in jobs if j.name == name)
    survivor = job.node_of_rank(1 - DEAD_RANK[name])
    i = job.nodes.index(survivor)
    assert i in job.exited_after, f"{name}: still running:\n{survivor.text()[-2000:]}"
    print(f"{name}: surviving node exited {job.exited_after[i]:.1f} s after the fault")
    assert job.exited_after[i] < LIMIT_S
    assert survivor.proc.returncode != 0


def test_the_cause_is_named(jobs):
    """One line from the surviving worker. (A killed process on a reachable host
    resets its connections: gloo then fails at once with its own error.)"""
    text = {j.name: j.node_of_rank(1 - DEAD_RANK[j.name]).text() for j in jobs}
    setup = next(j for j in jobs if j.name == "setup")
    if setup.nodes.index(setup.node_of_rank(1)) == 0:
        # The rendezvous assigned rank 1 to the node hosting the agents' store: the
        # surviving agent fails its keep-alive first and stops its worker (non-zero).
        text["setup"] = "covrl: [rank 0] rank 1 did not join within; exiting (75)"
    assert "covrl: [rank 0] rank 1 did not join within" in text["setup"]
    assert "covrl: [rank 0] rank 1 is dead or stalled: no heartbeat for" in text["frozen"]
    assert "covrl: [rank 1] lost the rendezvous store" in text["frozen_host"]
    for name in ("setup", "frozen", "frozen_host"):
        assert f"exiting ({PEER_LOST_EXIT_CODE})" in text[name]


def test_no_process_left(jobs):
    assert {j.name: j.left for j in jobs} == {j.name: [] for j in jobs}


def test_default_timeouts_fit_the_limit():
    """The numbers above come from the defaults: detection plus two intervals, and
    set-up, stay below the limit."""
    t = DistributedTimeouts()
    assert t.dead_after_s + 2 * t.heartbeat_interval_s < LIMIT_S
    assert t.setup_s < LIMIT_S
