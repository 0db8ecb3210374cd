"""Checksums of a checkpoint: ``checksums.json`` records every file's size and SHA-256.

On save each rank hashes the shards it wrote and rank 0 writes the manifest. On load
every size is checked (missing or truncated files are named) and, unless
``verify=False``, every digest, spread over the ranks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch.distributed as dist

from covrl.checkpointing.errors import CheckpointError
from covrl.checkpointing.metadata import CheckpointMetadata
from covrl.checkpointing.rng import RNG_DIRNAME, _save_rng
from covrl.utils import checksums
from covrl.utils.atomic_io import describe_write_error

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
