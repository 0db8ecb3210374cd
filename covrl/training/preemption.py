"""Preemption: a signal asks for a checkpoint at the next step boundary, then a clean exit.

SIGTERM (Slurm's time limit, ``scancel``, torchrun shutting down) and SIGUSR1 (Slurm's
``--signal`` warning) only set a flag; the training step in flight finishes. At the
step boundary the ranks agree (all-reduce MAX of the flag: one signalled rank is
enough), save a checkpoint and exit with code 0 after printing
``preempted: checkpoint saved at step N``; ``--resume auto`` continues from there.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from covrl.parallel import Group, all_reduce, get_device

__all__ = ["PREEMPTION_SIGNALS", "PreemptionHandler"]

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    """Installs the signal handlers (main thread) until :meth:`restore`."""

    def __init__(self, signals=PREEMPTION_SIGNALS) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous = {s: signal.signal(s, self._on_signal) for s in signals}

    def _on_signal(self, signum, frame) -> None:
        self.requested = True
        self.signum = signum

    def agreed(self, group: Group) -> bool:
        """Collective over ``group`` (the trainer: the world): whether any rank was
        signalled."""
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=get_device())
        return bool(all_reduce(flag, group, op=dist.ReduceOp.MAX).item())

    def restore(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}
