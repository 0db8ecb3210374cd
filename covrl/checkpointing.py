"""Megatron checkpoints of the policy: megatron-core ``dist_checkpointing``, reshardable, atomic.

A checkpoint holds this run's model chunks (and optionally the Megatron optimizer, the
optimizer parameter scheduler and a small JSON of run metadata) in megatron-core's
``torch_dist`` format. Tensors are stored under the *global* keys of the models'
``sharded_state_dict()`` (layer numbers include the PP / VPP offset, TP shards are
pieces of one global tensor), so a checkpoint saved at one TP / PP / VPP layout loads
at any other layout the model supports.

Directory layout (as Megatron-LM)::

    <root>/
        latest_checkpointed_iteration.txt   "10": the newest complete checkpoint
        iter_0000010/                       a complete checkpoint
            metadata.json, common.pt,       megatron-core dist_checkpointing files
            .metadata, __<rank>_<i>.distcp
            covrl_checkpoint.json           run metadata, written last: the completion marker
        .iter_0000020.tmp-3f2a9c1e/         an interrupted save: never loaded, removed by
                                            the next save into <root>

Saved state dict (the keys of the nested dict; values are sharded by megatron-core):

    ``model`` (one chunk) or ``model0`` .. ``model{V-1}`` (virtual pipeline chunks):
        ``chunk.sharded_state_dict()``
    ``optimizer``: ``optimizer.sharded_state_dict(model state)`` (Adam moments and fp32
        main parameters keyed by their parameter's global key; the step in common)
    ``opt_param_scheduler``: ``scheduler.state_dict()``

Atomic save: every rank writes into a temporary sibling directory
``<root>/.iter_NNNNNNN.tmp-<id>``; rank 0 then writes the completion marker, fsyncs the
files and the directory, renames it to ``iter_NNNNNNN`` and finally replaces the tracker
file (write a temporary file, fsync, ``os.replace``, fsync the directory). A crash at any
point leaves either the previous state (tracker and checkpoints unchanged; at most a
hidden ``.tmp`` directory, which is not a checkpoint) or the new complete checkpoint.
Loading only accepts an ``iter_*`` directory with its completion marker and megatron's
``metadata.json``.

Save and load are collective over all ranks of the default process group (every TP,
PP and DP rank: megatron-core deduplicates data-parallel replicas); ``<root>`` must be a
file system shared by the ranks. One writer per ``<root>`` at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from covrl.models.hf_config import PolicyModelConfig
from covrl.models.hf_weights import unwrap_model
from covrl.utils.atomic_io import (
    fsync_tree,
    replace_dir,
    temporary_sibling,
    write_text_atomic,
)

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
METADATA_FILENAME = "covrl_checkpoint.json"
# Written by dist_checkpointing.save after every rank has finished its shards.
_DIST_METADATA_FILENAME = "metadata.json"
_FORMAT = "covrl-megatron"
_FORMAT_VERSION = 1
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
_TMP_RE = re.compile(r"^\.iter_\d{7,}\.tmp-[0-9a-f]+$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model."""


# ---------------------------------------------------------------------------- metadata
@dataclass(frozen=True)
class CheckpointMetadata:
    """The run metadata stored as ``covrl_checkpoint.json`` in each checkpoint.

    ``model_config`` is the Hugging Face config dict of the model (with ``dtype`` set to
    the parameters' dtype); ``parallel`` the layout at save time
    (``tensor_model_parallel_size``, ``pipeline_model_parallel_size``,
    ``virtual_pipeline_model_parallel_size``, ``data_parallel_size``, ``world_size``).
    ``hf_source`` is the Hugging Face checkpoint the weights came from, if known (its
    tokenizer files are copied on export).
    """

    iteration: int
    model_config: dict[str, Any]
    params_dtype: str
    make_vocab_size_divisible_by: int
    parallel: dict[str, int | None]
    has_optimizer: bool
    has_scheduler: bool
    hf_source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = _FORMAT
    format_version: int = _FORMAT_VERSION

    def policy_config(self) -> PolicyModelConfig:
        """The :class:`PolicyModelConfig` the checkpoint was saved with."""
        return PolicyModelConfig.from_hf(
            self.model_config,
            params_dtype=self.params_dtype,
            make_vocab_size_divisible_by=self.make_vocab_size_divisible_by,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> CheckpointMetadata:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read checkpoint metadata ({exc})") from exc
        if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
            raise CheckpointError(f"{path}: field format is not {_FORMAT!r}")
        if raw.get("format_version") != _FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: field format_version={raw.get('format_version')!r} is not supported "
                f"(expected {_FORMAT_VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = (
            set(raw) - names,
            {
                f.name
                for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            }
            - set(raw),
        )
        if unknown or missing:
            raise CheckpointError(
                f"{path}: unexpected fields {sorted(unknown)} / missing fields {sorted(missing)}"
            )
        return cls(**raw)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _model_config_dict(config: PolicyModelConfig) -> dict[str, Any]:
    hf = config.to_hf_config().to_dict()
    hf["dtype"] = _dtype_name(config.params_dtype)
    hf.pop("torch_dtype", None)
    return hf


