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
            rng/rank_00000.pt ...           every rank's RNG states
            checksums.json                  size and SHA-256 of every file
            covrl_checkpoint.json           run metadata: the completion marker
        .iter_0000020.tmp-3f2a9c1e/         an interrupted save: never loaded, removed by
                                            the next save into <root>

Saved state dict (the keys of the nested dict; values are sharded by megatron-core):

    ``model`` (one chunk) or ``model0`` .. ``model{V-1}`` (virtual pipeline chunks):
        ``chunk.sharded_state_dict()``
    ``optimizer``: ``optimizer.sharded_state_dict(model state)`` (Adam moments and fp32
        main parameters keyed by their parameter's global key; the step in common)
    ``opt_param_scheduler``: ``scheduler.state_dict()``

RNG states (``rng/rank_<rank>.pt``, one file per global rank): Python's ``random``,
NumPy's global generator, torch's CPU generator, every CUDA device's generator, and
megatron's model-parallel RNG tracker (its named streams). They are restored on load
when the layout (TP, PP, VPP, world size) is the one saved, so rank ``r`` gets rank
``r``'s states back; at another layout they are skipped with a warning.

Atomic save: every rank writes into a temporary sibling directory
``<root>/.iter_NNNNNNN.tmp-<id>``; rank 0 then writes the checksum manifest and the
completion marker, fsyncs the files and the directory, renames it to ``iter_NNNNNNN``
and finally replaces the tracker file (write a temporary file, fsync, ``os.replace``,
fsync the directory). A crash at any point leaves either the previous state (tracker
and checkpoints unchanged; at most a hidden ``.tmp`` directory, which is not a
checkpoint) or the new complete checkpoint. With ``overwrite`` a crash between moving
the old copy aside and renaming the new one leaves two complete hidden copies: loading
reads the new one, and the next save renames it back into place
(:func:`covrl.utils.atomic_io.recover_dir`). Loading only accepts a directory with its
completion marker and megatron's ``metadata.json``.

The tracker never moves back: it holds the newest complete iteration under ``<root>``,
so saving an older iteration than the tracker's keeps the tracker (with a warning).

Integrity: ``checksums.json`` records every file's size and SHA-256 (each rank hashes
the shards it wrote). Loading checks every size (missing or truncated files are named)
and, unless ``verify=False``, every digest, spread over the ranks.

Save and load are collective over all ranks of the default process group (every TP,
PP and DP rank: megatron-core deduplicates data-parallel replicas); ``<root>`` must be a
file system shared by the ranks. One writer per ``<root>`` at a time. A save that fails
on some ranks inside megatron-core's collective writer cannot be reported by the
others (they wait in its barrier): the failing rank then ends the job through
:func:`covrl.parallel.liveness.abort`, which prints the cause on every rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import random
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from covrl.models.hf_config import PolicyModelConfig
from covrl.models.hf_weights import unwrap_model
from covrl.parallel import get_device
from covrl.utils import checksums
from covrl.utils.atomic_io import (
    describe_write_error,
    free_bytes,
    fsync_tree,
    recover_dir,
    recoverable_dir,
    remove,
    replace_dir,
    temporary_sibling,
    write_text_atomic,
)

logger = logging.getLogger(__name__)

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
METADATA_FILENAME = "covrl_checkpoint.json"
# Written by dist_checkpointing.save after every rank has finished its shards.
_DIST_METADATA_FILENAME = "metadata.json"
_FORMAT = "covrl-megatron"
_FORMAT_VERSION = 1
RNG_DIRNAME = "rng"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
# Hidden siblings of interrupted saves / overwrites: .iter_NNNNNNN.tmp-<id>, .old-<id>.
_SIBLING_RE = re.compile(r"^\.(iter_\d{7,})\.(tmp|old)-[0-9a-f]+$")
_TRACKER_TMP_PREFIX = f".{TRACKER_FILENAME}.tmp-"
# Free space wanted beyond the tensors' bytes (megatron's metadata, common.pt, RNG).
_SPACE_MARGIN_BYTES = 4 * 1024 * 1024


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
    tokenizer files are copied on export). ``extra`` is the caller's JSON state (the
    trainer's step, data cursor and config).
    """

    iteration: int
    model_config: dict[str, Any]
    params_dtype: str
    make_vocab_size_divisible_by: int
    parallel: dict[str, int | None]
    has_optimizer: bool
    has_scheduler: bool
    hf_source: str | None = None
    has_rng: bool = False  # rng/rank_<r>.pt of every rank
    has_checksums: bool = False  # checksums.json
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


def _has_checkpoint_files(path: Path) -> bool:
    return (path / METADATA_FILENAME).is_file() and (path / _DIST_METADATA_FILENAME).is_file()


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete checkpoint: an ``iter_*`` directory with the
    completion marker and megatron's ``metadata.json``."""
    path = Path(path)
    return _ITER_RE.match(path.name) is not None and _has_checkpoint_files(path)


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
        # An overwrite interrupted between its two renames: read the complete copy.
        recovered = recoverable_dir(path, _has_checkpoint_files)
        if recovered is not None:
            logger.warning("%s is missing; reading %s (an interrupted overwrite)", path, recovered)
            return recovered
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


