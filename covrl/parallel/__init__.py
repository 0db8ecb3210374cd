"""Devices, backends, process groups and megatron-core parallel state for covrl."""

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
    "PEER_LOST_EXIT_CODE",
    "DistributedTimeouts",
    "LivenessConfig",
    "ParallelConfig",
    "destroy",
    "free_port",
    "get_backend",
    "get_device",
    "init_process_group",
    "initialize",
    "set_collective_timeout",
]
