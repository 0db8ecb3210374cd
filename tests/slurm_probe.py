"""A small torchrun program the Slurm tests start through slurm/launch.sh.

It stands in for the trainer (same command line: ``--config X --resume R key=value``)
and records what each rank saw, so the tests can check the launcher without training.

Modes (``PROBE_MODE``):

* ``allreduce`` (default): join the gloo process group, all-reduce ``rank + 1``, write
  ``<PROBE_OUT>/rank<r>.json`` (rank, world size, Slurm node, the all-reduced sum, the
  arguments received); ``PROBE_EXIT_RANK``/``PROBE_EXIT_CODE`` make one rank exit with
  that code after the collective.
* ``dead_rank``: ``covrl.parallel.initialize`` (the project's set-up, with its liveness
  mechanism), then all-reduces in a loop; rank ``PROBE_KILL_RANK`` SIGKILLs itself
  after ``PROBE_KILL_AFTER`` seconds and writes the kill time to ``<PROBE_OUT>/killed``.
* ``steps``: the trainer's preemption contract without the model: ``trainer.total_steps``
  steps of ``PROBE_STEP_SECONDS``; SIGUSR1/SIGTERM set a flag, the ranks agree at the
  step boundary (all-reduce MAX), save ``<run_dir>/probe_checkpoint.json`` and exit 0
  printing "preempted: checkpoint saved at step N"; ``--resume auto`` starts after the
  saved step. Every step appends ``<attempt> <step>`` to ``<PROBE_OUT>/steps.rank<r>``.
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
    from covrl.parallel import initialize

    initialize()
    rank = dist.get_rank()
    (out / f"ready{rank}").write_text(str(time.time()))
    kill_rank = int(os.environ.get("PROBE_KILL_RANK", "1"))
    kill_at = time.monotonic() + float(os.environ.get("PROBE_KILL_AFTER", "2"))
    while True:
        if rank == kill_rank and time.monotonic() > kill_at:
            (out / "killed").write_text(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        t = torch.ones(1)
        dist.all_reduce(t)
        time.sleep(0.05)


def _steps(out: Path) -> int:
    opts = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    total = int(opts.get("trainer.total_steps", "3"))
    run_dir = Path(opts["trainer.run_dir"])
    resume = sys.argv[sys.argv.index("--resume") + 1]
    flag = {"signal": 0}

    def on_signal(signum, frame):
        flag["signal"] = signum

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ckpt = run_dir / "probe_checkpoint.json"
    start = json.loads(ckpt.read_text())["step"] if resume == "auto" and ckpt.exists() else 0
    attempt = os.environ.get("SLURM_RESTART_COUNT", "0")
    (out / f"ready{rank}.{attempt}").write_text(str(time.time()))
    for step in range(start + 1, total + 1):
        time.sleep(float(os.environ.get("PROBE_STEP_SECONDS", "0.5")))
        with (out / f"steps.rank{rank}").open("a") as f:
            f.write(f"{attempt} {step}\n")
        stop = torch.tensor([float(flag["signal"] != 0)])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item() or step == total:
            if rank == 0:
                run_dir.mkdir(parents=True, exist_ok=True)
                ckpt.write_text(json.dumps({"step": step}))
            dist.barrier()
            if stop.item() and step < total:
                if rank == 0:
                    print(f"preempted: checkpoint saved at step {step}", flush=True)
                break
    dist.destroy_process_group()
    return 0


def main() -> int:
    out = Path(os.environ["PROBE_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    mode = os.environ.get("PROBE_MODE", "allreduce")
    return {"allreduce": _allreduce, "dead_rank": _dead_rank, "steps": _steps}[mode](out)


if __name__ == "__main__":
    sys.exit(main())