# ---------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """This process's RNG states: Python ``random``, NumPy's global generator, torch's
    CPU generator, every CUDA device's generator and megatron's model-parallel tracker
    (when it is initialised). Plain lists, ints and tensors: loadable with
    ``torch.load(weights_only=True)``."""
    import numpy as np

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "megatron_tracker": {},
    }
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    if tracker.is_initialized():
        state["megatron_tracker"] = {k: v.clone() for k, v in tracker.get_states().items()}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only when this process has
    as many devices)."""
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch_cpu"])
    cuda = state["torch_cuda"]
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            raise CheckpointError(
                f"RNG state has {len(cuda)} CUDA generators, this process sees "
                f"{torch.cuda.device_count()} devices"
            )
        torch.cuda.set_rng_state_all(cuda)
    if state["megatron_tracker"]:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(dict(state["megatron_tracker"]))


def _rng_file(path: Path, rank: int) -> Path:
    return path / RNG_DIRNAME / f"rank_{rank:05d}.pt"


def _save_rng(tmp: Path) -> None:
    file = _rng_file(tmp, dist.get_rank())
    file.parent.mkdir(exist_ok=True)
    with open(file, "wb") as f:
        torch.save(rng_state(), f)
        f.flush()
        os.fsync(f.fileno())


def _load_rng(path: Path, metadata: CheckpointMetadata, layout: dict[str, int | None]) -> bool:
    """Restore this rank's RNG states when the layout matches; False when skipped."""
    if not metadata.has_rng or metadata.parallel != layout:
        if dist.get_rank() == 0:
            why = (
                "the checkpoint has none"
                if not metadata.has_rng
                else f"saved at {metadata.parallel}, loading at {layout}"
            )
            logger.warning("%s: RNG states not restored (%s)", path, why)
        return False
    file = _rng_file(path, dist.get_rank())
    try:
        state = torch.load(file, weights_only=True)
        set_rng_state(state)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line naming the file
        raise CheckpointError(
            f"{file}: cannot restore RNG states ({type(exc).__name__}: {exc})"
        ) from exc
    return True


# ---------------------------------------------------------------------------- integrity
_OWN_SHARD_RE = re.compile(r"^__(\d+)_\d+\.distcp$")


def _files_of_rank(tmp: Path, rank: int) -> list[str]:
    """Files this rank wrote (its ``__<rank>_<i>.distcp`` shards and RNG file); rank 0
    also takes every file that no rank claims (megatron's metadata, common state)."""
    names = checksums.list_files(tmp)
    rng_prefix = f"{RNG_DIRNAME}/rank_"
    mine = []
    for name in names:
        m = _OWN_SHARD_RE.match(name)
        if m:
            owner = int(m.group(1))
        elif name.startswith(rng_prefix):
            owner = int(name[len(rng_prefix) :].split(".")[0])
        else:
            owner = 0
        if owner == rank:
            mine.append(name)
    return mine


def _write_checksums(tmp: Path, *, rng: bool = False) -> str | None:
    """Every rank writes its RNG states (``rng``) and hashes its own files, rank 0
    writes the manifest (collective). Returns an error message (on rank 0, for any
    rank's failure) or None."""
    try:
        if rng:
            _save_rng(tmp)
        local: dict[str, Any] | str = checksums.digests(tmp, _files_of_rank(tmp, dist.get_rank()))
    except OSError as exc:
        local = describe_write_error(exc, tmp)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.gather_object(local, gathered if dist.get_rank() == 0 else None, dst=0)
    if dist.get_rank() != 0:
        return None
    errors = [f"rank {r}: {part}" for r, part in enumerate(gathered) if isinstance(part, str)]
    if errors:
        return "; ".join(errors)
    try:
        entries = {k: v for part in gathered for k, v in part.items()}
        unclaimed = sorted(set(checksums.list_files(tmp)) - set(entries))
        entries.update(checksums.digests(tmp, unclaimed))  # e.g. another rank numbering
        checksums.write_manifest(tmp, entries)
    except OSError as exc:
        return describe_write_error(exc, tmp)
    return None


