"""Crash-safe file and directory writes.

A checkpoint is built in a hidden temporary sibling directory, every file and folder
in it is fsynced, and only then is it renamed into place; a small pointer file (a
tracker) is replaced the same way. A crash at any point leaves either the old state or
the new one, never a half-written directory under the final name.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


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


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text``: temp file, fsync, rename, fsync dir."""
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
