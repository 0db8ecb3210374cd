"""megatron-core's checkpoint writer processes, tied to the rank that starts them, so a
killed rank leaves no writer or manager process behind."""

from __future__ import annotations

import contextlib
import os
import queue
import sys
from collections.abc import Iterator

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