def _verify_checksums(path: Path, metadata: CheckpointMetadata, *, digest: bool) -> None:
    """Sizes of every file on every rank; digests spread over the ranks. Raises the
    same :class:`CheckpointError` on every rank (collective)."""
    problems: list[str] = []
    if metadata.has_checksums:
        try:
            manifest = checksums.read_manifest(path)
            if manifest is None:
                raise checksums.ChecksumError(
                    f"{path / checksums.MANIFEST_FILENAME}: missing (the metadata says "
                    "the checkpoint has one)"
                )
            problems = checksums.check_sizes(path, manifest)
            if not problems and digest:
                names = sorted(manifest)[dist.get_rank() :: dist.get_world_size()]
                problems = checksums.check_digests(path, manifest, names)
        except checksums.ChecksumError as exc:
            problems = [str(exc)]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, problems)
    found = sorted({p for part in everyone for p in part})
    if found:
        raise CheckpointError(f"{path}: checkpoint failed verification: " + "; ".join(found))


# ---------------------------------------------------------------------------- writing
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
    _broadcast_status(status)


_fork_guard_active = False
_fork_guard_installed = False


def _die_with_parent() -> None:
    """In a child forked while saving: get SIGKILL when the saving process dies."""
    if not _fork_guard_active or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


@contextlib.contextmanager
def _writer_processes_die_with_rank() -> Iterator[None]:
    """Make megatron-core's checkpoint writer leave nothing behind when this process is
    killed: its forked writer processes die with it (``PR_SET_PDEATHSIG``), and the
    spawn-context ``multiprocessing.Manager`` it starts for the write results (plus the
    resource tracker that comes with it, both of which outlive a SIGKILL) is replaced by
    an in-process queue: a synchronous save collects the results in this process."""
    global _fork_guard_active, _fork_guard_installed
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    if not _fork_guard_installed:
        os.register_at_fork(after_in_child=_die_with_parent)
        _fork_guard_installed = True
    _fork_guard_active = True
    try:
        yield
    finally:
        _fork_guard_active = False


def _root_cause(exc: BaseException) -> BaseException:
    """The first rank's own exception inside torch.distributed.checkpoint's
    ``CheckpointException`` (a ``BaseException`` holding every failing rank's error)."""
    if isinstance(exc, CheckpointException) and exc.failures:
        cause = next(iter(exc.failures.values()))
        return cause[0] if isinstance(cause, tuple) else cause
    return exc


def _save_failed(final: Path, where: Path, exc: BaseException) -> CheckpointError:
    """A failure inside megatron-core's collective writer: peers may be blocked in it,
    so with more than one rank the job is ended everywhere with this message."""
    message = f"saving checkpoint {final} failed: {describe_write_error(_root_cause(exc), where)}"
    if dist.get_world_size() > 1:
        from covrl.parallel import liveness

        liveness.abort(message)
    return CheckpointError(message)


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
    )
    metadata_text = metadata.to_json()  # fails early on a non-serialisable extra

    # Rank 0 prepares the temporary directory and shares its name.
    box: list[Any] = [None, None]
    if dist.get_rank() == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _tidy_root(root)
            if final.exists() and not overwrite:
                raise FileExistsError(f"{final} exists (pass overwrite=True to replace it)")
            tmp = temporary_sibling(final)
            tmp.mkdir()
            box = [None, os.fspath(tmp)]
        except Exception as exc:  # noqa: BLE001 - raised on every rank below
            box = [f"saving checkpoint {final} failed: {describe_write_error(exc, root)}", None]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise CheckpointError(box[0])
    tmp = Path(box[1])

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
    _broadcast_status(status)
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
    _broadcast_status(status)
    return final


# ---------------------------------------------------------------------------- layer specs
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
        cause = _root_cause(exc)
        message = " ".join(f"{type(cause).__name__}: {cause}".split())
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
