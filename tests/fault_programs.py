"""Programs the fault-injection tests run as separate processes (under torchrun or
plain python) and then kill, stop or starve.

    python tests/fault_programs.py liveness   # one rank of a job that never ends
    python tests/fault_programs.py saver ROOT HF   # saves checkpoints in a loop

``liveness`` initialises torch.distributed with :func:`covrl.parallel.init_process_group`
(default timeouts unless ``COVRL_TEST_SETUP_S`` / ``COVRL_TEST_DEAD_AFTER_S`` are set),
prints ``ready <rank>``, then all-reduces forever. With ``COVRL_TEST_LATE_RANK=r`` rank
``r`` sleeps instead of joining (it is killed during the others' set-up).

``saver`` builds the tiny model of ``HF`` at TP=WORLD_SIZE and saves
``ROOT/iter_0000001`` over and over (``overwrite=True``), printing ``saved <n>`` after
each save: a kill lands inside a save almost always.
"""

from __future__ import annotations

import os
import sys
import time

# Set in the environment of every process of one faulted job, so that the tests can
# find whatever of it is still running (children inherit it).
TAG_VAR = "COVRL_FAULT_TAG"


def tagged_processes(tag: str) -> list:
    """Live (not zombie) processes whose environment has ``COVRL_FAULT_TAG=tag``."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(TAG_VAR) == tag and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def liveness() -> None:
    import torch
    import torch.distributed as dist

    from covrl.parallel import DistributedTimeouts, init_process_group

    defaults = DistributedTimeouts()
    timeouts = DistributedTimeouts(
        setup_s=float(os.environ.get("COVRL_TEST_SETUP_S", defaults.setup_s)),
        dead_after_s=float(os.environ.get("COVRL_TEST_DEAD_AFTER_S", defaults.dead_after_s)),
    )
    rank = int(os.environ["RANK"])
    print(f"starting {rank}", flush=True)
    if os.environ.get("COVRL_TEST_LATE_RANK") == str(rank):
        time.sleep(3600)
    init_process_group(timeouts=timeouts)
    print(f"ready {rank}", flush=True)
    x = torch.ones(1)
    while True:
        dist.all_reduce(x)
        time.sleep(0.2)


def saver(root: str, hf: str) -> None:
    from covrl import checkpointing
    from covrl.models import PolicyModelConfig, build_model, load_hf_weights
    from covrl.parallel import ParallelConfig, initialize

    world = int(os.environ.get("WORLD_SIZE", "1"))
    initialize(ParallelConfig(tensor_model_parallel_size=world))
    config = PolicyModelConfig.from_hf(hf)
    chunks = build_model(config)
    load_hf_weights(chunks, config, hf)
    n = 0
    while True:
        checkpointing.save_checkpoint(root, 1, chunks, config, overwrite=True)
        n += 1
        print(f"saved {n}", flush=True)


if __name__ == "__main__":  # (dist_checkpointing may start processes)
    {"liveness": liveness, "saver": saver}[sys.argv[1]](*sys.argv[2:])
