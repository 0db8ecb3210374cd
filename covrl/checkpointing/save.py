"""The atomic save: a checkpoint appears under its final name complete, or not at all.

Every rank writes into a temporary sibling directory ``<root>/.iter_NNNNNNN.tmp-<id>``;
rank 0 then writes the checksum manifest and the completion marker, fsyncs the files
and the directory, renames it to ``iter_NNNNNNN`` and finally replaces the tracker file
(write a temporary file, fsync, ``os.replace``, fsync the directory). A crash at any
point leaves either the previous state (tracker and checkpoints unchanged; at most a
hidden ``.tmp`` directory, which is not a checkpoint) or the new complete checkpoint.
With ``overwrite`` a crash between moving the old copy aside and renaming the new one
leaves two complete hidden copies: loading reads the new one, and the next save renames
it back into place (:func:`covrl.utils.atomic_io.recover_dir`).

The tracker never moves back: it holds the newest complete iteration under ``<root>``,
so saving an older iteration than the tracker's keeps the tracker (with a warning).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from covrl.checkpointing.errors import CheckpointError, _root_cause
from covrl.checkpointing.integrity import _write_checksums
from covrl.checkpointing.layout import (
    _SIBLING_RE,
    _TRACKER_TMP_PREFIX,
    METADATA_FILENAME,
    TRACKER_FILENAME,
    _has_checkpoint_files,
    checkpoint_path,
    list_checkpoints,
)
from covrl.checkpointing.metadata import (
    CheckpointMetadata,
    _dtype_name,
    _model_config_dict,
    _parallel_layout,
)
from covrl.checkpointing.space import _check_free_space
from covrl.checkpointing.state_dict import _distributed_optimizers, _sharded_state_dict
from covrl.checkpointing.writer import _writer_processes_die_with_rank
from covrl.models.hf_config import PolicyModelConfig
from covrl.parallel import raise_if_any_rank
from covrl.utils.atomic_io import (
    describe_write_error,
    fsync_tree,
    recover_dir,
    remove,
    replace_dir,
    temporary_sibling,
    write_text_atomic,
)

logger = logging.getLogger(__name__)


def _remove_quietly(path: Path) -> None:
    remove(path)


def _tidy_root(root: Path) -> None:
    """Rank 0, before a save: finish overwrites interrupted between their renames and
    remove what interrupted saves left (hidden temporary directories and tracker files)."""
    names = {m.group(1) for m in map(_SIBLING_RE.match, os.listdir(root)) if m}
    for name in sorted(names):
        recovered = recover_dir(root / name, _has_checkpoint_files)
        if recovered is not None:
            logger.warning(
                "recovered %s from %s (an interrupted overwrite)", root / name, recovered
            )
    for child in root.iterdir():
        if child.name.startswith(_TRACKER_TMP_PREFIX) or _SIBLING_RE.match(child.name):
            _remove_quietly(child)


def _save_failed(final: Path, where: Path, exc: BaseException) -> CheckpointError:
    """A failure inside megatron-core's collective writer: peers may be blocked in it,
    so with more than one rank the job is ended everywhere with this message."""
    message = f"saving checkpoint {final} failed: {describe_write_error(_root_cause(exc), where)}"
    if dist.get_world_size() > 1:
        from covrl.parallel import liveness

        liveness.abort(message)
    return CheckpointError(message)


def save_checkpoint(
    root: str | os.PathLike,
    iteration: int,
    model_chunks: Sequence[torch.nn.Module],
    config: PolicyModelConfig,
    *,
    optimizer=None,
    scheduler=None,
    hf_source: str | os.PathLike | None = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    rng: bool = True,
) -> Path:
    """Save ``<root>/iter_NNNNNNN`` atomically and point the tracker at it.

    Args:
        root: checkpoint root directory (created if missing).
        iteration: the training iteration (the directory name and the tracker value).
        model_chunks: this rank's model chunks (bare ``GPTModel`` or wrapped in
            ``Float16Module`` / DDP), one per virtual pipeline stage.
        config: the model's config; stored as its Hugging Face config dict.
        optimizer: a megatron-core optimizer (e.g. ``PolicyEngine.optimizer``) whose
            state is saved keyed by the model's parameters.
        scheduler: an ``OptimizerParamScheduler`` whose state is saved.
        hf_source: the Hugging Face checkpoint the weights came from (tokenizer files
            are copied from it on export).
        extra: JSON-serialisable run state stored as is (the trainer's step, data
            cursor, config); returned by :func:`load_checkpoint` in ``metadata.extra``.
        overwrite: replace an existing ``iter_NNNNNNN`` (crash-safe: see the module
            docstring).
        rng: store every rank's RNG states (:func:`rng_state`).

    The tracker moves to ``iteration`` unless a newer complete checkpoint exists under
    ``root``; then it stays there (a warning says so). Collective over all ranks.
    Returns the checkpoint directory. Raises :class:`CheckpointError` on every rank
    if rank 0's part failed (or the disk is too small); the temporary directory is
    then removed and the tracker is unchanged.
    """
    from megatron.core import dist_checkpointing

    root = Path(root).absolute()
    final = checkpoint_path(root, iteration)
    metadata = CheckpointMetadata(
        iteration=iteration,
        model_config=_model_config_dict(config),
        params_dtype=_dtype_name(config.params_dtype),
        make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
        parallel=_parallel_layout(len(model_chunks)),
        has_optimizer=optimizer is not None,
        has_scheduler=scheduler is not None,
        hf_source=os.fspath(Path(hf_source).absolute()) if hf_source is not None else None,
        extra=dict(extra or {}),
        has_rng=rng,
        has_checksums=True,
        distributed_optimizer=bool(optimizer is not None and _distributed_optimizers(optimizer)),
    )
    metadata_text = metadata.to_json()  # fails early on a non-serialisable extra

    # Rank 0 prepares the temporary directory and shares its name.
    status, box = None, [None]
    if dist.get_rank() == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _tidy_root(root)
            if final.exists() and not overwrite:
                raise FileExistsError(f"{final} exists (pass overwrite=True to replace it)")
            tmp = temporary_sibling(final)
            tmp.mkdir()
            box = [os.fspath(tmp)]
        except Exception as exc:  # noqa: BLE001 - raised on every rank below
            status = f"saving checkpoint {final} failed: {describe_write_error(exc, root)}"
    raise_if_any_rank(status, dist.group.WORLD, error_type=CheckpointError)
    dist.broadcast_object_list(box, src=0)
    tmp = Path(box[0])

    state = _sharded_state_dict(model_chunks, optimizer, scheduler, is_loading=False)
    try:
        _check_free_space(root, final, state)
    except CheckpointError:
        if dist.get_rank() == 0:
            _remove_quietly(tmp)
        raise
    try:
        with _writer_processes_die_with_rank():
            dist_checkpointing.save(state, os.fspath(tmp))  # ends with a barrier
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - see _save_failed
        if dist.get_rank() == 0:
            _remove_quietly(tmp)
        raise _save_failed(final, root, exc) from exc
    # The RNG files go in after megatron's save: it takes a non-empty directory for an
    # interrupted earlier save ("Overwriting old incomplete / corrupted checkpoint").
    status = _write_checksums(tmp, rng=rng)
    if status is not None:
        status = f"saving checkpoint {final} failed: {status}"
        _remove_quietly(tmp)  # (rank 0)
    raise_if_any_rank(status, dist.group.WORLD, error_type=CheckpointError)
    status = None

    # Rank 0 commits: completion marker, fsync, rename, tracker.
    if dist.get_rank() == 0:
        try:
            (tmp / METADATA_FILENAME).write_text(metadata_text)
            fsync_tree(tmp)
            replace_dir(tmp, final)
            newest = max(list_checkpoints(root))
            if newest != iteration:
                logger.warning(
                    "saved %s; the tracker stays at the newer complete iteration %d",
                    final,
                    newest,
                )
            write_text_atomic(root / TRACKER_FILENAME, f"{newest}\n")
        except Exception as exc:  # noqa: BLE001 - raised on every rank below
            status = f"saving checkpoint {final} failed: {describe_write_error(exc, root)}"
            _remove_quietly(tmp)
    raise_if_any_rank(status, dist.group.WORLD, error_type=CheckpointError)
    return final
