"""A small torchrun program the Slurm tests start through slurm/launch.sh.

It stands in for the trainer (same command line: ``--config X --resume R key=value``)
and records what each rank saw, so the tests can check the launcher without training.

Modes (``PROBE_MODE``):

* ``allreduce`` (default): join the gloo process group, all-reduce ``rank + 1``, write
  ``<PROBE_OUT>/rank<r>.json`` (rank, world size, Slurm node, the all-reduced sum, the
  arguments received); ``PROBE_EXIT_RANK``/``PROBE_EXIT_CODE`` make one rank exit with
  that code after the collective.
* ``dead_rank``: ``covrl.parallel.init_process_group`` (the project's set-up, with its
  timeouts and liveness heartbeat), then all-reduces in a loop; after
  ``PROBE_KILL_AFTER`` seconds rank ``PROBE_KILL_RANK`` writes the time to
  ``<PROBE_OUT>/killed`` and fails as ``PROBE_FAILURE`` says: ``kill`` (SIGKILL itself)
  or ``hang`` (SIGSTOP its torchrun agent and itself: a node that stops answering
  while its connections stay open).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _allreduce(out: Path) -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    record = {
        "rank": rank,
        "world_size": world,
        "node": os.environ.get("SLURMD_NODENAME"),
        "hostname": socket.gethostname(),
        "sum": t.item(),
        "argv": sys.argv[1:],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()
    if rank == int(os.environ.get("PROBE_EXIT_RANK", "-1")):
        return int(os.environ.get("PROBE_EXIT_CODE", "0"))
    return 0


def _dead_rank(out: Path) -> int:
    from covrl.parallel import init_process_group

    init_process_group()  # the project's set-up: timeouts and the liveness heartbeat
    rank = dist.get_rank()
    kill_rank = int(os.environ.get("PROBE_KILL_RANK", "1"))
    kill_at = time.monotonic() + float(os.environ.get("PROBE_KILL_AFTER", "2"))
    while True:
        if rank == kill_rank and time.monotonic() > kill_at:
            (out / "killed").write_text(str(time.time()))
            if os.environ.get("PROBE_FAILURE", "kill") == "hang":
                # A node that stops answering: its torchrun agent and this rank freeze,
                # their sockets stay open.
                os.kill(os.getppid(), signal.SIGSTOP)
                os.kill(os.getpid(), signal.SIGSTOP)
            os.kill(os.getpid(), signal.SIGKILL)
        t = torch.ones(1)
        dist.all_reduce(t)
        time.sleep(0.05)


def main() -> int:
    out = Path(os.environ["PROBE_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    mode = os.environ.get("PROBE_MODE", "allreduce")
    return {"allreduce": _allreduce, "dead_rank": _dead_rank}[mode](out)


if __name__ == "__main__":
    sys.exit(main())
