"""Where checkpoints live under a root, and which one the tracker points at.

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

A directory is a checkpoint only with its completion marker and megatron's
``metadata.json``; hidden siblings are never loaded, except the complete copy that an
overwrite interrupted between its two renames leaves.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from covrl.checkpointing.errors import CheckpointError
from covrl.utils.atomic_io import recoverable_dir

logger = logging.getLogger(__name__)


TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
METADATA_FILENAME = "covrl_checkpoint.json"
# Written by dist_checkpointing.save after every rank has finished its shards.
_DIST_METADATA_FILENAME = "metadata.json"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
# Hidden siblings of interrupted saves / overwrites: .iter_NNNNNNN.tmp-<id>, .old-<id>.
_SIBLING_RE = re.compile(r"^\.(iter_\d{7,})\.(tmp|old)-[0-9a-f]+$")
_TRACKER_TMP_PREFIX = f".{TRACKER_FILENAME}.tmp-"


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