def check_model_config(
    config: PolicyModelConfig, metadata: CheckpointMetadata, source: str | os.PathLike
) -> None:
    """Raise :class:`CheckpointError` naming every field where ``config`` differs from
    the checkpoint's model (``source`` names the metadata file in the message)."""
    saved = metadata.policy_config()
    diffs = [
        f"{f.name}: checkpoint {getattr(saved, f.name)!r}, model {getattr(config, f.name)!r}"
        for f in dataclasses.fields(PolicyModelConfig)
        if f.compare and getattr(saved, f.name) != getattr(config, f.name)
    ]
    if diffs:
        raise CheckpointError(
            f"{source}: model config differs from the checkpoint's: " + "; ".join(diffs)
        )


# ---------------------------------------------------------------------------- layout
def checkpoint_path(root: str | os.PathLike, iteration: int) -> Path:
    """``<root>/iter_NNNNNNN`` (seven digits, as Megatron-LM)."""
    if iteration < 0:
        raise ValueError(f"iteration={iteration}: expected >= 0")
    return Path(root) / f"iter_{iteration:07d}"


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete checkpoint: an ``iter_*`` directory with the
    completion marker and megatron's ``metadata.json``."""
    path = Path(path)
    return (
        _ITER_RE.match(path.name) is not None
        and (path / METADATA_FILENAME).is_file()
        and (path / _DIST_METADATA_FILENAME).is_file()
    )


