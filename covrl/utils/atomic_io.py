"""Crash-safe file and directory writes.

A checkpoint is built in a hidden temporary sibling directory ``.<name>.tmp-<id>``,
every file and folder in it is fsynced, and only then is it renamed into place; a small
pointer file (a tracker) is replaced the same way. A crash at any point leaves either
the old state or the new one, never a half-written directory under the final name.

Replacing an existing directory takes two renames (old -> ``.<name>.old-<id>``, new
-> ``<name>``); a crash between them leaves no ``<name>`` but two complete siblings.
:func:`recoverable_dir` finds the one to use (the new copy when it is complete, else
the old one) without changing anything, and :func:`recover_dir` renames it back into
place and removes the leftovers; writers call it before they write again.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from covrl.utils.errors import type_and_message


def fsync_path(path: Path) -> None:
    """fsync one file or directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file below ``path``, then the directories, deepest first."""
    dirs = []
    for dirpath, _, files in os.walk(path):
        dirs.append(Path(dirpath))
        for name in files:
            fsync_path(Path(dirpath) / name)
    for d in reversed(dirs):
        fsync_path(d)


def temporary_sibling(path: Path, tag: str = "tmp") -> Path:
    """A hidden, unique name next to ``path`` (same filesystem, so rename is atomic)."""
    return path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}"


def siblings(path: Path, tag: str) -> list[Path]:
    """The ``.<name>.<tag>-<id>`` siblings of ``path``, newest first."""
    if not path.parent.is_dir():
        return []
    prefix = f".{path.name}.{tag}-"
    found = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def replace_dir(tmp: Path, path: Path) -> None:
    """Rename the finished directory ``tmp`` to ``path``, moving an existing ``path``
    aside first (removed once the new one is in place), and fsync the parent."""
    old = None
    if path.exists():
        old = temporary_sibling(path, "old")
        path.rename(old)
    tmp.rename(path)
    fsync_path(path.parent)
    if old is not None:
        shutil.rmtree(old)


def recoverable_dir(path: Path, is_complete: Callable[[Path], bool]) -> Path | None:
    """What to read when ``path`` is missing after an interrupted :func:`replace_dir`:
    the newest complete temporary copy, else the newest complete old copy. None when
    ``path`` exists or no old copy does (then no overwrite was under way). Changes
    nothing on disk."""
    if path.exists() or not siblings(path, "old"):
        return None  # no overwrite was under way: a lone .tmp copy is an unfinished write
    for tag in ("tmp", "old"):
        for candidate in siblings(path, tag):
            if candidate.is_dir() and is_complete(candidate):
                return candidate
    return None


def recover_dir(path: Path, is_complete: Callable[[Path], bool]) -> Path | None:
    """Finish an interrupted :func:`replace_dir` of ``path`` (rename the copy that
    :func:`recoverable_dir` picks to ``path``) and remove every ``.tmp`` / ``.old``
    sibling of ``path``. Returns the recovered copy's former name, or None."""
    recovered = recoverable_dir(path, is_complete)
    if recovered is not None:
        recovered.rename(path)
        fsync_path(path.parent)
    for tag in ("tmp", "old"):
        for leftover in siblings(path, tag):
            remove(leftover)
    return recovered


def remove(path: Path) -> None:
    """Remove a file or a directory tree, ignoring what is already gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text``: temp file, fsync, rename, fsync dir.
    Temporary files of earlier interrupted writes of ``path`` are removed."""
    for leftover in siblings(path, "tmp"):
        remove(leftover)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def free_bytes(path: Path) -> int:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def describe_write_error(exc: BaseException, path: Path) -> str:
    """One line for a failed write below ``path``; says so when the disk is full (some
    writers, e.g. torch's zip writer, report it only as an unexpected position)."""
    text = type_and_message(exc)
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not full:
        try:
            full = free_bytes(path) < 1024 * 1024
        except OSError:
            pass
    if full:
        return f"no space left on the device of {path} ({free_bytes(path)} bytes free): {text}"
    return text
