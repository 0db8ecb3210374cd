"""Loading a checkpoint into model chunks built at any layout the model supports: the
model config must match, every file is checked against the manifest, then megatron-core
reads the shards this rank needs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

from covrl.checkpointing.errors import CheckpointError, _root_cause
from covrl.checkpointing.integrity import _verify_checksums
from covrl.checkpointing.layout import METADATA_FILENAME, resolve_checkpoint
from covrl.checkpointing.metadata import (
    CheckpointMetadata,
    _parallel_layout,
    check_model_config,
)
from covrl.checkpointing.rng import _load_rng
from covrl.checkpointing.state_dict import (
    _distributed_optimizers,
    _model_keys,
    _sharded_state_dict,
)
from covrl.models.hf_config import PolicyModelConfig
from covrl.models.hf_weights import unwrap_model
from covrl.utils.errors import type_and_message


def load_checkpoint(
    root: str | os.PathLike,
    model_chunks: Sequence[torch.nn.Module],
    config: PolicyModelConfig,
    *,
    iteration: int | None = None,
    optimizer=None,
    scheduler=None,
    load_optimizer: bool = True,
    load_rng: bool = True,
    verify: bool = True,
) -> CheckpointMetadata:
    """Load a checkpoint into this rank's model chunks (and optimizer / scheduler).

    Args:
        root: a checkpoint root or an ``iter_NNNNNNN`` directory (see
            :func:`resolve_checkpoint`).
        model_chunks: built at any layout the model supports (``build_model``), bare or
            wrapped; must match ``config``.
        config: must equal the checkpoint's model config (every field but
            ``hf_config``); a difference raises :class:`CheckpointError` naming fields.
        iteration: which checkpoint; None takes the tracker's.
        optimizer / scheduler: restored from the checkpoint when given (the checkpoint
            must hold their state).
        load_optimizer: False keeps the optimizer's state (e.g. fresh Adam moments)
            and only refreshes its main parameters from the loaded model.
        load_rng: restore this rank's RNG states (:func:`set_rng_state`) when the
            checkpoint has them and was saved at this layout; skipped with a warning
            otherwise.
        verify: check every file's SHA-256 against ``checksums.json`` (file sizes
            are always checked). False saves one read of the checkpoint.

    Collective over all ranks. Returns the checkpoint's metadata (``extra`` holds the
    caller's saved state). Raises :class:`CheckpointError` naming the file on every
    rank for missing, truncated or corrupted files.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    path = resolve_checkpoint(root, iteration)
    metadata = CheckpointMetadata.from_file(path / METADATA_FILENAME)
    check_model_config(config, metadata, path / METADATA_FILENAME)
    layout = _parallel_layout(len(model_chunks))  # chunks agree with the parallel state
    with_optimizer = optimizer is not None and load_optimizer
    with_scheduler = scheduler is not None
    for wanted, has, what in (
        (with_optimizer, metadata.has_optimizer, "optimizer"),
        (with_scheduler, metadata.has_scheduler, "optimizer parameter scheduler"),
    ):
        if wanted and not has:
            raise CheckpointError(
                f"{path}: checkpoint has no {what} state (saved without it); load without "
                "it (optimizer: load_optimizer=False)"
            )
    distributed = bool(with_optimizer and _distributed_optimizers(optimizer))
    if with_optimizer and metadata.distributed_optimizer != distributed:
        raise CheckpointError(
            f"{path}: the optimizer state was saved with use_distributed_optimizer="
            f"{str(metadata.distributed_optimizer).lower()}; load it with the same setting, or "
            "load the weights only (load_optimizer=False)"
        )
    _verify_checksums(path, metadata, digest=verify)

    state = _sharded_state_dict(
        model_chunks,
        optimizer if with_optimizer else None,
        scheduler if with_scheduler else None,
        is_loading=True,
    )
    # megatron-core's "unexpected": requested but not in the checkpoint. (Its "missing",
    # stored but not requested, is fine: e.g. optimizer state when loading weights only.)
    try:
        loaded, _, absent = dist_checkpointing.load(
            state, os.fspath(path), strict=StrictHandling.RETURN_UNEXPECTED
        )
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - one line, naming it
        message = type_and_message(_root_cause(exc))
        raise CheckpointError(f"{path}: cannot read the checkpoint ({message})") from exc
    absent = _absent_besides_extra_state(absent)
    if absent:
        raise CheckpointError(
            f"{path}: checkpoint lacks {len(absent)} tensors of this model, e.g. {absent[:4]}"
        )
    for key, chunk in zip(_model_keys(len(model_chunks)), model_chunks, strict=True):
        _load_model_state(unwrap_model(chunk), loaded[key], path)
    if with_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    elif optimizer is not None:
        # Mixed precision keeps fp32 main copies of the parameters: refresh them.
        optimizer.reload_model_params()
    if with_scheduler:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if load_rng:
        _load_rng(path, metadata, layout)
    return metadata


# Transformer Engine modules hold an ``_extra_state`` object each (FP8 scaling metadata,
# empty without FP8), saved as a ShardedObject; megatron's local modules have none, and
# TE's attention module has one that megatron does not save. Everything else has the
# same key in both specs (the local spec saves its norms under TE's names), so a
# checkpoint of either spec loads into the other with these entries alone absent or
# unexpected. Nothing else is tolerated.
_EXTRA_STATE_SUFFIX = "_extra_state"


def _is_extra_state(key: str) -> bool:
    return key.endswith(_EXTRA_STATE_SUFFIX)


def _absent_besides_extra_state(absent: set[str]) -> list[str]:
    """Keys requested from the checkpoint but not in it, other than ``_extra_state``."""
    return sorted(k for k in absent if not _is_extra_state(k))


def _load_model_state(model: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    """``model.load_state_dict(state)``, strict except for ``_extra_state`` entries
    (absent from a checkpoint of the other layer spec; TE modules treat a missing one
    as "no FP8 state")."""
    result = model.load_state_dict(state, strict=False)
    missing = sorted(k for k in result.missing_keys if not _is_extra_state(k))
    unexpected = sorted(k for k in result.unexpected_keys if not _is_extra_state(k))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: the loaded state does not match the model: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}"
        )