def list_checkpoints(root: str | os.PathLike) -> list[int]:
    """Iterations of the complete checkpoints under ``root``, ascending (temporary and
    incomplete directories are left out)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _ITER_RE.match(child.name)
        if m and is_complete(child):
            found.append(int(m.group(1)))
    return sorted(found)


def read_tracker(root: str | os.PathLike) -> int | None:
    """The iteration in ``<root>/latest_checkpointed_iteration.txt``, None without one."""
    tracker = Path(root) / TRACKER_FILENAME
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text!r}")
    return int(text)


def resolve_checkpoint(root: str | os.PathLike, iteration: int | None = None) -> Path:
    """The directory of a complete checkpoint.

    ``root`` is a checkpoint root (``iteration`` or, when None, the tracker's) or a
    checkpoint directory ``iter_NNNNNNN`` itself. Raises :class:`CheckpointError` naming
    the path when the checkpoint is missing or incomplete.
    """
    root = Path(root)
    if _ITER_RE.match(root.name) and iteration is None:
        path = root
    else:
        if not root.is_dir():
            raise CheckpointError(f"{root}: checkpoint directory does not exist")
        if iteration is None:
            iteration = read_tracker(root)
            if iteration is None:
                complete = list_checkpoints(root)
                hint = f" (complete checkpoints: {complete})" if complete else ""
                raise CheckpointError(
                    f"{root / TRACKER_FILENAME}: no tracker file, so no complete checkpoint "
                    f"to load; pass an iteration{hint}"
                )
        path = checkpoint_path(root, iteration)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint does not exist")
    if not is_complete(path):
        missing = [
            n for n in (METADATA_FILENAME, _DIST_METADATA_FILENAME) if not (path / n).is_file()
        ]
        raise CheckpointError(f"{path}: incomplete checkpoint (missing {', '.join(missing)})")
    return path


def read_metadata(root: str | os.PathLike, iteration: int | None = None) -> CheckpointMetadata:
    """The run metadata of a complete checkpoint (see :func:`resolve_checkpoint`)."""
    return CheckpointMetadata.from_file(resolve_checkpoint(root, iteration) / METADATA_FILENAME)


def _remove_quietly(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------- state dicts
def _parallel_layout(num_chunks: int) -> dict[str, int | None]:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    if (vpp or 1) != num_chunks:
        raise ValueError(
            f"{num_chunks} model chunks for virtual_pipeline_model_parallel_size={vpp}"
        )
    world = dist.get_world_size()
    return {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "virtual_pipeline_model_parallel_size": vpp,
        "data_parallel_size": world // (tp * pp),
        "world_size": world,
    }


def _model_keys(num_chunks: int) -> list[str]:
    # Megatron-LM's names; only the nesting, the tensors are found by their global keys.
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def _sharded_state_dict(
    model_chunks: Sequence[torch.nn.Module], optimizer, scheduler, *, is_loading: bool
) -> dict[str, Any]:
    # Keys of the bare GPTModel: wrappers (DDP, Float16Module) must not change them.
    state: dict[str, Any] = {
        key: unwrap_model(chunk).sharded_state_dict()
        for key, chunk in zip(_model_keys(len(model_chunks)), model_chunks, strict=True)
    }
    if optimizer is not None:
        # The optimizer's state is keyed by its parameters' sharded tensors.
        model_state = {k: state[k] for k in _model_keys(len(model_chunks))}
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=is_loading)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    return state


def _broadcast_status(status: str | None) -> None:
    """Share rank 0's error (or None) with every rank and raise it everywhere."""
    box = [status]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise CheckpointError(box[0])


# ---------------------------------------------------------------------------- save
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
        extra: JSON-serialisable run metadata stored as is.
        overwrite: replace an existing ``iter_NNNNNNN`` (there is a short window in
            which neither the old nor the new directory exists under that name).

    Collective over all ranks. Returns the checkpoint directory. Raises
    :class:`CheckpointError` on every rank if rank 0's part failed; the temporary
    directory is then removed and the tracker is unchanged.
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
    )
    metadata_text = metadata.to_json()  # fails early on a non-serialisable extra

    # Rank 0 prepares the temporary directory and shares its name.
    box: list[Any] = [None, None]
    if dist.get_rank() == 0:
        try:
            if final.exists() and not overwrite:
                raise FileExistsError(f"{final} exists (pass overwrite=True to replace it)")
            root.mkdir(parents=True, exist_ok=True)
            for child in root.iterdir():  # leftovers of interrupted saves
                if _TMP_RE.match(child.name):
                    _remove_quietly(child)
            tmp = temporary_sibling(final)
            tmp.mkdir()
            box = [None, os.fspath(tmp)]
        except Exception as exc:  # noqa: BLE001 - raised on every rank below
            box = [f"saving checkpoint {final} failed: {type(exc).__name__}: {exc}", None]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise CheckpointError(box[0])
    tmp = Path(box[1])

    state = _sharded_state_dict(model_chunks, optimizer, scheduler, is_loading=False)
    dist_checkpointing.save(state, os.fspath(tmp))  # ends with a barrier over all ranks

    # Rank 0 commits: completion marker, fsync, rename, tracker.
    status = None
    if dist.get_rank() == 0:
        try:
            (tmp / METADATA_FILENAME).write_text(metadata_text)
            fsync_tree(tmp)
            replace_dir(tmp, final)
            write_text_atomic(root / TRACKER_FILENAME, f"{iteration}\n")
        except Exception as exc:  # noqa: BLE001 - raised on every rank below
            status = f"saving checkpoint {final} failed: {type(exc).__name__}: {exc}"
            _remove_quietly(tmp)
    _broadcast_status(status)
    return final


# ---------------------------------------------------------------------------- load
def load_checkpoint(
    root: str | os.PathLike,
    model_chunks: Sequence[torch.nn.Module],
    config: PolicyModelConfig,
    *,
    iteration: int | None = None,
    optimizer=None,
    scheduler=None,
    load_optimizer: bool = True,
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

    Collective over all ranks. Returns the checkpoint's metadata.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    path = resolve_checkpoint(root, iteration)
    metadata = CheckpointMetadata.from_file(path / METADATA_FILENAME)
    check_model_config(config, metadata, path / METADATA_FILENAME)
    _parallel_layout(len(model_chunks))  # chunks agree with the parallel state
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

    state = _sharded_state_dict(
        model_chunks,
        optimizer if with_optimizer else None,
        scheduler if with_scheduler else None,
        is_loading=True,
    )
    # megatron-core's "unexpected": requested but not in the checkpoint. (Its "missing",
    # stored but not requested, is fine: e.g. optimizer state when loading weights only.)
    loaded, _, absent = dist_checkpointing.load(
        state, os.fspath(path), strict=StrictHandling.RETURN_UNEXPECTED
    )
    if absent:
        raise CheckpointError(
            f"{path}: checkpoint lacks {len(absent)} tensors of this model, e.g. "
            f"{sorted(absent)[:4]}"
        )
    for key, chunk in zip(_model_keys(len(model_chunks)), model_chunks, strict=True):
        unwrap_model(chunk).load_state_dict(loaded[key], strict=True)
    if with_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    elif optimizer is not None:
        # Mixed precision keeps fp32 main copies of the parameters: refresh them.
        optimizer.reload_model_params()
    if with_scheduler:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    return metadata
