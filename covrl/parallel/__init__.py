"""Devices, backends, process groups and megatron-core parallel state for covrl."""

from covrl.parallel.failures import raise_if_any_rank
from covrl.parallel.groups import SINGLE_PROCESS, Group, all_reduce, check_group, rank_and_size
from covrl.parallel.liveness import PEER_LOST_EXIT_CODE, LivenessConfig
from covrl.parallel.state import (
    DistributedTimeouts,
    ParallelConfig,
    destroy,
    free_port,
    get_backend,
    get_device,
    init_process_group,
    initialize,
    set_collective_timeout,
)

__all__ = [
    "SINGLE_PROCESS",
    "Group",
    "PEER_LOST_EXIT_CODE",
    "DistributedTimeouts",
    "LivenessConfig",
    "ParallelConfig",
    "all_reduce",
    "check_group",
    "destroy",
    "free_port",
    "get_backend",
    "get_device",
    "init_process_group",
    "initialize",
    "raise_if_any_rank",
    "rank_and_size",
    "set_collective_timeout",
]
