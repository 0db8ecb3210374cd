"""The checkpoint error, and raising one rank's failure on every rank.

Save and load are collective: a failure seen by one rank must stop every rank with the
same message, or the others wait in the next collective until the timeout.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model."""


def _broadcast_status(status: str | None) -> None:
    """Share rank 0's error (or None) with every rank and raise it everywhere."""
    box = [status]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise CheckpointError(box[0])


def _root_cause(exc: BaseException) -> BaseException:
    """The first rank's own exception inside torch.distributed.checkpoint's
    ``CheckpointException`` (a ``BaseException`` holding every failing rank's error)."""
    if isinstance(exc, CheckpointException) and exc.failures:
        cause = next(iter(exc.failures.values()))
        return cause[0] if isinstance(cause, tuple) else cause
    return exc
