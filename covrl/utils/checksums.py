"""Per-file checksums of a checkpoint directory: ``checksums.json``.

The manifest maps every file of the directory (relative POSIX paths, the manifest
itself excepted) to its size and SHA-256::

    {"algorithm": "sha256",
     "files": {"model.safetensors": {"size": 1234, "sha256": "9f86..."}, ...}}

Sizes are checked cheaply (one ``stat`` per file) on every load; digests cost a full
read and are checked unless the caller opts out. Every problem is reported as one line
that names the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

MANIFEST_FILENAME = "checksums.json"
_ALGORITHM = "sha256"
_CHUNK = 8 * 1024 * 1024


class ChecksumError(RuntimeError):
    """A file is missing, truncated or corrupted, or the manifest is unreadable."""


def file_digest(path: Path) -> dict[str, int | str]:
    """``{"size": bytes, "sha256": hex}`` of one file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, _ALGORITHM: h.hexdigest()}


def list_files(root: Path) -> list[str]:
    """Relative POSIX paths of every file below ``root`` but the manifest, sorted."""
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST_FILENAME:
                out.append(rel)
    return sorted(out)


def digests(root: Path, names: Iterable[str]) -> dict[str, dict[str, int | str]]:
    return {name: file_digest(root / name) for name in names}


def write_manifest(root: Path, entries: dict[str, dict[str, int | str]]) -> None:
    """Write ``<root>/checksums.json`` (the caller fsyncs / renames the directory)."""
    text = json.dumps({"algorithm": _ALGORITHM, "files": dict(sorted(entries.items()))}, indent=1)
    (root / MANIFEST_FILENAME).write_text(text + "\n")


def read_manifest(root: Path) -> dict[str, dict[str, int | str]] | None:
    """The manifest's file entries, None when ``root`` has no manifest."""
    path = root / MANIFEST_FILENAME
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        files = raw["files"]
        if raw.get("algorithm") != _ALGORITHM or not isinstance(files, dict):
            raise ValueError(f"expected algorithm {_ALGORITHM!r} and a files mapping")
        for name, entry in files.items():
            if not isinstance(entry.get("size"), int) or not isinstance(entry.get(_ALGORITHM), str):
                raise ValueError(f"entry {name!r} lacks an integer size or a {_ALGORITHM} digest")
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise ChecksumError(f"{path}: unreadable checksum manifest ({exc})") from exc
    return files


def check_sizes(root: Path, manifest: dict[str, dict[str, int | str]]) -> list[str]:
    """One line per file of the manifest that is missing or has another size."""
    problems = []
    for name, entry in manifest.items():
        path = root / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{path}: missing (listed in {MANIFEST_FILENAME})")
            continue
        if size != entry["size"]:
            problems.append(
                f"{path}: {size} bytes, expected {entry['size']} (truncated or overwritten)"
            )
    return problems


def check_digests(
    root: Path, manifest: dict[str, dict[str, int | str]], names: Iterable[str] | None = None
) -> list[str]:
    """One line per file (of ``names``, default all) whose SHA-256 differs."""
    problems = []
    for name in manifest if names is None else names:
        path = root / name
        try:
            got = file_digest(path)
        except OSError as exc:
            problems.append(f"{path}: cannot be read ({exc.strerror or exc})")
            continue
        if got != manifest[name]:
            what = "size differs" if got["size"] != manifest[name]["size"] else "sha256 mismatch"
            problems.append(f"{path}: {what}, the file is corrupted")
    return problems


def verify_directory(root: str | os.PathLike, *, digest: bool = True) -> int:
    """Check every file of ``root``'s manifest (sizes, and digests unless ``digest`` is
    False); raise :class:`ChecksumError` naming the bad files. Returns the number of
    files checked; raises when there is no manifest."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        raise ChecksumError(f"{root / MANIFEST_FILENAME}: no checksum manifest")
    problems = check_sizes(root, manifest)
    if not problems and digest:
        problems = check_digests(root, manifest)
    if problems:
        raise ChecksumError("; ".join(problems))
    return len(manifest)
