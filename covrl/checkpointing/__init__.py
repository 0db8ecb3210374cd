"""Megatron checkpoints of the policy: megatron-core ``dist_checkpointing``, reshardable, atomic.

A checkpoint holds this run's model chunks (and optionally the Megatron optimizer, the
optimizer parameter scheduler and a small JSON of run metadata) in megatron-core's
``torch_dist`` format, under the global keys of the models' sharded state dicts, so a
checkpoint saved at one TP / PP / VPP layout loads at any other layout the model
supports. One concern per module:

- :mod:`~covrl.checkpointing.layout`: the directory layout under a root, the tracker,
  :func:`resolve_checkpoint`;
- :mod:`~covrl.checkpointing.metadata`: :class:`CheckpointMetadata`
  (``covrl_checkpoint.json``, the completion marker), :func:`check_model_config`;
- :mod:`~covrl.checkpointing.state_dict`: the sharded state dict that is saved;
- :mod:`~covrl.checkpointing.rng`: every rank's RNG states;
- :mod:`~covrl.checkpointing.integrity`: the checksum manifest, written and verified;
- :mod:`~covrl.checkpointing.space`: the free-space check before a save;
- :mod:`~covrl.checkpointing.writer`: megatron-core's writer processes die with the rank;
- :mod:`~covrl.checkpointing.save`: :func:`save_checkpoint`, the atomic save;
- :mod:`~covrl.checkpointing.load`: :func:`load_checkpoint`;
- :mod:`~covrl.checkpointing.errors`: :class:`CheckpointError`, raised on every rank.

Save and load are collective over all ranks of the default process group (every TP,
PP and DP rank: megatron-core deduplicates data-parallel replicas); ``<root>`` must be a
file system shared by the ranks. One writer per ``<root>`` at a time. A save that fails
on some ranks inside megatron-core's collective writer cannot be reported by the
others (they wait in its barrier): the failing rank then ends the job through
:func:`covrl.parallel.liveness.abort`, which prints the cause on every rank.
"""

from covrl.checkpointing.errors import CheckpointError
from covrl.checkpointing.layout import (
    METADATA_FILENAME,
    TRACKER_FILENAME,
    checkpoint_path,
    is_complete,
    list_checkpoints,
    read_tracker,
    resolve_checkpoint,
)
from covrl.checkpointing.load import load_checkpoint
from covrl.checkpointing.metadata import CheckpointMetadata, check_model_config, read_metadata
from covrl.checkpointing.rng import RNG_DIRNAME, rng_state, set_rng_state
from covrl.checkpointing.save import save_checkpoint

__all__ = [
    "METADATA_FILENAME",
    "RNG_DIRNAME",
    "TRACKER_FILENAME",
    "CheckpointError",
    "CheckpointMetadata",
    "check_model_config",
    "checkpoint_path",
    "is_complete",
    "list_checkpoints",
    "load_checkpoint",
    "read_metadata",
    "read_tracker",
    "resolve_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]
