"""Free space before a save: fail on every rank before anything is written when the
checkpoint root cannot hold what the ranks are about to write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from covrl.checkpointing.errors import CheckpointError
from covrl.parallel import get_device, raise_if_any_rank
from covrl.utils.atomic_io import free_bytes

# Free space wanted beyond the tensors' bytes (megatron's metadata, common.pt, RNG).
_SPACE_MARGIN_BYTES = 4 * 1024 * 1024


def _bytes_to_write(state: dict[str, Any]) -> int:
    """Bytes of the tensors this rank writes (main replicas only, as megatron-core
    deduplicates the others)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedTensor,
        ShardedTensorFactory,
        is_main_replica,
    )

    total = 0
    for value in nested_values(state):
        if isinstance(value, (ShardedTensor, ShardedTensorFactory)) and is_main_replica(
            value.replica_id
        ):
            total += value.data.numel() * value.data.element_size()
    return total


def _check_free_space(root: Path, final: Path, state: dict[str, Any]) -> None:
    """Fail on every rank, before anything is written, when ``root`` cannot hold the
    checkpoint (collective)."""
    # On the device the default group's backend wants (NCCL: CUDA); float64 is exact
    # far beyond any checkpoint size.
    need = torch.tensor([_bytes_to_write(state)], dtype=torch.float64, device=get_device())
    dist.all_reduce(need)
    status = None
    if dist.get_rank() == 0:
        wanted, free = int(need.item()) + _SPACE_MARGIN_BYTES, free_bytes(root)
        if wanted > free:
            status = (
                f"saving checkpoint {final} failed: no space left on the device of {root}: "
                f"the checkpoint needs about {wanted / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free"
            )
    raise_if_any_rank(status, dist.group.WORLD, error_type=CheckpointError)
