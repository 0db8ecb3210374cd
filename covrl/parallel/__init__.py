"""Devices, backends, process groups and megatron-core parallel state for covrl."""

from covrl.parallel.state import (
    ParallelConfig,
    destroy,
    free_port,
    get_backend,
    get_device,
    init_process_group,
    initialize,
)

__all__ = [
    "ParallelConfig",
    "destroy",
    "free_port",
    "get_backend",
    "get_device",
    "init_process_group",
    "initialize",
]
